"""Import ImageBind's text tower: `python -m training.import_text_tower SRC OUT [--check PARQUET]`.

SRC is what the evaluator's scorer loads: a whole pickled `ImageBindModel` (`videobind-v0.2.pth`,
read by a restricted unpickler: training.restricted_pickle) or a state dict (`imagebind_huge.pth`, the
v1 scorer's). Only the text tower's tensors are read (memory-mapped; the other modalities are never
loaded). Widths, depth, vocabulary, context and output width come from the weights; the heads from a
pickled model, else `--heads` (default width / 64, ImageBind's head width). OUT becomes a tower folder
(embcap.tower_folder) that a checkpoint's `rerank.encoder` (`{"kind": "imagebind", "path": ...}`),
`python -m evaluate --judge OUT` and the trainer's `--rerank-encoder OUT` accept. Anything not understood
stops the import naming the file and key; nothing half-written is left in OUT.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from embcap.clip_bpe import installed_bpe_file
from embcap.imagebind_tower import TextTower, save_tower
from embcap.staged_folder import staged_folder
from embcap.tower_folder import BPE_FILE, CARD_FILE, SCORER_RULE, TowerConfig, TowerError, TowerSource
from training.restricted_pickle import PickledObject, module_tree, restricted_pickle_module
from training.digest import file_sha256

TEXT_ANCHOR = "modality_preprocessors.text.token_embedding.weight"  # finds the tower under any wrapper prefix
HEAD_WIDTH = 64  # ImageBind's text heads: 1024 / 16 (huge), 768 / 12 (base)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK_NAMES = {  # ImageBind's names inside modality_trunks.text.blocks.N -> embcap.imagebind_tower.Block's
    "norm_1.weight": "norm_1.weight", "norm_1.bias": "norm_1.bias",
    "attn.in_proj_weight": "attn_in.weight", "attn.in_proj_bias": "attn_in.bias",
    "attn.out_proj.weight": "attn_out.weight", "attn.out_proj.bias": "attn_out.bias",
    "norm_2.weight": "norm_2.weight", "norm_2.bias": "norm_2.bias",
    "mlp.fc1.weight": "fc1.weight", "mlp.fc1.bias": "fc1.bias",
    "mlp.fc2.weight": "fc2.weight", "mlp.fc2.bias": "fc2.bias",
    "layer_scale_gamma1": "gamma_1", "layer_scale_gamma2": "gamma_2",
}
IGNORED = {"modality_preprocessors.text.mask"}  # the causal mask, rebuilt by attention itself
LOGIT_SCALE = "modality_postprocessors.text.1.log_logit_scale"
MAX_LOGIT_SCALE = 100.0  # ImageBind's LearnableLogitScaling clip


def read_source(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, PickledObject], str]:
    """(tensors by ImageBind name, pickled modules by path, form) of a state dict or a whole pickled model."""
    unpickler = restricted_pickle_module(str(src))
    try:
        loaded = torch.load(src, map_location="cpu", mmap=True, weights_only=False, pickle_module=unpickler)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise TowerError(f"{src} cannot be read as a torch checkpoint: {exc}") from exc
        # torch's legacy (pre-zip) format cannot be memory-mapped
        loaded = torch.load(src, map_location="cpu", weights_only=False, pickle_module=unpickler)
    form = "pickled-model" if isinstance(loaded, PickledObject) else "state-dict"
    if not isinstance(loaded, (PickledObject, dict)):
        raise TowerError(f"{src} holds a {type(loaded).__name__}, neither a state dict nor a pickled model")
    tensors, modules = module_tree(loaded)
    anchors = [name for name in tensors if name.endswith(TEXT_ANCHOR)]
    if len(anchors) != 1:
        raise TowerError(f"{src} holds {len(anchors)} tensors named *{TEXT_ANCHOR}: not an ImageBind model "
                         f"(first keys: {', '.join(list(tensors)[:5])})")
    prefix = anchors[0][: -len(TEXT_ANCHOR)]
    strip = len(prefix)
    return ({name[strip:]: t for name, t in tensors.items() if name.startswith(prefix)},
            {name[strip:]: m for name, m in modules.items() if name.startswith(prefix)}, form)


def _attribute(modules: dict[str, PickledObject], path: str, name: str):
    module = modules.get(path)
    return module.state.get(name) if module is not None and isinstance(module.state, dict) else None


def tower_state(tensors: dict[str, torch.Tensor], modules: dict[str, PickledObject], src: Path,
                heads: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    """(TextTower state dict, shape facts) from ImageBind's text tensors; TowerError naming what is not understood."""
    text = {name: t for name, t in tensors.items() if ".text." in f".{name}" and name not in IGNORED}
    state = {"token_embedding.weight": text.pop("modality_preprocessors.text.token_embedding.weight")}
    try:
        state["positional_embedding"] = text.pop("modality_preprocessors.text.pos_embed").squeeze(0)
        state["final_norm.weight"] = text.pop("modality_heads.text.proj.0.weight")
        state["final_norm.bias"] = text.pop("modality_heads.text.proj.0.bias")
        state["projection.weight"] = text.pop("modality_heads.text.proj.1.weight")
    except KeyError as exc:
        raise TowerError(f"{src}: the text tower's {exc.args[0]} is missing") from exc
    log_scale = text.pop(LOGIT_SCALE, None)
    layers = 0
    while f"modality_trunks.text.blocks.{layers}.attn.in_proj_weight" in text:
        for source, target in BLOCK_NAMES.items():
            tensor = text.pop(f"modality_trunks.text.blocks.{layers}.{source}", None)
            if tensor is not None:
                state[f"blocks.{layers}.{target}"] = tensor.reshape(-1) if target.startswith("gamma") else tensor
        layers += 1
    if text:
        raise TowerError(f"{src}: text tower tensors not understood: {', '.join(sorted(text)[:5])} (an ImageBind text "
                         "tower has no pre-transformer norm, CLS token or key/value biases)")
    width = state["token_embedding.weight"].shape[1]
    pickled_heads = _attribute(modules, "modality_trunks.text.blocks.0.attn", "num_heads")
    if pickled_heads is not None and heads is not None and heads != pickled_heads:
        raise TowerError(f"--heads {heads} but {src} pickles its attention with {pickled_heads} heads")
    heads = pickled_heads or heads or max(1, width // HEAD_WIDTH)
    if width % heads:
        raise TowerError(f"{src}: width {width} does not split into {heads} heads")
    eps = {_attribute(modules, path, "eps") for path in modules if path.startswith(("modality_trunks.text",
                                                                                     "modality_heads.text"))}
    eps.discard(None)
    if len(eps) > 1:
        raise TowerError(f"{src}: the text tower's LayerNorms use several eps values {sorted(eps)}")
    facts = {"width": width, "layers": layers, "heads": heads, "mlp_width": state["blocks.0.fc1.weight"].shape[0],
             "vocab_size": state["token_embedding.weight"].shape[0],
             "context_length": state["positional_embedding"].shape[0],
             "output_dim": state["projection.weight"].shape[0], "norm_eps": eps.pop() if eps else 1e-6,
             "layer_scale": "blocks.0.gamma_1" in state,
             "logit_scale": None if log_scale is None else min(math.exp(float(log_scale.detach())), MAX_LOGIT_SCALE)}
    return state, facts


def find_bpe(explicit: Path | None) -> Path:
    """The CLIP BPE vocabulary: --bpe, else the one an installed ImageBind package ships (not imported)."""
    if explicit is not None:
        if not explicit.is_file():
            raise TowerError(f"--bpe {explicit} not found")
        return explicit
    installed = installed_bpe_file()
    if installed is not None:
        return installed
    raise TowerError(f"no {BPE_FILE}: pass --bpe FILE (ImageBind ships it as imagebind/bpe/{BPE_FILE}, e.g. in the "
                     "imagebind-unofficial package)")


def card(config: TowerConfig) -> str:
    source = config.source
    return "\n".join([
        "# ImageBind text tower", "",
        f"Imported by `python -m training.import_text_tower` from `{source.file}` ({source.form}), sha256 "
        f"`{source.sha256}`.", "",
        "| | |", "|---|---|",
        *(f"| {key} | {value} |" for key, value in config.model_dump(exclude={"source", "scorer_rule"}).items()),
        "", f"Scoring rule reproduced: {SCORER_RULE}.", ""])


def import_text_tower(src: str | Path, out: str | Path, bpe: Path | None = None, heads: int | None = None,
                      dtype: str | None = None, log=print) -> TowerConfig:
    """Write the text tower of `src` as a tower folder at `out`; TowerError when it is not understood."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise TowerError(f"{src} not found")
    started = time.time()
    log(f"reading {src} ({src.stat().st_size / 1e9:.2f} GB, memory-mapped) ...")
    tensors, modules, form = read_source(src)
    state, facts = tower_state(tensors, modules, src, heads)
    source_dtype = str(state["token_embedding.weight"].dtype).removeprefix("torch.")
    target = dtype or (source_dtype if source_dtype in DTYPES else "float32")
    parameters = sum(t.numel() for t in state.values())
    log(f"text tower: width {facts['width']}, {facts['layers']} blocks, {facts['heads']} heads, vocabulary "
        f"{facts['vocab_size']}, {facts['context_length']} positions -> {facts['output_dim']}-d; "
        f"{parameters / 1e6:.1f}M parameters, {target}")
    log(f"hashing {src.name} ...")
    config = TowerConfig(**facts, parameters=parameters, dtype=target,
                         source=TowerSource(file=src.name, sha256=file_sha256(src), form=form))
    with torch.device("meta"):
        tower = TextTower(config)
    tower.load_state_dict({name: t.to(DTYPES[target]) for name, t in state.items()}, strict=True, assign=True)
    vocabulary = find_bpe(bpe)
    with staged_folder(out) as staging:
        save_tower(tower, staging)
        shutil.copyfile(vocabulary, staging / BPE_FILE)
        (staging / CARD_FILE).write_text(card(config))
        staging.chmod(0o755)  # the container reads it as another user; safetensors writes 0600
        for path in staging.iterdir():
            path.chmod(0o644)
    log(f"wrote {out} in {time.time() - started:.1f} s")
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m training.import_text_tower",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="videobind-v0.2.pth (a pickled model) or imagebind_huge.pth")
    parser.add_argument("out", type=Path, help="the tower folder to write")
    parser.add_argument("--bpe", type=Path, help=f"CLIP's {BPE_FILE} (default: the installed ImageBind package's)")
    parser.add_argument("--heads", type=int, help=f"attention heads of a state dict (default: width / {HEAD_WIDTH}); "
                                                  "a pickled model says its own")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="store the weights in this dtype (default: the "
                                                               "source's; float32 keeps the evaluator's arithmetic)")
    parser.add_argument("--check", type=Path, metavar="PARQUET",
                        help="then embed the rows' description and compare with their description_embed")
    parser.add_argument("--limit", type=int, default=None, help="with --check: at most this many rows")
    args = parser.parse_args(argv)
    try:
        import_text_tower(args.src, args.out, args.bpe, args.heads, args.dtype)
    except TowerError as exc:
        print(f"import refused: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the restricted unpickler's refusal, a corrupt file
        print(f"import refused: {args.src}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.check is None:
        return 0
    from tooling.tower_check import check_tower

    return check_tower(args.out, args.check, args.limit).exit_code


if __name__ == "__main__":
    sys.exit(main())
