"""Build models and small checkpoints: random Llama decoders of real shapes (`build_model`, `SHAPES`) and
checkpoints around them, a tiny random Llama (tests, benchmarks) and the SmolLM2 starter model.

`python -m tooling.builders tiny OUT` or `starter OUT` writes one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from embcap.checkpoint import (CaptionModelSpec, DecoderSource, GenerationSettings, OnnxTextEncoder, RerankSettings,
                               SentenceTransformerEncoder, load_checkpoint, save_spec)
from embcap.contract import EMBEDDING_DIM
from embcap.text_encoder import LIFT_SEED, MINILM_PACKAGE
from embcap.decoder_source import SMOLLM2, smollm2_decoder_dir
from embcap.projector import save_projector, seeded_projector


SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, tie embeddings)
    "tiny": (64, 128, 2, 4, 2, False),
    "smollm2-135m": (576, 1536, 30, 9, 3, True),
    "llama-0.5b": (1024, 4096, 24, 16, 4, False),
    "llama-1b": (2048, 8192, 16, 32, 8, True),  # Llama-3.2-1B's layers
    "llama3-8b": (4096, 14336, 32, 32, 8, False),
}

# The default model's reranking encoder: MiniLM lifted into the 1024-d conditioning space (embcap.text_encoder).
MINILM_RERANK_ENCODER = SentenceTransformerEncoder(package=MINILM_PACKAGE, lift_seed=LIFT_SEED)


def minilm_rerank(candidates: int, **settings) -> RerankSettings:
    """Best-of-`candidates` reranked in the default model's conditioning space."""
    return RerankSettings(candidates=candidates, encoder=MINILM_RERANK_ENCODER, **settings)


def build_model(shape: str, vocab: int, device: str, dtype):
    """A Llama-family decoder of `shape` (SHAPES) with random weights, built on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, tie = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, rope_theta=500_000.0, tie_word_embeddings=tie)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_random_checkpoint(out: str | Path, shape: str, tokenizer_dir: str | Path, device: str = "cpu",
                           prefix_length: int = 2, new_tokens: int = 8, candidates: int = 1,
                           prompt: dict | None = None) -> tuple[Path, int]:
    """A servable checkpoint whose decoder is `build_model(shape)` (bf16 on CUDA, else float32), with
    `tokenizer_dir`'s tokenizer, a seeded projector and captions of exactly `new_tokens` tokens; with
    `candidates` > 1 a tiny ONNX text tower reranks. Returns (folder, decoder parameters)."""
    from transformers import AutoTokenizer

    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(shape, len(tokenizer), device, torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(out / "decoder")
    tokenizer.save_pretrained(out / "decoder")
    hidden, params = model.config.hidden_size, sum(p.numel() for p in model.parameters())
    del model
    rerank = RerankSettings()
    if candidates > 1:
        make_onnx_text_tower(out / "tower", tokenizer_dir)
        rerank = RerankSettings(candidates=candidates, encoder=OnnxTextEncoder(path="tower/model.onnx",
                                                                               tokenizer="tower/tokenizer.json"))
    spec = CaptionModelSpec(name=f"random-{shape}", prefix_length=prefix_length, decoder=DecoderSource(path="decoder"),
                            rerank=rerank, generation=GenerationSettings(max_new_tokens=new_tokens,
                                                                         min_new_tokens=new_tokens),
                            **({"prompt": prompt} if prompt else {}))
    save_projector(seeded_projector(spec.embedding_dim, hidden, prefix_length, 0), out / spec.projector)
    save_spec(out, spec)
    return out, params


def make_tiny_checkpoint(out: str | Path, tokenizer_dir: str | Path, seed: int = 0, hidden_size: int = 64,
                         embedding_dim: int = EMBEDDING_DIM, rerank: RerankSettings = RerankSettings(),
                         max_new_tokens: int = 8, min_new_tokens: int = 8) -> Path:
    """A random 2-layer Llama with `tokenizer_dir`'s tokenizer; fast enough for integration tests.

    `rerank` gives it best-of-N; `min_new_tokens` below `max_new_tokens` lets its captions end early."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out / "decoder")
    tokenizer.save_pretrained(out / "decoder")
    spec = CaptionModelSpec(
        name="tiny-random-llama", embedding_dim=embedding_dim, prefix_length=2, decoder=DecoderSource(path="decoder"),
        generation=GenerationSettings(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens), rerank=rerank,
    )
    save_projector(seeded_projector(spec.embedding_dim, hidden_size, spec.prefix_length, seed), out / spec.projector)
    save_spec(out, spec)
    return out


def make_blank_prone_checkpoint(out: str | Path, tokenizer_dir: str | Path, then: str = "space") -> Path:
    """A tiny checkpoint whose decoder always ranks the stop token first, then `then`, then a visible word.

    `then` is "space" (a whitespace token, so the caption never gets visible text) or "word".
    Weights only, so Triton serves it like any checkpoint: the embedding's dimension 0 is a
    large constant no layer writes to, the final norm keeps only that dimension, and
    lm_head's column 0 holds the ranking.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = Path(make_tiny_checkpoint(out, tokenizer_dir))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = LlamaForCausalLM.from_pretrained(out / "decoder")
    stop = tokenizer.eos_token_id
    space = tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    word = tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 100.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        head = model.get_output_embeddings().weight
        head[:, 0] = 0.0
        head[stop, 0] = 3.0
        head[space, 0] = 2.0 if then == "space" else -1.0
        head[word, 0] = 1.0
    model.save_pretrained(out / "decoder")
    spec = load_checkpoint(out).spec
    save_spec(out, spec.model_copy(update={
        "name": f"blank-prone-{then}",
        "generation": GenerationSettings(max_new_tokens=6, min_new_tokens=0),
    }))
    return out


def make_onnx_text_tower(out: str | Path, tokenizer_dir: str | Path, dim: int = EMBEDDING_DIM, width: int = 32,
                         context_length: int = 77, seed: int = 0) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny random text tower in the ImageBind form: token ids [B, context_length] (0-padded) -> [B, dim].

    The mean of the ids' embeddings over the non-pad positions, projected; the tokenizer is
    `tokenizer_dir`'s `tokenizer.json` with start and end tokens added around every text.
    Returns (model.onnx, tokenizer.json) under `out`, and the torch module it was exported from.
    """
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    start, end = "<|im_start|>", "<|im_end|>"
    tokenizer.post_processor = TemplateProcessing(
        single=f"{start} $A {end}", special_tokens=[(start, tokenizer.token_to_id(start)),
                                                    (end, tokenizer.token_to_id(end))])
    tokenizer.save(str(out / "tokenizer.json"))

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(tokenizer.get_vocab_size(), width)
            self.project = torch.nn.Linear(width, dim, bias=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            keep = (ids != 0).unsqueeze(-1).float()
            pooled = (self.embed(ids) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
            return self.project(pooled)

    torch.manual_seed(seed)
    tower = Tower().eval()
    example = torch.zeros(2, context_length, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(tower, (example,), str(out / "model.onnx"), dynamo=False, input_names=["input_ids"],
                          output_names=["embedding"], opset_version=17,
                          dynamic_axes={"input_ids": {0: "batch"}, "embedding": {0: "batch"}})
    return out / "model.onnx", out / "tokenizer.json", tower


def make_starter_checkpoint(out: str | Path, seed: int = 0) -> Path:
    """SmolLM2-135M-Instruct with a seeded, untrained projector (before a trained model exists)."""
    out = Path(out)
    spec = CaptionModelSpec(
        name="smollm2-135m-untrained-projector", prefix_length=2, decoder=SMOLLM2,
        generation=GenerationSettings(max_new_tokens=24, min_new_tokens=1, stop_tokens=("<|im_end|>",)),
    )
    hidden_size = 576  # SmolLM2-135M
    save_projector(seeded_projector(spec.embedding_dim, hidden_size, spec.prefix_length, seed), out / spec.projector)
    save_spec(out, spec)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m tooling.builders", description=__doc__)
    parser.add_argument("kind", choices=("tiny", "starter"))
    parser.add_argument("out")
    args = parser.parse_args(argv)
    if args.kind == "tiny":
        print(make_tiny_checkpoint(args.out, smollm2_decoder_dir()))
    else:
        print(make_starter_checkpoint(args.out))


if __name__ == "__main__":
    main()
