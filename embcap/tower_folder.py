"""The folder an imported ImageBind text tower lives in, readable without torch (doctor, export checks).

A tower folder (written by `python -m training.import_text_tower`) holds::

    text_tower.json               # TowerConfig: shapes, where the weights came from, the scorer rule
    text_tower.safetensors        # embcap.imagebind_tower.TextTower's state dict (~354M parameters for huge)
    bpe_simple_vocab_16e6.txt.gz  # CLIP's BPE vocabulary (embcap.clip_bpe)
    CARD.md                       # the same facts for people
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's vocabulary, under the name ImageBind ships it
CONTEXT_LENGTH = 77  # positions of the text tower
LENGTH_CONTEXT = 1024  # the evaluator's tokenizer that measures a piece
CHUNK_TOKENS = 74  # the evaluator's piece limit
CONFIG_FILE = "text_tower.json"
WEIGHTS_FILE = "text_tower.safetensors"
CARD_FILE = "CARD.md"
TOWER_FILES = (CONFIG_FILE, WEIGHTS_FILE, BPE_FILE)
FORMAT = "imagebind-text-tower"
# The scorer each folder reproduces (README, "Scoring in the evaluator's space").
SCORER_RULE = (f"videobind-v0.2 scorer: pieces of at most {CHUNK_TOKENS} tokens counted by a {LENGTH_CONTEXT}-position "
               f"tokenizer, split on newline . ! ? , space, else cut by np.array_split; each piece {CONTEXT_LENGTH} "
               "ids (cut without its end token when longer), embedded, normalised and averaged")


class TowerError(ValueError):
    """A tower folder or source file is missing, incomplete or not what it claims."""


class TowerSource(BaseModel):
    """The file a tower was imported from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str
    sha256: str
    form: Literal["state-dict", "pickled-model"]


class TowerConfig(BaseModel):
    """Contents of `text_tower.json`: every shape is read from the imported weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["imagebind-text-tower"] = FORMAT
    format_version: Literal[1] = 1
    width: int = Field(ge=1)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    mlp_width: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    context_length: int = Field(CONTEXT_LENGTH, ge=2)
    output_dim: int = Field(ge=1)
    norm_eps: float = Field(1e-6, gt=0)
    layer_scale: bool = False
    logit_scale: float | None = Field(None, description="the tower's learned output scale (cosine ignores it)")
    parameters: int = Field(ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    chunk_tokens: int = Field(CHUNK_TOKENS, ge=1)
    scorer_rule: str = SCORER_RULE
    source: TowerSource | None = None


def read_config(folder: Path) -> TowerConfig:
    """The folder's TowerConfig; TowerError naming the file when it is missing or invalid."""
    missing = [name for name in TOWER_FILES if not (folder / name).is_file()]
    if missing:
        raise TowerError(f"text tower {folder}: {', '.join(missing)} missing (a tower folder holds "
                         f"{', '.join(TOWER_FILES)})")
    try:
        return TowerConfig.model_validate(json.loads((folder / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise TowerError(f"{folder / CONFIG_FILE} is invalid: {exc}") from exc


def is_tower_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding a text tower's config (what --judge and --rerank-encoder accept)."""
    return (Path(path) / CONFIG_FILE).is_file()
