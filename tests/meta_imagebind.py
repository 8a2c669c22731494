"""Meta's own ImageBind code (the `imagebind-unofficial` package's copy), loaded for the tests, and the
evaluator's scoring of a caption written against it: the reference our tower, tokenizer and splitting
rule must reproduce.

The package's `__init__` imports the video and audio stack (torchvision, torchaudio, pytorchvideo,
decord), and its modules import `DropPath` and `trunc_normal_` from `timm.layers`, whose package
init needs torchvision too. None of that is needed for text: the package's model modules are
imported under an empty `imagebind` package, and `timm.layers` is given those two names from timm's
own `layers/drop.py` and `layers/weight_init.py` (which import only torch).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

CHUNK_TOKENS, LENGTH_CONTEXT = 74, 1024


def _module_from_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_meta() -> tuple[types.ModuleType, types.ModuleType, Path]:
    """(imagebind_model, multimodal_preprocessors, the package folder) from the installed package."""
    if "imagebind.models.imagebind_model" not in sys.modules:
        timm_dir = Path(importlib.util.find_spec("timm").origin).parent
        layers = types.ModuleType("timm.layers")
        layers.DropPath = _module_from_file("timm.layers.drop", timm_dir / "layers" / "drop.py").DropPath
        layers.trunc_normal_ = _module_from_file("timm.layers.weight_init",
                                                 timm_dir / "layers" / "weight_init.py").trunc_normal_
        sys.modules.setdefault("timm", types.ModuleType("timm"))
        sys.modules["timm.layers"] = layers
        root = Path(importlib.util.find_spec("imagebind").submodule_search_locations[0])
        for name, folder in (("imagebind", root), ("imagebind.models", root / "models")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            package.__spec__.submodule_search_locations = [str(folder)]
            sys.modules[name] = package
    model = importlib.import_module("imagebind.models.imagebind_model")
    preprocessors = importlib.import_module("imagebind.models.multimodal_preprocessors")
    return model, preprocessors, Path(model.__file__).parents[1]


def bpe_path() -> Path:
    return load_meta()[2] / "bpe" / "bpe_simple_vocab_16e6.txt.gz"


def upstream_tokenizer(context_length: int = 77):
    """Meta's SimpleTokenizer with upstream ImageBind's truncation (start, text, end, then cut to the
    context: a long text loses its end token), which the evaluator's scorer runs. The packaged copy changed
    `__call__` to always end with the end token; its encode and decode are upstream's."""
    _, preprocessors, _ = load_meta()

    class Upstream(preprocessors.SimpleTokenizer):
        def __call__(self, texts, context_length=None):
            context_length = context_length or self.context_length
            texts = [texts] if isinstance(texts, str) else texts
            start, end = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
            result = torch.zeros(len(texts), context_length, dtype=torch.long)
            for row, text in enumerate(texts):
                tokens = ([start] + self.encode(text) + [end])[:context_length]
                result[row, :len(tokens)] = torch.tensor(tokens)
            return result[0] if len(result) == 1 else result

    return Upstream(str(bpe_path()), context_length=context_length)


def tiny_imagebind(text_width: int = 128, text_blocks: int = 2, text_heads: int = 2, out_dim: int = 1024,
                   seed: int = 0):
    """An ImageBindModel built by Meta's classes with tiny modalities, every weight moved off its init."""
    model_module, _, _ = load_meta()
    torch.manual_seed(seed)
    small = dict(vision_embed_dim=16, vision_num_blocks=1, vision_num_heads=2, audio_embed_dim=16,
                 audio_num_blocks=1, audio_num_heads=2, depth_embed_dim=16, depth_num_blocks=1, depth_num_heads=2,
                 thermal_embed_dim=16, thermal_num_blocks=1, thermal_num_heads=2, imu_embed_dim=16, imu_num_blocks=1,
                 imu_num_heads=2)
    model = model_module.ImageBindModel(text_embed_dim=text_width, text_num_blocks=text_blocks,
                                        text_num_heads=text_heads, out_embed_dim=out_dim, **small)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.3 if parameter.ndim == 1 else 0.05  # norms and biases far from 1 and 0
            parameter.add_(scale * torch.randn_like(parameter))
    return model.eval()


def evaluator_pieces(text: str, length_tokenizer) -> list[str]:
    """The evaluator's recursive split of `text` (delimiters, greedy joins, then np.array_split of ids)."""

    def ids(segment: str) -> list[int]:
        tokens = length_tokenizer(segment)
        return tokens[tokens != 0][1:-1].tolist()

    def split(segment: str, delimiters: list[str]) -> list[str]:
        if len(ids(segment)) <= CHUNK_TOKENS:
            return [segment]
        if not delimiters:
            tokens = ids(segment)
            return [length_tokenizer.decode(part) for part in np.array_split(tokens, int(len(tokens) / CHUNK_TOKENS)
                                                                             or 1)]
        joined, current = [], ""
        for part in segment.split(delimiters[0]):
            candidate = current + (delimiters[0] if current else "") + part
            if len(ids(candidate)) <= CHUNK_TOKENS:
                current = candidate
            else:
                if current:
                    joined.append(current)
                current = part
        if current:
            joined.append(current)
        out = []
        for piece in joined:
            out.extend([piece] if len(ids(piece)) <= CHUNK_TOKENS else split(piece, delimiters[1:]))
        return out

    return split(text, ["\n", ".", "!", "?", ",", " "])


def evaluator_embedding(text: str, model, tokenizer, length_tokenizer) -> torch.Tensor:
    """The evaluator's embedding of one text: its pieces through ImageBindModel.forward, averaged."""
    _ = load_meta()
    with torch.no_grad():
        pieces = [model({"text": tokenizer(piece).unsqueeze(0)})["text"]
                  for piece in evaluator_pieces(text, length_tokenizer)]
    return torch.mean(torch.stack(pieces), dim=0)[0]
