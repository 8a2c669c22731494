"""Is a checkpoint complete? Its decoder's config, weights index and tokenizer, and its projector.

A checkpoint can hold every file `caption_model.json` names and still never serve: a
decoder folder without `tokenizer.json` exports fine and only fails inside Triton, where
the error names no file. These checks open each part the way the decoder will and name
the missing or broken file, relative to the checkpoint folder.

`problems(..., load=False)` reads only JSON, safetensors headers and the `tokenizers`
file (fast: the doctor's check); `load=True` also loads config and tokenizer through
transformers, as the decoder does (the export's check).
"""

from __future__ import annotations

import json
from pathlib import Path

from embcap.checkpoint import Checkpoint

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILE = "tokenizer.json"
# Files a tokenizer may be built from instead of tokenizer.json (BPE, SentencePiece, WordPiece).
TOKENIZER_SOURCES = (("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _safetensors_problem(path: Path, name: str) -> str | None:
    """Why `path` is not a readable safetensors file (header only), or None."""
    if not path.is_file():
        return f"{name} is missing"
    with open(path, "rb") as file:
        if file.read(len(LFS_POINTER)) == LFS_POINTER:
            return f"{name} is a Git LFS pointer, not weights (git lfs pull)"
        file.seek(0)
        head = file.read(8)
        if len(head) < 8:
            return f"{name} is truncated ({path.stat().st_size} bytes)"
        length = int.from_bytes(head, "little")
        if length <= 1 or length > path.stat().st_size - 8:
            return (f"{name} is truncated or not a safetensors file (header length {length}, file "
                    f"{path.stat().st_size} bytes)")
        try:
            header = json.loads(file.read(length))
        except ValueError as exc:
            return f"{name} has a broken safetensors header: {_first_line(exc)}"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if ends and max(ends) > path.stat().st_size - 8 - length:
        return f"{name} is truncated: its header describes {max(ends)} bytes of tensors, the file holds fewer"
    return None


def _json_problem(path: Path, name: str) -> str | None:
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return f"{name} is missing"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{name} is not valid JSON: {_first_line(exc)}"
    return None


def _weights_problems(folder: Path, label: str) -> list[str]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        problem = _json_problem(index, f"{label}/{SAFETENSORS_INDEX}")
        if problem:
            return [problem]
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            return [f"{label}/{SAFETENSORS_INDEX} has no weight_map"]
        shards = sorted(set(weight_map.values()))
        return [p for shard in shards if (p := _safetensors_problem(folder / shard, f"{label}/{shard}"))]
    if (folder / SAFETENSORS_SINGLE).exists():
        problem = _safetensors_problem(folder / SAFETENSORS_SINGLE, f"{label}/{SAFETENSORS_SINGLE}")
        return [problem] if problem else []
    if any((folder / name).is_file() for name in TORCH_WEIGHTS):
        return []
    return [f"{label}/ holds no weights: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}"]


def _tokenizer_problems(folder: Path, label: str, load: bool) -> list[str]:
    tokenizer_json = folder / TOKENIZER_FILE
    has_sources = any(all((folder / name).is_file() for name in group) for group in TOKENIZER_SOURCES)
    if tokenizer_json.is_file():
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            return [f"{label}/{TOKENIZER_FILE} is broken: {_first_line(exc)}"]
    elif not has_sources:
        return [f"{label}/{TOKENIZER_FILE} is missing (and no vocab.json + merges.txt, tokenizer.model or "
                "vocab.txt to build a tokenizer from): the decoder cannot load its tokenizer"]
    if load:
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # transformers raises many kinds; the message is what matters
            missing = "" if tokenizer_json.is_file() else f" ({label}/{TOKENIZER_FILE} is missing)"
            return [f"the tokenizer in {label}/ does not load{missing}: {_first_line(exc)}"]
    return []


def decoder_problems(folder: Path, label: str = "decoder", load: bool = False) -> list[str]:
    """What keeps the Hugging Face folder `folder` from loading as a decoder; [] when complete."""
    problem = _json_problem(folder / "config.json", f"{label}/config.json")
    problems = [problem] if problem else []
    if not problems and load:
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(folder)
        except Exception as exc:  # transformers raises many kinds; the message is what matters
            problems.append(f"{label}/config.json does not load: {_first_line(exc)}")
    return problems + _weights_problems(folder, label) + _tokenizer_problems(folder, label, load)


def checkpoint_problems(checkpoint: Checkpoint, decoder_dir: Path | None = None, load: bool = False) -> list[str]:
    """What keeps `checkpoint` from serving: projector and decoder files, each named; [] when complete.

    `decoder_dir` is the decoder folder when it is not the checkpoint's own (a de-quantised GGUF);
    a GGUF decoder that is not on disk yet is not checked."""
    problems = []
    projector = checkpoint.projector_path
    problem = _safetensors_problem(projector, _relative(projector, checkpoint.root))
    if problem:
        problems.append(problem)
    folder = decoder_dir or checkpoint.local_decoder_path()
    if folder is not None:
        problems += decoder_problems(folder, _relative(folder, checkpoint.root), load)
    return problems


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
