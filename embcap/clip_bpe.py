"""CLIP's byte-pair tokenizer as ImageBind's text tower reads text, and the evaluator's rule for long text.

`ClipBpe` is a port of `SimpleTokenizer` (OpenAI CLIP, MIT licence; ImageBind's copy lives in
`imagebind/models/multimodal_preprocessors.py`) that gives the same ids for every text: ftfy, HTML
unescaped twice, whitespace collapsed, lower-cased, split by CLIP's pattern, byte-level BPE with `</w>`
word ends. Its vocabulary is the gzipped merges file `bpe_simple_vocab_16e6.txt.gz`.

The evaluator's scorer (videobind-v0.2) embeds a caption in pieces (`evaluator_pieces`):
- a piece fits when its ids from a 1024-position tokenizer, with every 0 dropped (pad, but also the id
  of a lone "!" inside a word) and then the first and last id dropped (start and end), are at most 74;
- the text is split recursively on newline, ".", "!", "?", "," and space, parts greedily re-joined
  along each delimiter (`embcap.text_pieces.split_by_token_limit`);
- with no delimiter left, those ids are cut by `np.array_split` into `int(n / 74) or 1` parts, each
  decoded back to text (words end in a space), so a part may hold more than 74 tokens;
- each piece becomes 77 ids the way ImageBind's tokenizer makes them: start, content, end, cut to 77
  positions (a longer piece keeps 77 ids and loses its end token; the tower then pools at the largest
  id, `ids.argmax()`), zero-padded.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

from embcap.text_pieces import split_by_token_limit
from embcap.tower_folder import BPE_FILE, CHUNK_TOKENS, CONTEXT_LENGTH, LENGTH_CONTEXT

START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
PAD_ID = 0
_MERGES = 49152 - 256 - 2  # merges CLIP's vocabulary uses from the file
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")


def installed_bpe_file() -> Path | None:
    """The vocabulary an installed ImageBind package ships (imagebind/bpe/), found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("imagebind")
    except ValueError:  # an imagebind module made at run time, without a spec: no files of its own
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "bpe" / BPE_FILE).is_file():
            return Path(location) / "bpe" / BPE_FILE
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map of the 256 byte values to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clean(text: str) -> str:
    """ImageBind's text clean-up before BPE: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class ClipBpe:
    """ImageBind's SimpleTokenizer, id for id, plus the evaluator's splitting of long text."""

    def __init__(self, bpe_path: str | Path) -> None:
        with gzip.open(bpe_path) as handle:
            lines = handle.read().decode("utf-8").split("\n")[1:_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [token + "</w>" for token in vocab] + ["".join(merge) for merge in merges] + [START_TOKEN, END_TOKEN]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[START_TOKEN], self.encoder[END_TOKEN]
        self.vocab_size = len(vocab)
        self._bpe = lru_cache(maxsize=1 << 16)(self._merge)

    def _merge(self, token: str) -> str:
        """The BPE merges of one pre-token, as space-separated vocabulary entries."""
        if token in (START_TOKEN, END_TOKEN):
            return token
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, index = [], 0
            while index < len(word):
                if index < len(word) - 1 and (word[index], word[index + 1]) == best:
                    merged.append(word[index] + word[index + 1])
                    index += 2
                else:
                    merged.append(word[index])
                    index += 1
            word = tuple(merged)
        return " ".join(word)

    def encode(self, text: str) -> list[int]:
        """The ids of `text` without start and end tokens."""
        ids: list[int] = []
        for token in _PATTERN.findall(clean(text)):
            token = "".join(self.byte_encoder[byte] for byte in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(token).split(" "))
        return ids

    def decode(self, ids) -> str:
        """Text of `ids` (each `</w>` becomes a space, as SimpleTokenizer.decode does)."""
        text = "".join(self.decoder[int(index)] for index in ids)
        return bytearray(self.byte_decoder[char] for char in text).decode("utf-8", errors="replace").replace(
            "</w>", " ")

    def context_ids(self, text: str, context_length: int = CONTEXT_LENGTH) -> list[int]:
        """Start, content and end ids cut to `context_length` (a longer text loses its end token), unpadded."""
        return ([self.start_id] + self.encode(text) + [self.end_id])[:context_length]

    def length_ids(self, text: str) -> list[int]:
        """The ids the evaluator counts a piece by: 1024 positions, zeros dropped, then the first and last."""
        return [index for index in self.context_ids(text, LENGTH_CONTEXT) if index != PAD_ID][1:-1]

    def evaluator_pieces(self, text: str, chunk_tokens: int = CHUNK_TOKENS) -> list[str]:
        """The pieces the evaluator embeds `text` in (their embeddings are averaged)."""
        def cut(segment: str, parts: int) -> list[str]:
            return [self.decode(part) for part in np.array_split(self.length_ids(segment), parts)]

        return split_by_token_limit(text, lambda segment: len(self.length_ids(segment)), cut, chunk_tokens)

    def batch(self, texts: list[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """[len(texts), context_length] int64 ids, zero-padded (ImageBind's tokenizer output)."""
        ids = np.full((len(texts), context_length), PAD_ID, dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = self.context_ids(text, context_length)
            ids[row, :len(tokens)] = tokens
        return ids
