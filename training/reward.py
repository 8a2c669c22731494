"""Objectives that train the generator against the reranker's score, beside plain cross-entropy.

Per training row the model samples K captions from its own streams (`training.rollout`, the checkpoint's
rerank sampling), and each caption's reward is the cosine, in the checkpoint's reranking encoder
(`embcap.candidate_encoders.load_text_encoder`, any `TextEncoder`), between the caption and the row's target:
the reference text encoded by the same encoder, or a vector column of the data (the evaluator's
`description_embed`, when the encoder is the tower that made it).

- `reward`: REINFORCE with a baseline (Rennie et al. 2017): `others`, each sample's baseline is the mean
  reward of the row's other samples (the multi-sample variant), or `greedy`, the reward of the row's greedy
  caption (self-critical). The advantages are divided by their standard deviation over the batch, and the
  policy term is a per-token mean, so `--ce-weight` weighs it against the cross-entropy per token.
- `raft`: best-of-N distillation (RAFT): the greedy caption and K-1 samples per row, cross-entropy on the one
  with the highest reward.

Both add `--ce-weight` times the cross-entropy on the reference caption, which keeps the text fluent.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import numpy as np
import torch

from embcap.candidate_encoders import TextEncoder
from embcap.generation import BLANK_FALLBACK, CaptionGenerator
from embcap.projector import Projector
from embcap.sampling import Sampling
from evaluate.fluency import fluency
from training.rollout import Rollout, sample_captions, step_streams
from training.sequences import caption_ids, token_logprobs

OBJECTIVES = ("ce", "reward", "raft")
CE, REWARD, RAFT = OBJECTIVES
BASELINES = ("others", "greedy")
TEXT_TARGET = "text"  # the reference caption encoded by the reward encoder
AUTO_TARGET = "auto"
DESCRIPTION_EMBED = "description_embed"
# --reward-target auto takes the column when the encoder reproduces it this closely on the first rows
SAME_SPACE_COSINE = 0.95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The objective's options (a group of `python -m training`)."""
    group = parser.add_argument_group("objective: cross-entropy, or reward fine-tuning from a checkpoint")
    group.add_argument("--objective", choices=OBJECTIVES, default=CE,
                       help="'ce': cross-entropy on the reference captions; 'reward': sample --samples captions per "
                            "row and reinforce those the reranking encoder scores closer to the reference; 'raft': "
                            "cross-entropy on the best of the greedy caption and --samples - 1 samples (reward and "
                            "raft need --init-from)")
    group.add_argument("--init-from", type=str, default=None,
                       help="a checkpoint folder to continue: its projector, decoder, prompt, generation and rerank "
                            "settings (its reranking encoder gives the reward), and with the wordnet data its "
                            "heldout.txt as the held-out split (default: none, a fresh projector)")
    group.add_argument("--samples", type=int, default=8, help="captions sampled per row (K) by reward and raft")
    group.add_argument("--reward-baseline", choices=BASELINES, default="others",
                       help="reward: 'others' (mean reward of the row's other samples) or 'greedy' (the reward of "
                            "the row's greedy caption, self-critical)")
    group.add_argument("--ce-weight", type=float, default=0.5,
                       help="reward and raft: weight of the cross-entropy on the reference caption (fluency)")
    group.add_argument("--reward-target", default=AUTO_TARGET,
                       help="what the captions are compared with: 'text' (the reference encoded by the reward "
                            f"encoder), a vector column of the parquet data, or 'auto' ({DESCRIPTION_EMBED} when the "
                            "data has it and the encoder reproduces it, else text)")


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse combinations that cannot train."""
    if args.objective != CE and args.init_from is None:
        parser.error(f"--objective {args.objective} starts from a trained checkpoint: give --init-from")
    if args.samples < 2 and args.objective != CE:
        parser.error("--samples must be at least 2")
    if args.ce_weight < 0:
        parser.error("--ce-weight must be at least 0")


@dataclass(frozen=True)
class ObjectiveSettings:
    """What an objective does; recorded in training.json and the model card."""

    name: str
    samples: int
    baseline: str
    ce_weight: float
    target: str
    temperature: float
    top_k: int
    top_p: float

    def record(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One sentence for the model card."""
        if self.name == CE:
            return "cross-entropy on the reference captions"
        target = "the reference encoded by it" if self.target == TEXT_TARGET else f"the data's `{self.target}`"
        sampling = f"temperature {self.temperature}, top-k {self.top_k}, top-p {self.top_p}"
        if self.name == REWARD:
            head = (f"REINFORCE: {self.samples} captions sampled per row ({sampling}), reward = cosine in the "
                    f"reranking encoder between a caption and {target}, baseline "
                    + ("the mean reward of the row's other samples" if self.baseline == "others"
                       else "the reward of the row's greedy caption"))
        else:
            head = (f"best-of-{self.samples} distillation (RAFT): cross-entropy on the caption with the highest "
                    f"reward (cosine in the reranking encoder to {target}) among the greedy one and "
                    f"{self.samples - 1} sampled ({sampling})")
        return f"{head}; plus {self.ce_weight} x cross-entropy on the reference caption"


class RewardObjective:
    """The loss of one micro-batch under `reward` or `raft`, with what it saw (rewards, sample fluency)."""

    def __init__(self, settings: ObjectiveSettings, generator: CaptionGenerator, projector: Projector,
                 encoder: TextEncoder, end_id: int, max_new_tokens: int, max_caption_tokens: int, seed: int) -> None:
        self.settings, self.generator, self.projector, self.encoder = settings, generator, projector, encoder
        self.end_id, self.max_new_tokens, self.max_caption_tokens, self.seed = (end_id, max_new_tokens,
                                                                                 max_caption_tokens, seed)
        self.sampling = Sampling(settings.temperature, settings.top_k, settings.top_p, seed)

    def rewards(self, texts: list[str], targets: np.ndarray) -> np.ndarray:
        """Cosine of each caption with its row's unit target (a blank caption counts as the fallback served)."""
        vectors = self.encoder.encode([text if text.strip() else BLANK_FALLBACK for text in texts])
        return np.sum(vectors * targets, axis=1).astype(np.float32)

    def _rollout(self, prefix: torch.Tensor, rows: list[int], step: int, greedy: list[bool]) -> Rollout:
        sampling = self.sampling if not all(greedy) else None
        return sample_captions(self.generator, prefix, greedy, sampling,
                               step_streams(self.seed, step, rows, len(greedy)),
                               self.max_new_tokens)

    def loss(self, rows: list[int], inputs: torch.Tensor, references: list[str], targets: np.ndarray,
             step: int) -> tuple[torch.Tensor, dict]:
        """(loss to back-propagate, statistics) of the rows `rows` with conditioning `inputs` and unit `targets`."""
        settings, count = self.settings, self.settings.samples
        prefix = self.projector(inputs.to(self.generator.device))
        prompt = self.generator.prompt_embeddings(prefix)
        greedy = [settings.name == RAFT] + [False] * (count - 1)
        rollout = self._rollout(prefix.detach(), rows, step, greedy)
        rewards = self.rewards(rollout.texts, np.repeat(targets, count, axis=0)).reshape(len(rows), count)
        stats = {"reward": float(rewards[:, int(settings.name == RAFT):].mean()),
                 "reward_best": float(rewards.max(axis=1).mean())}
        references_ids = caption_ids(self.generator.tokenizer, references, self.end_id, self.max_caption_tokens)
        if settings.name == RAFT:
            best = rewards.argmax(axis=1)
            chosen = [rollout.tokens[row * count + int(best[row])] for row in range(len(rows))]
            logprobs, mask = token_logprobs(self.generator, torch.cat([prompt, prompt]), chosen + references_ids)
            policy = -(logprobs[:len(rows)] * mask[:len(rows)]).sum() / mask[:len(rows)].sum()
            stats["greedy_chosen"] = float(np.mean(best == 0))
        else:
            if settings.baseline == "others":
                baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (count - 1)
            else:
                greedy_rollout = self._rollout(prefix.detach(), rows, step, [True])
                greedy_rewards = self.rewards(greedy_rollout.texts, targets)
                baseline = np.repeat(greedy_rewards[:, None], count, axis=1)
                stats["reward_greedy"] = float(greedy_rewards.mean())
            advantage = (rewards - baseline).reshape(-1)
            advantage = advantage / max(float(advantage.std()), 1e-3)
            prompts = torch.cat([prompt.repeat_interleave(count, dim=0), prompt])
            logprobs, mask = token_logprobs(self.generator, prompts, rollout.tokens + references_ids)
            sampled = len(rollout.tokens)
            weights = torch.as_tensor(advantage, dtype=logprobs.dtype, device=logprobs.device)[:, None]
            policy = -(weights * logprobs[:sampled] * mask[:sampled]).sum() / mask[:sampled].sum()
        reference_ce = -(logprobs[-len(rows):] * mask[-len(rows):]).sum() / mask[-len(rows):].sum()
        samples = fluency(rollout.texts)
        stats.update(ce=float(reference_ce.detach()), sample_degenerate=samples.degenerate,
                     sample_unended=float(np.mean([not ended for ended in rollout.ended])),
                     sample_words=samples.mean_words)
        return policy + settings.ce_weight * reference_ce, stats


__all__ = ["AUTO_TARGET", "BASELINES", "CE", "DESCRIPTION_EMBED", "OBJECTIVES", "RAFT", "REWARD", "ObjectiveSettings",
           "RewardObjective", "SAME_SPACE_COSINE", "TEXT_TARGET", "add_arguments", "check_arguments"]
