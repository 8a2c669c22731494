"""Facts about the reference miner's checkpoint (IBLlama), as the evaluator's in-process era read it.

Read from omegalabsinc/omegalabs-anytoany-bittensor at commit 32bbc02 (January 2025):
`models/mmllama3.py` (the model and its embedding layer), `models/tokenizer.py` (the A2A
tokenizer), `tune_recipes/gen.py` (the prompt and `generate_batch`), `neurons/model_scoring.py`
(which files the evaluator took and what it overrode) and `config/8B_lora.yaml`; and from the
torchtune commit that repository pins (8f59c2fe, April 2024): `FullModelMetaCheckpointer`,
`convert_weights`, `TikTokenTokenizer`, `llama3_8b`. Nothing here is imported from either.
"""

from __future__ import annotations

from dataclasses import dataclass

REFERENCE_SOURCE = "omegalabsinc/omegalabs-anytoany-bittensor@32bbc02"
TORCHTUNE_SOURCE = "pytorch/torchtune@8f59c2fecd722691271eecca630a526719a32f76"

# Files of a miner's repository. The evaluator took the first file whose name starts with the prefix.
WEIGHTS_PREFIX = "meta_model"
CONFIG_FILE = "training_config.yml"
TOKENIZER_FILE = "tokenizer.model"
# sha256 of the evaluator's own models/tokenizer.model (Meta's Llama-3 tokenizer), which it used in place of
# any the miner shipped (model_scoring.py overrode tokenizer.path).
EVALUATOR_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
# Components of training_config.yml the evaluator instantiated as they were (the model it replaced).
TOKENIZER_COMPONENT = "models.a2a_tokenizer"
CHECKPOINTER_COMPONENT = "torchtune.utils.FullModelMetaCheckpointer"

# torchtune's `dtype` names (utils.get_dtype); the model was built, and its weights held, in this dtype.
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}

IMAGEBIND_DIM = 1024  # the projector's input: an ImageBind embedding (use_clip was forced off)
CLIP_DIM = 768  # output.proj_from_llama's width (trained, never used at inference)


@dataclass(frozen=True)
class Architecture:
    """The decoder's shape: what `llama3_8b()` builds. Only part of it can be read off the weights."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float
    rope_base: float

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


# The evaluator built `models.mmllama3_8b` whatever the miner's config named, and loaded the weights strictly.
LLAMA3_8B = Architecture(vocab_size=128_256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                         intermediate_dim=14_336, max_seq_len=8192, norm_eps=1e-5, rope_base=500_000.0)

# --- tokenizer ----------------------------------------------------------------------------------
TOKEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PYTHON_TAG = "<|python_tag|>"
LLAMA3_SPECIAL = (BEGIN_OF_TEXT, END_OF_TEXT, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|step_id|>",
                  START_HEADER, END_HEADER, "<|eom_id|>", EOT, PYTHON_TAG)
START_IMAGE, END_IMAGE = "<|start_image|>", "<|end_image|>"
START_VIDEO, END_VIDEO = "<|start_video|>", "<|end_video|>"
START_AUDIO, END_AUDIO = "<|start_audio|>", "<|end_audio|>"
MARKERS = (START_IMAGE, END_IMAGE, START_VIDEO, END_VIDEO, START_AUDIO, END_AUDIO)
# The A2A list puts the markers before <|eot_id|>: eot moves from Meta's id (base + 9) to base + 15 and
# <|start_image|> takes base + 9, the id Llama-3-Instruct learned to end its turns with.
A2A_SPECIAL = LLAMA3_SPECIAL[:-2] + MARKERS + LLAMA3_SPECIAL[-2:]
SPECIAL_SLOTS = 256


def special_token_ids(base_vocab_size: int) -> dict[str, int]:
    """Every special token and its id: the A2A list but its last, reserved fillers, then the python tag."""
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(SPECIAL_SLOTS - len(A2A_SPECIAL))]
    names = [*A2A_SPECIAL[:-1], *reserved, A2A_SPECIAL[-1]]
    return {name: base_vocab_size + index for index, name in enumerate(names)}


def passed_through(name: str) -> bool:
    """Generated special tokens the reference kept (<|eot_id|> and the markers); every other became EOS."""
    return name == EOT or name in MARKERS


# --- prompt -------------------------------------------------------------------------------------
# Placeholder -> the markers around it; the reference filled every one with the same video embedding.
PLACEHOLDERS = {"{image}": (START_IMAGE, END_IMAGE), "{audio}": (START_AUDIO, END_AUDIO),
                "{video}": (START_VIDEO, END_VIDEO)}
VIDEO_PLACEHOLDER = "{video}"
USER, ASSISTANT = "user", "assistant"


def placeholder_text(perception_tokens: int) -> str:
    """The text between the markers: P characters of "0 0 0 ..." (its tokens are overwritten)."""
    return ("0 " * perception_tokens)[:perception_tokens]


def overwritten_slots(between: int, perception_tokens: int) -> tuple[int, ...]:
    """Which projected vector ends up at each position from the first token after the start marker.

    `MMEmbedding.forward` writes all P vectors at every one of the `between` positions between
    the markers, each write starting one position later: the last write wins, so those positions
    all hold vector 0 and the P - 1 positions after them (the end marker first) hold 1 .. P-1.
    """
    return (0,) * between + tuple(range(1, perception_tokens))


# --- weights ------------------------------------------------------------------------------------
# Meta layout -> Hugging Face Llama layout (the names transformers' Llama conversion writes).
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
META_LAYER_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
# The IBLlama projector (an nn.Sequential: indices 0, 2, 3 hold weights) -> embcap.projector.Projector's names.
PROJECTOR_PREFIX = "tok_embeddings.proj_to_llama"
PROJECTOR_TO_EMBCAP = {f"{PROJECTOR_PREFIX}.{index}.{kind}": f"{ours}.{kind}"
                       for index, ours in ((0, "fc1"), (2, "norm"), (3, "fc2")) for kind in ("weight", "bias")}
# Loaded strictly by the evaluator, never used at inference: checked, not written.
UNUSED_PREFIX = "output.proj_from_llama"
SKIPPED_KEYS = ("rope.freqs",)  # torchtune's meta_to_tune drops it
