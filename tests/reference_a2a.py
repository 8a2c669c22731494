"""A re-implementation of the reference miner's inference, for the import's parity tests.

Written from omegalabsinc/omegalabs-anytoany-bittensor at 32bbc02 (models/mmllama3.py,
models/tokenizer.py, tune_recipes/gen.py, neurons/model_scoring.py) and the torchtune commit it
pins, 8f59c2fecd722691271eecca630a526719a32f76 (modules/{transformer,attention,kv_cache,
position_embeddings,rms_norm,feed_forward}.py, models/convert_weights.py,
modules/tokenizers/_tiktoken.py, utils/_generation.py, llama3 builders). torchtune is not
installed: no release matches that commit, and its nearest one (0.1.1) would move this project's
huggingface_hub and numpy. Everything here is its own: nothing is imported from training/, so a
wrong fact in the importer cannot pass by agreeing with itself.

Also builds a tiny miner repository in the reference layout (`make_reference_repo`).

Longer than 250 lines on purpose: the tokenizer, the model and the recipe are one reference.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# --- models/tokenizer.py and torchtune's _tiktoken.py -------------------------------------------
CL100K_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
ALL_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                      "<|python_tag|>"]
START_IMAGE, END_IMAGE = "<|start_image|>", "<|end_image|>"
START_VIDEO, END_VIDEO = "<|start_video|>", "<|end_video|>"
START_AUDIO, END_AUDIO = "<|start_audio|>", "<|end_audio|>"
A2A_SPECIAL_TOKENS = ALL_SPECIAL_TOKENS[:-2] + [START_IMAGE, END_IMAGE, START_VIDEO, END_VIDEO, START_AUDIO,
                                                END_AUDIO] + ALL_SPECIAL_TOKENS[-2:]


@dataclass
class Message:
    role: str
    content: str
    masked: bool = False
    ipython: bool = False
    eot: bool = True


class A2ATokenizer:
    """torchtune's TikTokenTokenizer(path, all_special_tokens=A2A_SPECIAL_TOKENS) with A2A's encode."""

    def __init__(self, path: str) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        previous = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""  # no cache keyed by path: test files come and go
        try:
            mergeable_ranks = load_tiktoken_bpe(path)
        finally:
            if previous is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = previous
        self.base_vocab_size = len(mergeable_ranks)
        reserved = [f"<|reserved_special_token_{i}|>" for i in range(256 - len(A2A_SPECIAL_TOKENS))]
        all_special = A2A_SPECIAL_TOKENS[:-1] + reserved + [A2A_SPECIAL_TOKENS[-1]]
        self.tt_model = tiktoken.Encoding(name="llama3_tiktoken", pat_str=CL100K_PATTERN,
                                          mergeable_ranks=mergeable_ranks,
                                          special_tokens={t: self.base_vocab_size + i
                                                          for i, t in enumerate(all_special)})
        special = lambda token: self.tt_model.encode(token, allowed_special="all", disallowed_special=())[0]  # noqa
        self.bos_id, self.eos_id = special(A2A_SPECIAL_TOKENS[0]), special(A2A_SPECIAL_TOKENS[1])
        self.start_header_id, self.end_header_id = special("<|start_header_id|>"), special("<|end_header_id|>")
        self.eom_id, self.eot_id = special("<|eom_id|>"), special("<|eot_id|>")
        self.python_tag = special("<|python_tag|>")
        self.pad_id = 0  # a2a_tokenizer sets it
        self.vocab_size = self.tt_model.n_vocab

    def encode(self, text: str, add_bos: bool, add_eos: bool) -> list[int]:
        tokens = self.tt_model.encode(text, allowed_special={START_IMAGE, END_IMAGE, START_VIDEO, END_VIDEO,
                                                             START_AUDIO, END_AUDIO}, disallowed_special=())
        return ([self.bos_id] if add_bos else []) + tokens + ([self.eos_id] if add_eos else [])

    def decode(self, token_ids: list[int], truncate_at_eos: bool = True) -> str:
        if truncate_at_eos:
            try:
                k = token_ids.index(self.eos_id)
            except ValueError:
                k = None
            if k:  # sic: an EOS in first place truncates nothing
                token_ids = token_ids[:k]
        return self.tt_model.decode([t for t in token_ids if t != self.bos_id])

    def tokenize_message(self, message: Message) -> list[int]:
        header = ([self.start_header_id] + self.encode(message.role.strip(), False, False) + [self.end_header_id]
                  + self.encode("\n\n", False, False))
        body = self.encode(message.content.strip(), False, False)
        if message.ipython:
            body = [self.python_tag] + body
        return header + body + [self.eot_id if message.eot else self.eom_id]

    def tokenize_messages(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        tokens, mask = [self.bos_id], [True]
        for message in messages:
            tokenized = self.tokenize_message(message)
            tokens, mask = tokens + tokenized, mask + [message.masked] * len(tokenized)
        return tokens + [self.eos_id], mask + [True]


# --- torchtune modules --------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.scale = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_fp32 = x.float()
        return (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.scale


class RotaryPositionalEmbeddings(nn.Module):
    def __init__(self, dim: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        theta = 1.0 / (base ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        idx_theta = torch.einsum("i, j -> ij", torch.arange(max_seq_len, dtype=theta.dtype), theta).float()
        self.register_buffer("cache", torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1),
                             persistent=False)

    def forward(self, x, input_pos):
        rope_cache = self.cache[: x.size(1)] if input_pos is None else self.cache[input_pos]
        xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
        rope_cache = rope_cache.view(1, xshaped.size(1), 1, xshaped.size(3), 2)
        x_out = torch.stack([xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
                             xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1]], -1)
        return x_out.flatten(3).type_as(x)


class KVCache(nn.Module):
    def __init__(self, batch: int, max_seq_len: int, heads: int, head_dim: int, dtype) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, heads, max_seq_len, head_dim, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(batch, heads, max_seq_len, head_dim, dtype=dtype), persistent=False)

    def update(self, input_pos, k_val, v_val):
        self.k_cache[:, :, input_pos] = k_val
        self.v_cache[:, :, input_pos] = v_val
        return self.k_cache, self.v_cache


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, max_seq_len: int, rope_base: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.pos_embeddings = RotaryPositionalEmbeddings(self.head_dim, max_seq_len, rope_base)
        self.kv_cache = None

    def forward(self, x, mask, input_pos):
        bsz, seq_len, _ = x.shape
        q_per_kv = self.heads // self.kv_heads
        q = self.q_proj(x).view(bsz, seq_len, self.kv_heads, q_per_kv, self.head_dim)
        k = self.k_proj(x).view(bsz, seq_len, self.kv_heads, 1, self.head_dim)
        v = self.v_proj(x).view(bsz, seq_len, self.kv_heads, 1, self.head_dim)
        if self.heads != self.kv_heads:
            k = k.expand(bsz, seq_len, self.kv_heads, q_per_kv, self.head_dim)
            v = v.expand(bsz, seq_len, self.kv_heads, q_per_kv, self.head_dim)
        q, k, v = (t.reshape(bsz, seq_len, -1, self.head_dim) for t in (q, k, v))
        q, k = self.pos_embeddings(q, input_pos), self.pos_embeddings(k, input_pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.kv_cache is None)
        return self.output_proj(out.transpose(1, 2).contiguous().view(bsz, seq_len, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False), \
            nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, shape: "Shape") -> None:
        super().__init__()
        self.sa_norm, self.mlp_norm = RMSNorm(shape.dim, shape.norm_eps), RMSNorm(shape.dim, shape.norm_eps)
        self.attn = CausalSelfAttention(shape.dim, shape.heads, shape.kv_heads, shape.max_seq_len, shape.rope_base)
        self.mlp = FeedForward(shape.dim, shape.hidden)

    def forward(self, x, mask, input_pos):
        h = self.attn(self.sa_norm(x), mask, input_pos) + x
        return h + self.mlp(self.mlp_norm(h))


class MMEmbedding(nn.Embedding):
    """models/mmllama3.py: the token embedding that overwrites positions with projected vectors."""

    def __init__(self, vocab: int, dim: int, perception_tokens: int) -> None:
        super().__init__(vocab, dim)
        self._perception_tokens, self._context = perception_tokens, []
        width = dim * perception_tokens
        self.proj_to_llama = nn.Sequential(nn.Linear(1024, width), nn.GELU(), nn.LayerNorm(width),
                                           nn.Linear(width, width))

    def set_context(self, context):
        self._context = context

    def forward(self, input):
        r = super().forward(input)
        for b, context_dict in enumerate(self._context):
            for s, embed in context_dict.items():
                llama_embed = self.proj_to_llama(torch.cat([embed["ib_embed"]]))
                r[b, s:s + self._perception_tokens] = llama_embed.view(self._perception_tokens, -1)
        return r


class MMLinear(nn.Linear):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__(dim, vocab, bias=False)
        self._context = []
        self.proj_from_llama = nn.Sequential(nn.Linear(dim, 768), nn.GELU(), nn.LayerNorm(768), nn.Linear(768, 768))

    def set_context(self, context):
        self._context = context


@dataclass(frozen=True)
class Shape:
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    dim: int
    hidden: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0


class MMLlama3(nn.Module):
    """torchtune's TransformerDecoder as `mmllama3_8b` builds it, in the given shape."""

    def __init__(self, shape: Shape, perception_tokens: int) -> None:
        super().__init__()
        self.shape = shape
        self.tok_embeddings = MMEmbedding(shape.vocab, shape.dim, perception_tokens)
        self.layers = nn.ModuleList([TransformerDecoderLayer(shape) for _ in range(shape.layers)])
        self.norm = RMSNorm(shape.dim, shape.norm_eps)
        self.output = MMLinear(shape.dim, shape.vocab)
        self.causal_mask = None

    def setup_caches(self, max_batch_size: int, dtype) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(max_batch_size, self.shape.max_seq_len, self.shape.heads,
                                          self.shape.dim // self.shape.heads, dtype)
        self.causal_mask = torch.tril(torch.ones(self.shape.max_seq_len, self.shape.max_seq_len, dtype=torch.bool))

    def forward(self, tokens, input_pos=None):
        h = self.tok_embeddings(tokens)
        mask = None if self.causal_mask is None else self.causal_mask[None, None, input_pos]
        for layer in self.layers:
            h = layer(h, mask, input_pos)
        return self.output(self.norm(h)).float()


# --- convert_weights: Meta <-> torchtune names (with models.add_proj_convert_weights) -------------
_FROM_META = {
    "tok_embeddings.weight": "tok_embeddings.weight", "norm.weight": "norm.scale", "output.weight": "output.weight",
    "layers.{}.attention.wk.weight": "layers.{}.attn.k_proj.weight",
    "layers.{}.attention.wq.weight": "layers.{}.attn.q_proj.weight",
    "layers.{}.attention.wv.weight": "layers.{}.attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "layers.{}.attn.output_proj.weight",
    "layers.{}.attention_norm.weight": "layers.{}.sa_norm.scale",
    "layers.{}.ffn_norm.weight": "layers.{}.mlp_norm.scale",
    "layers.{}.feed_forward.w1.weight": "layers.{}.mlp.w1.weight",
    "layers.{}.feed_forward.w2.weight": "layers.{}.mlp.w2.weight",
    "layers.{}.feed_forward.w3.weight": "layers.{}.mlp.w3.weight",
}
_FROM_META.update({f"{m}.{i}.{p}": f"{m}.{i}.{p}" for m in ("tok_embeddings.proj_to_llama", "output.proj_from_llama")
                   for i in (0, 2, 3) for p in ("weight", "bias")})


def _mapped(key: str, mapping: dict[str, str]) -> str:
    if "layers" in key:
        return mapping[re.sub(r"(\.\d+)", ".{}", key)].format(re.search(r"\d+", key).group(0))
    return mapping[key]


def meta_to_tune(state):
    return {_mapped(k, _FROM_META): v for k, v in state.items() if k not in ["rope.freqs"]}


def tune_to_meta(state):
    inverted = {v: k for k, v in _FROM_META.items()}
    return {_mapped(k, inverted): v for k, v in state.items()}


# --- torchtune utils/_generation.py and tune_recipes/gen.py ---------------------------------------
def sample(logits, temperature=1.0, top_k=None):
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        pivot = v.select(-1, -1).unsqueeze(-1)
        logits = torch.where(logits < pivot, -float("Inf"), logits)
    probs = torch.nn.functional.softmax(logits, dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


class InferenceRecipe:
    """gen.py's InferenceRecipe as model_scoring.load_ckpt_from_hf set it up: prompt and generate_batch."""

    def __init__(self, repo: Path, shape: Shape, dtype=torch.float32) -> None:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(repo / "training_config.yml")
        perception_tokens = cfg.model.perception_tokens
        self.cfg, self.prompt_template = cfg, cfg.inference.prompt_template
        self._perception_tokens = ("0 " * perception_tokens)[:perception_tokens]
        self._dtype = dtype
        self._model = MMLlama3(shape, perception_tokens).to(dtype)
        checkpoint = sorted(repo.glob("meta_model*"))[0]
        self._model.load_state_dict(meta_to_tune(torch.load(checkpoint, map_location="cpu", weights_only=True)))
        self._model.setup_caches(max_batch_size=4, dtype=dtype)  # model_scoring: batch_size = 4
        self._tokenizer = A2ATokenizer(str(repo / "tokenizer.model"))
        self._mm_ids_start = self._tokenizer.encode(START_IMAGE + START_AUDIO + START_VIDEO, False, False)
        self._mm_ids_end = self._tokenizer.encode(END_IMAGE + END_AUDIO + END_VIDEO, False, False)

    def mm_process_prompt(self, prompt: str) -> str:
        return (prompt.replace("{image}", f"{START_IMAGE}{self._perception_tokens}{END_IMAGE}")
                .replace("{audio}", f"{START_AUDIO}{self._perception_tokens}{END_AUDIO}")
                .replace("{video}", f"{START_VIDEO}{self._perception_tokens}{END_VIDEO}"))

    def extract_mm_context(self, video_ib_embed, tokens):
        context, in_mm_embed = {}, False
        for idx, tok in enumerate(tokens):
            in_mm_embed = in_mm_embed and tok not in self._mm_ids_end
            if in_mm_embed:
                context[idx] = {"ib_embed": video_ib_embed.to(dtype=self._dtype)}
            in_mm_embed = in_mm_embed or tok in self._mm_ids_start
        return context

    def prompt_tokens(self) -> list[int]:
        messages = [Message(role="user", content=self.mm_process_prompt(self.prompt_template)),
                    Message(role="assistant", content="")]
        tokens, _ = self._tokenizer.tokenize_messages(messages)
        return tokens[:-2]  # strip eot and eos

    @torch.no_grad()
    def generate_batch(self, video_ib_embed: torch.Tensor, temperature=None, top_k="config", record=None,
                       record_tokens=None):
        """Captions as the evaluator got them. Instrumented: `record` collects each step's [B, V] logits and
        `record_tokens` each step's [B] tokens before the loop zeroes finished rows. `temperature` and
        `top_k` default to the config's top-level settings, as generate_batch read them."""
        cfg = self.cfg
        temperature = cfg.temperature if temperature is None else temperature
        top_k = cfg.top_k if top_k == "config" else top_k
        for layer in self._model.layers:  # a fresh cache per call, as a fresh recipe has
            layer.attn.kv_cache.k_cache.zero_()
            layer.attn.kv_cache.v_cache.zero_()
        batch_dim = video_ib_embed.size(0)
        tokens = self.prompt_tokens()
        mm_context = [self.extract_mm_context(e, tokens) for e in video_ib_embed]
        prompt = torch.tensor(tokens, dtype=torch.int).expand(batch_dim, -1).clone()
        prompt_length = prompt.size(1)
        self._model.tok_embeddings.set_context(mm_context)
        self._model.output.set_context(mm_context)
        bos_id = self._tokenizer.tt_model.encode("<|begin_of_text|>", allowed_special="all")[0]
        allowed_id = self._tokenizer.tt_model.encode(
            f"<|eot_id|>{START_IMAGE}{END_IMAGE}{START_AUDIO}{END_AUDIO}{START_VIDEO}{END_VIDEO}",
            allowed_special="all")
        disallowed_tokens = list(set(range(bos_id, bos_id + 256)) - set(allowed_id))

        def generate_next_token(model, input_pos, x):
            logits = model(x, input_pos=input_pos)[:, -1]
            if record is not None:
                record.append(logits.clone())
            toks = sample(logits, temperature, top_k)
            toks = torch.tensor([[self._tokenizer.eos_id if t in disallowed_tokens else t for t in row]
                                 for row in toks])
            if record_tokens is not None:
                record_tokens.append(toks[:, 0].tolist())
            return toks

        generated_tokens = prompt.clone()
        tokens = generate_next_token(self._model, torch.arange(0, prompt_length), prompt)
        eot_reached_b = tokens == self._tokenizer.eot_id
        generated_tokens = torch.cat([generated_tokens, tokens], dim=-1)
        self._model.tok_embeddings.set_context([])
        self._model.output.set_context([])
        input_pos = torch.tensor([prompt_length])
        for _ in range(cfg.max_new_tokens - 1):
            tokens = generate_next_token(self._model, input_pos, tokens)
            eot_reached_b |= tokens == self._tokenizer.eot_id
            tokens *= ~eot_reached_b
            generated_tokens = torch.cat([generated_tokens, tokens], dim=-1)
            if eot_reached_b.all():
                break
            input_pos += 1
        self.generated = generated_tokens[:, prompt_length:].tolist()
        return [self._tokenizer.decode(row[prompt_length:]) for row in generated_tokens.tolist()]


# --- a tiny miner repository in the reference layout ---------------------------------------------
CORPUS = (
    "Caption the previous video. A man is cooking pasta in a small kitchen and talks to the camera. "
    "Two children play football in a park while their dog runs after the ball. A woman paints a red "
    "flower on a white wall; the music is calm. Cars drive along a wet street at night in the city. "
    "The players celebrate a goal, the crowd cheers and waves flags. Someone explains how to fix a bike "
    "tire, step by step, with tools on the table. Video: a cat sleeps on the sofa next to the window."
)


def write_tiktoken_file(path: Path, vocab_size: int = 700) -> int:
    """A small byte-level BPE in tiktoken's file format, learned from CORPUS; returns its token count."""
    import base64

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([CORPUS] * 4, trainer)
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tokenizer.to_str())["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(byte_of[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ordered]
    path.write_text("".join(lines))
    return len(ranks)


def make_reference_repo(out: Path, shape_of_vocab, perception_tokens: int = 2, seed: int = 0,
                        template: str = "Video:\n{video}\nCaption the previous video.",
                        max_new_tokens: int = 24, dtype: str = "fp32",
                        eot_scale: float = 1.5, reserved_scale: float = 1.8) -> tuple[Path, Shape]:
    """A miner repository as the reference's training recipe left it: meta_model_0.pt (a random model in
    the shape `shape_of_vocab(vocabulary size)` gives), training_config.yml, tokenizer.model, and the
    files the import leaves alone (hotkey.txt, adapter_0.pt)."""
    from omegaconf import OmegaConf

    out.mkdir(parents=True)
    base = write_tiktoken_file(out / "tokenizer.model")
    shape = shape_of_vocab(base + 256)
    torch.manual_seed(seed)
    model = MMLlama3(shape, perception_tokens)
    with torch.no_grad():  # every tensor random, norms included, so a swapped name cannot pass
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * (0.3 if parameter.ndim > 1 else 0.2)
                            + (1.0 if parameter.ndim == 1 else 0.0))
        # Llama-3's untrained reserved tokens score low; here every special token but the markers does, and
        # <|eot_id|> and one reserved token (which the reference turned into EOS) score high enough that some
        # captions end on them (`eot_scale`, `reserved_scale`).
        tokenizer = A2ATokenizer(str(out / "tokenizer.model"))
        markers = tokenizer.encode("".join([START_IMAGE, END_IMAGE, START_VIDEO, END_VIDEO, START_AUDIO, END_AUDIO]),
                                   False, False)
        quiet = [t for t in range(base, base + 256) if t not in markers]
        model.output.weight[quiet] *= 0.05
        model.output.weight[tokenizer.eot_id] *= eot_scale / 0.05
        model.output.weight[base + 20] *= reserved_scale / 0.05
    torch.save(tune_to_meta(model.state_dict()), out / "meta_model_0.pt")
    torch.save({"lora_a": torch.zeros(1)}, out / "adapter_0.pt")
    (out / "hotkey.txt").write_text("5Fake")
    config = {  # config/8B_lora.yaml's keys that inference reads, as the recipe saved them
        "model": {"_component_": "models.lora_mmllama3_8b", "lora_attn_modules": ["q_proj", "v_proj"],
                  "lora_rank": 8, "lora_alpha": 16, "perception_tokens": perception_tokens, "use_clip": False},
        "tokenizer": {"_component_": "models.a2a_tokenizer", "path": "models/tokenizer.model"},
        "checkpointer": {"_component_": "torchtune.utils.FullModelMetaCheckpointer",
                         "checkpoint_dir": "checkpoints/Meta-Llama-3-8B-Instruct/original",
                         "checkpoint_files": ["consolidated.00.pth"], "output_dir": "output/", "model_type": "LLAMA3"},
        "max_new_tokens": max_new_tokens, "temperature": 0.6, "top_k": 300, "seed": None,
        "output_dir": "/tmp/lora_finetune_output", "metric_logger": {"log_dir": "${output_dir}"},
        "device": "cuda", "dtype": dtype,
        "inference": {"prompt_template": template, "max_new_tokens": 300, "temperature": 0.6, "top_k": 300,
                      "quantizer": None},
    }
    OmegaConf.save(OmegaConf.create(config), out / "training_config.yml")
    return out, shape
