"""Performance prototypes, measured by the benchmark before they move into embcap/ or model_repository/."""

from __future__ import annotations


def generator_factory(name: str):
    """A CaptionGenerator-compatible class by name (for `python -m bench.offline --generator NAME`)."""
    if name == "fast":
        from bench.prototypes.continuous import FastCaptionGenerator

        return FastCaptionGenerator
    raise ValueError(f"unknown generator {name!r} (hf, fast)")
