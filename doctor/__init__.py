"""`python -m doctor`: check a miner repository the way the evaluator will, before it does.

Each check prints one line (PASS / FAIL / WARN / SKIP and the reason); the exit
status is non-zero when any check fails. See `python -m doctor --help`.
"""

PLACEHOLDER_HOTKEY = "5E3VQZBs1o4M8wf3CACqQJKHSjekRFhDNxzWasgM8NShpfyK"
"""The repository's hotkey.txt until a miner writes their own: a valid SS58 address of
sha256(b"embcap placeholder hotkey: replace with your own"), which nobody holds."""
