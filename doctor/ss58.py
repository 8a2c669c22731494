"""SS58 addresses (Substrate/Bittensor): base58 of prefix + public key + blake2b checksum."""

from __future__ import annotations

import hashlib

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
BITTENSOR_PREFIX = 42  # the generic Substrate prefix, used by Bittensor hotkeys ("5...", 48 characters)
_CHECKSUM_PREFIX = b"SS58PRE"
# Accepted payload sizes and their checksum lengths (the SS58 specification).
_CHECKSUM_LENGTH = {1: 1, 2: 1, 4: 1, 8: 1, 32: 2, 33: 2}


class SS58Error(ValueError):
    """Not a valid SS58 address."""


def b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    text = ""
    while number:
        number, digit = divmod(number, 58)
        text = ALPHABET[digit] + text
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + text


def b58decode(text: str) -> bytes:
    number = 0
    for position, char in enumerate(text):
        digit = ALPHABET.find(char)
        if digit < 0:
            raise SS58Error(f"character {char!r} at position {position} is not base58")
        number = number * 58 + digit
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def _checksum(data: bytes) -> bytes:
    return hashlib.blake2b(_CHECKSUM_PREFIX + data, digest_size=64).digest()


def _prefix_bytes(prefix: int) -> bytes:
    if 0 <= prefix < 64:
        return bytes([prefix])
    if 64 <= prefix < 16384:
        return bytes([((prefix & 0b1111_1100) >> 2) | 0b0100_0000, (prefix >> 8) | ((prefix & 0b11) << 6)])
    raise SS58Error(f"prefix {prefix} is out of range 0..16383")


def encode(public_key: bytes, prefix: int = BITTENSOR_PREFIX) -> str:
    """The SS58 address of `public_key` (32 bytes for sr25519/ed25519 keys)."""
    if len(public_key) not in _CHECKSUM_LENGTH:
        raise SS58Error(f"a payload of {len(public_key)} bytes cannot be SS58-encoded")
    data = _prefix_bytes(prefix) + public_key
    return b58encode(data + _checksum(data)[:_CHECKSUM_LENGTH[len(public_key)]])


def decode(address: str) -> tuple[int, bytes]:
    """(prefix, public key) of `address`; SS58Error says what is wrong."""
    if not address:
        raise SS58Error("empty address")
    data = b58decode(address)
    if not data:
        raise SS58Error("empty address")
    if data[0] < 64:
        prefix, prefix_length = data[0], 1
    elif data[0] < 128 and len(data) > 1:
        lower = ((data[0] << 2) | (data[1] >> 6)) & 0xFF
        prefix, prefix_length = lower | ((data[1] & 0b0011_1111) << 8), 2
    else:
        raise SS58Error(f"first byte {data[0]} is not an SS58 prefix")
    for payload_length, checksum_length in _CHECKSUM_LENGTH.items():
        if len(data) == prefix_length + payload_length + checksum_length:
            break
    else:
        raise SS58Error(f"decodes to {len(data)} bytes, which is no SS58 address length")
    body, checksum = data[:-checksum_length], data[-checksum_length:]
    if _checksum(body)[:checksum_length] != checksum:
        raise SS58Error("checksum mismatch (a typo, or a truncated address)")
    return prefix, body[prefix_length:]


def validate_hotkey(address: str) -> bytes:
    """The 32-byte public key of a Bittensor hotkey; SS58Error if `address` is not one."""
    if address != address.strip():
        raise SS58Error("leading or trailing whitespace")
    prefix, key = decode(address)
    if prefix != BITTENSOR_PREFIX:
        raise SS58Error(f"network prefix {prefix}, Bittensor hotkeys use {BITTENSOR_PREFIX}")
    if len(key) != 32:
        raise SS58Error(f"a {len(key)}-byte key; hotkeys are 32-byte public keys")
    return key
