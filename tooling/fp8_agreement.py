"""FP8 projections against the unquantised decoder on the same prefix vectors: greedy captions and
teacher-forced next-token agreement (top-1, KL).

Shared by the held-out quality comparison (evaluate.fp8_quality) and the GPU decoder benchmark's
real-weights agreement (bench.gpu_decoder): both decode the same greedy rows the same way.
"""

from __future__ import annotations

import numpy as np


def prefix_of(resolved, embeddings: np.ndarray):
    """The projector's prefix vectors [N, P, H] for [N, E] embeddings."""
    import torch

    with torch.inference_mode():
        return resolved.load_projector()(torch.from_numpy(np.ascontiguousarray(embeddings))).numpy()


def fp8_generator(resolved, base, device: str, dtype, mode: str, scales):
    """A generator over the checkpoint's decoder with FP8 projections (`mode` static or dynamic)."""
    from embcap.generation import CaptionGenerator
    from embcap.lean_llama import LeanLlama

    lean = LeanLlama.from_pretrained(resolved.decoder_dir, device, dtype).quantise_fp8(
        scales if mode == "static" else None)
    return CaptionGenerator(base.spec, lean, base.tokenizer)


def greedy_tokens(generator, prefix: np.ndarray, slots: int = 16) -> list[list[int]]:
    """Each row's greedy caption tokens (the caption rules applied, as served)."""
    from embcap.engines.continuous.running_batch import RunningBatch

    tokens: dict[int, list[int]] = {}
    for start in range(0, len(prefix), slots):
        rows = prefix[start:start + slots]
        batch = RunningBatch(generator, slots=len(rows), use_graphs=False)
        batch.add(rows, list(range(start, start + len(rows))))
        while batch.active:
            batch.step()
            tokens.update({row.key: row.tokens for row in batch.take_finished()})
    return [tokens[i] for i in range(len(prefix))]


def teacher_forced(reference, other, prefix: np.ndarray, tokens: list[list[int]], chunk: int = 16) -> dict:
    """Top-1 agreement and mean KL(reference || other) of next-token predictions along `tokens`."""
    import torch

    from embcap.engines.continuous.slot_decoder import SlotKVDecoder

    agree = kl = count = 0.0
    for start in range(0, len(prefix), chunk):
        rows = tokens[start:start + chunk]
        length = max(len(t) for t in rows)
        ids = torch.tensor([t + [t[-1]] * (length - len(t)) for t in rows])
        mask = torch.tensor([[True] * len(t) + [False] * (length - len(t)) for t in rows])
        predictions = []
        for generator in (reference, other):
            decoder = SlotKVDecoder(generator.lean, len(rows), generator.prompt_length + length,
                                    generator.stop_ids, use_graphs=False)
            with torch.inference_mode():
                embeds = torch.cat([generator.prompt_embeddings(torch.from_numpy(prefix[start:start + chunk])),
                                    generator.lean.embed(ids.to(generator.device))], dim=1)
                logits = decoder.sequence_logits(embeds)
            first = generator.prompt_length - 1  # the prompt's last position predicts the first token
            predictions.append(logits[:, first:first + length].log_softmax(-1).cpu())
        ref, oth = predictions
        agree += (ref.argmax(-1) == oth.argmax(-1))[mask].sum().item()
        kl += (ref.exp() * (ref - oth)).sum(-1)[mask].sum().item()
        count += mask.sum().item()
    return {"top1_agreement": agree / count, "kl": kl / count, "tokens": int(count)}


def greedy_agreement(resolved, device: str, dtype, modes: list[str], rows: int = 32) -> dict:
    """Per FP8 mode, against the unquantised decoder on `rows` held-out rows: identical greedy captions and
    teacher-forced top-1 agreement (the real weights' agreement bench.gpu_decoder reports)."""
    from embcap.fp8_calibration import CALIBRATION_ROWS, calibrate, heldout_rows

    base = resolved.load_generator(device, dtype, lean=True)
    checkpoint = resolved.checkpoint
    scales = calibrate(base, prefix_of(resolved, heldout_rows(checkpoint, 0, CALIBRATION_ROWS).embeddings))
    prefix = prefix_of(resolved, heldout_rows(checkpoint, CALIBRATION_ROWS, rows).embeddings)
    reference = greedy_tokens(base, prefix)
    result = {"checkpoint": str(checkpoint.root), "rows": len(prefix)}
    for mode in modes:
        other = fp8_generator(resolved, base, device, dtype, mode, scales)
        tokens = greedy_tokens(other, prefix)
        result[mode] = {"identical_captions": sum(a == b for a, b in zip(reference, tokens)) / len(prefix),
                        **teacher_forced(base, other, prefix, reference)}
    return result
