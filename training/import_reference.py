"""Import a reference miner's IBLlama checkpoint: `python -m training.import_reference SRC OUT`.

SRC is a miner's repository as the evaluator's in-process era scored it (`meta_model_*.pt`,
`training_config.yml`, `tokenizer.model`; see training.reference_format). OUT becomes a
checkpoint this stack serves unchanged: the decoder as a Hugging Face Llama folder in shards,
the projector under our names, the A2A tokenizer, the prompt with the reference's own prefix
placement (`prompt.prefix_slots`), its sampling settings and stop tokens, and MODEL_CARD.md
saying where it all came from. Anything not understood stops the import with a message that
names the file and key; nothing half-written is left in OUT.

Longer than 250 lines on purpose: the prompt layout, the spec and the card describe one import
and must change together.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from embcap.checkpoint import (CaptionModelSpec, DecoderSource, GenerationSettings, PromptTemplate,
                               load_checkpoint, save_spec)
from embcap.contract import EMBEDDING_DIM
from embcap.generation import prompt_ids
from embcap.projector import load_projector
from embcap.staged_folder import staged_folder
from training.decoder import SHARD_SIZE
from training.reference_config import ReferenceConfig, read_config
from training.reference_format import (BEGIN_OF_TEXT, CONFIG_FILE, DTYPES, END_OF_TEXT, END_VIDEO, EOT,
                                       EVALUATOR_TOKENIZER_SHA256, IMAGEBIND_DIM, LLAMA3_8B, REFERENCE_SOURCE,
                                       START_VIDEO, TOKENIZER_FILE, TORCHTUNE_SOURCE, WEIGHTS_PREFIX, Architecture,
                                       overwritten_slots, passed_through)
from training.reference_tokenizer import A2ATokenizer, ReferenceFormatError, read_ranks, serving_tokenizer
from training.reference_weights import check_state, decoder_state, load_meta_state, projector_state
from training.digest import file_sha256

DECODER_DIR = "decoder"
CARD_FILE = "MODEL_CARD.md"
# What serving does differently from the reference's generate_batch, for the card and docs/reference-miner.md.
DIFFERENCES = (
    "Sampling draws from each row's own seeded stream (embcap.sampling), not torch's global generator: the "
    "same distribution (temperature, top-k), other draws; greedy decoding gives the same tokens.",
    "A row's caption ends at its stop token. The reference's 4-row loop wrote token 0 ('!') after a row's "
    "<|eot_id|> until the batch's slowest row ended, and decoded those too; that padding depends on the "
    "other rows of the request and is not reproduced.",
    "Stop tokens are banned while a caption is still blank (an empty caption drops the evaluator's whole "
    "request); the reference could answer '<|eot_id|>!!!...' or '<|end_of_text|>...' when the very first "
    "token was one of them.",
    "Leading and trailing whitespace is stripped from captions.",
    "In bfloat16 the reference rounded the input embedding and ran the projector in bfloat16; the served "
    "projector runs in float32 on the same (rounded) weights.",
)


@dataclass(frozen=True)
class SourceFiles:
    """The miner repository's files the import reads, and the ones it leaves."""

    weights: Path
    config: Path
    tokenizer: Path
    others: tuple[str, ...]


def find_sources(src: Path, weights: str | None = None, tokenizer: Path | None = None) -> SourceFiles:
    """Locate the weights, config and tokenizer in `src`; refuse when one is missing or ambiguous."""
    if not src.is_dir():
        raise ReferenceFormatError(f"{src}: not a folder (expected a miner's repository)")
    candidates = sorted(p.name for p in src.iterdir() if p.is_file() and p.name.startswith(WEIGHTS_PREFIX))
    if weights is not None:
        if weights not in candidates:
            raise ReferenceFormatError(f"{src}: --weights {weights} is not one of {candidates or 'no files'}")
        candidates = [weights]
    if not candidates:
        raise ReferenceFormatError(f"{src}: no {WEIGHTS_PREFIX}* file (torchtune's FullModelMetaCheckpointer "
                                   "writes meta_model_<epoch>.pt)")
    if len(candidates) > 1:
        raise ReferenceFormatError(f"{src}: several weight files {candidates}; the evaluator took the first the "
                                   "hub listed: choose one with --weights")
    config = src / CONFIG_FILE
    if not config.is_file():
        raise ReferenceFormatError(f"{src}: no {CONFIG_FILE}")
    tokenizer = tokenizer or src / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise ReferenceFormatError(f"{tokenizer}: not found. The evaluator used its own copy of the Llama-3 "
                                   f"tokenizer ({TOKENIZER_FILE} in its repository's models/): pass it with "
                                   "--tokenizer")
    used = {candidates[0], CONFIG_FILE, tokenizer.name if tokenizer.parent == src else None}
    others = tuple(sorted(p.name for p in src.iterdir() if p.name not in used and not p.name.startswith(".")))
    return SourceFiles(src / candidates[0], config, tokenizer, others)


@dataclass(frozen=True)
class PromptLayout:
    """The reference's prompt cut around the positions its embedding layer overwrote."""

    before: list[int]
    slots: tuple[int, ...]
    after: list[int]
    reference: list[int]  # the whole prompt as the reference tokenised it


def prompt_layout(reference: A2ATokenizer, template: str, perception_tokens: int, where: Path) -> PromptLayout:
    """Where the P projected vectors land in the reference's prompt (see overwritten_slots)."""
    ids = reference.media_prompt(template, perception_tokens)
    start_id, end_id = reference.special[START_VIDEO], reference.special[END_VIDEO]
    if ids.count(start_id) != 1 or ids.count(end_id) != 1:
        raise ReferenceFormatError(f"{where}: the prompt does not tokenise to one {START_VIDEO} ... {END_VIDEO}")
    first = ids.index(start_id) + 1
    slots = overwritten_slots(ids.index(end_id) - first, perception_tokens)
    if first + len(slots) > len(ids):
        raise ReferenceFormatError(f"{where}: model.perception_tokens = {perception_tokens} writes past the "
                                   "prompt's end (the reference's embedding layer fails there)")
    return PromptLayout(ids[:first], slots, ids[first + len(slots):], ids)


def caption_spec(name: str, config: ReferenceConfig, layout: PromptLayout, tokenizer, reference: A2ATokenizer,
                 where: Path) -> CaptionModelSpec:
    """caption_model.json for the import; the prompt is checked to tokenise as the reference's did."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    stops = [EOT] + [token for token, _ in sorted(reference.special.items(), key=lambda item: item[1])
                     if not passed_through(token) and token != END_OF_TEXT]
    try:
        spec = CaptionModelSpec(
            name=name, embedding_dim=EMBEDDING_DIM, prefix_length=config.perception_tokens,
            decoder=DecoderSource(path=DECODER_DIR),
            prompt=PromptTemplate(template=text(layout.before) + "{prefix}" + text(layout.after),
                                  chat=False, add_bos=False, prefix_slots=layout.slots),
            generation=GenerationSettings(max_new_tokens=config.max_new_tokens, min_new_tokens=0, do_sample=True,
                                          temperature=config.temperature, top_k=config.top_k or 0,
                                          stop_tokens=tuple(stops), seed=config.seed or 0))
    except ValueError as exc:  # pydantic's ValidationError names the field
        raise ReferenceFormatError(f"{where}: the settings do not fit a checkpoint of this stack:\n{exc}") from exc
    served = prompt_ids(tokenizer, spec)
    if (served.before, served.after) != (layout.before, layout.after):
        raise ReferenceFormatError(f"{where}: the prompt tokenises differently here ({served.before} + prefix + "
                                   f"{served.after}) than in the reference ({layout.reference})")
    return spec


def decoder_config(arch: Architecture, reference: A2ATokenizer, dtype: torch.dtype):
    """The Hugging Face LlamaConfig of `llama3_8b()`'s shape (or `arch`'s)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.embed_dim, intermediate_size=arch.intermediate_dim,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim, hidden_act="silu",
        max_position_embeddings=arch.max_seq_len, rms_norm_eps=arch.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_base}, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=reference.special[BEGIN_OF_TEXT],
        eos_token_id=reference.special[END_OF_TEXT], dtype=dtype, architectures=["LlamaForCausalLM"])


def import_reference(src: str | Path, out: str | Path, *, arch: Architecture = LLAMA3_8B, weights: str | None = None,
                     tokenizer: str | Path | None = None, name: str | None = None, overwrite: bool = False,
                     log: Callable[[str], None] = print) -> Path:
    """Write the checkpoint for miner repository `src` into `out` and return `out`.

    `arch` is the decoder shape the evaluator built (`llama3_8b`); other shapes serve tests only."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if out.exists() and not overwrite:
        raise ReferenceFormatError(f"{out} exists: choose another folder or pass --overwrite")
    started = time.perf_counter()
    files = find_sources(src, weights, Path(tokenizer).resolve() if tokenizer else None)
    config = read_config(files.config)
    log(f"[1/5] {files.config.name}: perception_tokens {config.perception_tokens}, max_new_tokens "
        f"{config.max_new_tokens}, temperature {config.temperature}, top_k {config.top_k}, dtype {config.dtype}")

    reference = A2ATokenizer(read_ranks(files.tokenizer))
    if len(reference.ranks) + len(reference.special) != arch.vocab_size:
        raise ReferenceFormatError(f"{files.tokenizer}: {len(reference.ranks)} tokens + {len(reference.special)} "
                                   f"special is not the decoder's vocabulary of {arch.vocab_size}")
    layout = prompt_layout(reference, config.prompt_template, config.perception_tokens, files.config)
    hf_tokenizer = serving_tokenizer(reference)
    spec = caption_spec(name or f"reference-{src.name}", config, layout, hf_tokenizer, reference, files.config)
    tokenizer_hash = file_sha256(files.tokenizer)
    log(f"[2/5] tokenizer {files.tokenizer.name}: {len(reference.ranks)} + {len(reference.special)} tokens; prompt "
        f"{len(layout.before)} + {len(layout.slots)} prefix positions (vectors {list(layout.slots)}) + "
        f"{len(layout.after)}" + ("" if tokenizer_hash == EVALUATOR_TOKENIZER_SHA256 else
                                  "; NOTE: not the evaluator's copy of the Llama-3 tokenizer (sha256 differs)"))

    dtype = getattr(torch, DTYPES[config.dtype])
    state = load_meta_state(files.weights)
    check_state(state, arch, config.perception_tokens, files.weights)
    weights_hash = file_sha256(files.weights)
    log(f"[3/5] {files.weights.name}: {len(state)} tensors, every key and shape as the evaluator loaded them")

    with staged_folder(out) as staging:
        _write(staging, spec, state, arch, reference, hf_tokenizer, dtype, log)
        checkpoint = load_checkpoint(staging)
        load_projector(checkpoint.projector_path, spec.embedding_dim, arch.embed_dim, spec.prefix_length)
        (staging / CARD_FILE).write_text(model_card(spec, config, files, layout, weights_hash, tokenizer_hash, dtype))
        _as_umask_allows(staging)
    log(f"imported {src.name} -> {out} in {time.perf_counter() - started:.1f} s: serve it with "
        f"`make serve CHECKPOINT={out}`; check it with `python -m doctor --checkpoint ...`")
    return out


def _write(staging: Path, spec: CaptionModelSpec, state: dict, arch: Architecture, reference: A2ATokenizer,
           hf_tokenizer, dtype: torch.dtype, log: Callable[[str], None]) -> None:
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    decoder = staging / DECODER_DIR
    decoder.mkdir()
    tensors = decoder_state(state, arch, dtype)
    decoder_config(arch, reference, dtype).save_pretrained(decoder)
    save_torch_state_dict(tensors, decoder, max_shard_size=SHARD_SIZE)
    hf_tokenizer.save_pretrained(decoder)
    shards = len(list(decoder.glob("*.safetensors")))
    log(f"[4/5] decoder: {sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters in {shards} shard(s) "
        f"of at most {SHARD_SIZE}, {str(dtype).removeprefix('torch.')}, q/k permuted to Hugging Face's rotary layout")
    save_file(projector_state(state, dtype), str(staging / spec.projector))
    save_spec(staging, spec)
    log(f"[5/5] projector {IMAGEBIND_DIM} -> {spec.prefix_length} x {arch.embed_dim}, caption_model.json, "
        f"{len(spec.generation.stop_tokens)} stop tokens")


def _as_umask_allows(root: Path) -> None:
    """Modes as a plain write would give them: the staging folder is private and safetensors writes 0600
    files, but the container reads the checkpoint as nobody."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def model_card(spec: CaptionModelSpec, config: ReferenceConfig, files: SourceFiles, layout: PromptLayout,
               weights_hash: str, tokenizer_hash: str, dtype: torch.dtype) -> str:
    """MODEL_CARD.md: where the checkpoint came from and what serving changes."""
    generation = spec.generation
    tokenizer_note = ("the evaluator's own copy" if tokenizer_hash == EVALUATOR_TOKENIZER_SHA256 else
                      f"NOT the evaluator's copy (its sha256 is {EVALUATOR_TOKENIZER_SHA256})")
    lines = [
        f"# {spec.name}",
        "",
        f"Imported by `python -m training.import_reference` from a reference (IBLlama) miner repository, read "
        f"as the evaluator's in-process era read it ({REFERENCE_SOURCE}, torchtune {TORCHTUNE_SOURCE}).",
        "",
        "## Source",
        f"- Folder: `{files.weights.parent}`",
        f"- Weights: `{files.weights.name}` ({files.weights.stat().st_size / 2**30:.2f} GiB, sha256 `{weights_hash}`), "
        f"Meta layout, held in {config.dtype} as the reference did; written as {str(dtype).removeprefix('torch.')}",
        f"- Config: `{files.config.name}` (sha256 `{file_sha256(files.config)}`)",
        f"- Tokenizer: `{files.tokenizer}` (sha256 `{tokenizer_hash}`: {tokenizer_note})",
        f"- Not used: {', '.join(f'`{name}`' for name in files.others) or 'nothing else'}",
        "",
        "## What was carried over",
        f"- Projector `tok_embeddings.proj_to_llama` -> `{spec.projector}` (1024 -> {spec.prefix_length} vectors); "
        "`output.proj_from_llama` checked and left out (never used at inference).",
        f"- Prompt `{config.prompt_template!r}` as a Llama-3 user turn with the assistant turn opened: "
        f"{len(layout.reference)} tokens, of which {len(layout.slots)} are overwritten by the projected vectors "
        f"{list(layout.slots)} (the reference's embedding layer wrote all P vectors at every position between "
        "the markers, the last write winning): `prompt.prefix_slots`.",
        f"- Sampling: temperature {generation.temperature}, top-k {generation.top_k or 'off'}, up to "
        f"{generation.max_new_tokens} new tokens (the top-level `max_new_tokens` that `generate_batch` read).",
        f"- Stop: `<|eot_id|>`, and every special token but the six markers (the reference turned them into "
        f"EOS and cut the caption there): {len(generation.stop_tokens)} stop tokens besides EOS.",
    ]
    if config.unused:
        lines.append("- Read but not used by the reference's inference: "
                     + ", ".join(f"`{key}` = {value!r}" for key, value in config.unused.items()))
    lines += ["", "## What serving changes", "", "The captions' tokens are the reference's; besides speed:", ""]
    lines += [f"- {difference}" for difference in DIFFERENCES]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m training.import_reference", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="the miner's repository (a local folder)")
    parser.add_argument("out", help="the checkpoint folder to write")
    parser.add_argument("--weights", help=f"which {WEIGHTS_PREFIX}* file, when there are several")
    parser.add_argument("--tokenizer", help=f"the Llama-3 {TOKENIZER_FILE} (default: SRC/{TOKENIZER_FILE})")
    parser.add_argument("--name", help="the checkpoint's name (default: reference-<SRC folder name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        import_reference(args.src, args.out, weights=args.weights, tokenizer=args.tokenizer, name=args.name,
                         overwrite=args.overwrite)
    except ReferenceFormatError as exc:
        print(f"import refused: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in ("tiktoken", "omegaconf"):
            raise
        print(f"{exc.name} is missing: pip install -e '.[reference]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
