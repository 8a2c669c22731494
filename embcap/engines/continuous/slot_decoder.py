"""A Llama-family decode step over a static KV cache whose rows ("slots") sit at their own positions.

This is the tensor half of the continuous engine: it owns the KV cache, runs the
prefill of newly joined rows and one decode step for the first `bucket` slots,
and picks the next token of every slot on the device. Rows come and go between
steps; the caller (embcap.engines.continuous.running_batch) decides which slot holds which row.

Why a forward of our own instead of the model's `forward()`: Hugging Face's caches
keep one length for the whole batch (transformers 5.24's StaticLayer writes at a
single device-side counter), so rows cannot sit at different positions; and the
generic forward builds masks and caches with host-side logic that CUDA graphs
cannot capture. The weights are the engine's own (embcap.lean_llama: q/k/v and
gate/up fused at load time); Hugging Face's modules are neither used nor changed.

On CUDA one decode step per batch-size bucket is captured as a CUDA graph at
start-up: nothing is compiled or written to disk, so it works on a read-only root
with a noexec /tmp.

A model whose projections are FP8 (`LeanLlama.quantise_fp8`) runs them through
embcap.fp8's scaled GEMM; everything else is the same step. `observe`, when set,
sees the input of every unquantised projection (how embcap.fp8_calibration measures
static input scales).

Longer than 250 lines on purpose: the cache layout, the prefill, the captured
step and the token choice must change together.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.nn.functional as F

from embcap.contract import ATTENTION_BACKENDS
from embcap.fp8 import e4m3_product, unit_rows
from embcap.lean_llama import LeanLayer, LeanLlama, unsupported
from embcap.sampling import Sampling, choose_tokens

# embcap.contract.ATTENTION_BACKENDS -> torch.nn.attention.SDPBackend members (a tuning knob).
SDP_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket_sizes(slots: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> list[int]:
    """The captured batch sizes: every default bucket below `slots`, and `slots` itself."""
    return sorted({b for b in buckets if b < slots} | {slots})


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: transformers' `x * cos + rotate_half(x) * sin` in three kernels.

    rotate_half(x) * sin == roll(x, half) * signed_sin, where signed_sin is sin with its first half negated.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def _linear_add(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """residual + x @ weight.T (+ bias), the addition done by the matrix multiply itself (one kernel, not two)."""
    if bias is not None:
        return residual + F.linear(x, weight, bias)
    out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
    return out.view(residual.shape)


class SlotKVDecoder:
    """Prefill and decode for `slots` rows of a Llama-family causal LM, each row at its own position."""

    def __init__(
        self,
        model: LeanLlama,
        slots: int,
        max_length: int,
        stop_ids: list[int],
        sampling: Sampling | None = None,
        use_graphs: bool | None = None,
        attention_backend: str = "auto",
    ) -> None:
        problems = unsupported(model.config, max_length)
        if problems:
            raise ValueError(f"the continuous engine does not implement {'; '.join(problems)}: export with --engine hf")
        self.model = model
        self.layers: list[LeanLayer] = list(model.layers)
        shape = model.shape
        self.head_dim, self.scaling, self.eps = shape.head_dim, shape.scaling, shape.eps
        self.heads, self.kv_heads = shape.heads, shape.kv_heads
        self.group = self.heads // self.kv_heads
        self.intermediate = shape.intermediate
        self.slots = slots
        self.sampling = sampling
        self.device, self.dtype = model.device, model.dtype
        self.vocab_size = int(model.lm_head.shape[0])

        device = self.device
        # The cache length is padded to a multiple of 16 so attention kernels need no aligned copy of the mask.
        max_length = -(-max_length // 16) * 16
        self.max_length = max_length
        cache = (len(self.layers), slots, self.kv_heads, max_length, self.head_dim)
        self.keys = torch.zeros(cache, dtype=self.dtype, device=device)
        self.values = torch.zeros(cache, dtype=self.dtype, device=device)
        self.arange = torch.arange(max_length, device=device)
        self.slot_index = torch.arange(slots, device=device)
        cos, sin = model.rotary(max_length)  # [max_length, head_dim]
        half = self.head_dim // 2
        self.cos = cos
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

        self.stop_mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        self.stop_mask[torch.tensor(stop_ids, dtype=torch.long, device=device)] = True
        # Inputs and outputs of a decode step; a captured graph reads and writes these very tensors.
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.ban_stop = torch.zeros(slots, dtype=torch.bool, device=device)
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        # Per slot: take the argmax, or draw from this stream (embcap.sampling); set when a row joins.
        self.greedy = torch.ones(slots, dtype=torch.bool, device=device)
        self.streams = torch.zeros(slots, dtype=torch.long, device=device)

        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, not {attention_backend!r}")
        self.attention_backend = attention_backend
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        # Static FP8 scales still need a row-wise input scale of ones: sized for the longest prefill
        # (every slot's whole length) and never reallocated, since captured graphs read it.
        self.unit_rows = unit_rows(slots * max_length, device) if model.fp8_mode == "static" else None
        # (layer, projection name, its input) for each unquantised projection; None: nobody is looking.
        self.observe: Callable[[LeanLayer, str, torch.Tensor], None] | None = None

    # ----------------------------------------------------------------- sampling
    def _choose(self, logits: torch.Tensor, ban_stop: torch.Tensor, slots: torch.Tensor | slice,
                positions: torch.Tensor) -> torch.Tensor:
        """[N, V] logits of `slots` -> [N] token ids (stop tokens banned where `ban_stop` is set);
        `positions` are where the chosen tokens will sit (the sampling streams' counters)."""
        logits = logits.float().masked_fill(ban_stop[:, None] & self.stop_mask[None, :], float("-inf"))
        return choose_tokens(logits, self.greedy[slots], self.streams[slots], positions, self.sampling)

    def _attention_backends(self):
        """The decode step's attention kernel: PyTorch's choice, or the one `attention_backend` names."""
        if self.attention_backend == "auto":
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel([getattr(torch.nn.attention.SDPBackend, SDP_BACKENDS[self.attention_backend])])

    # ------------------------------------------------------------------ layers
    def _norm(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm with the model's epsilon, as one fused kernel."""
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _observed(self, layer: LeanLayer, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.observe is not None:
            self.observe(layer, name, x)
        return x

    def _qkv(self, layer: LeanLayer, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor):
        """x [..., H] -> rotated q [..., heads, D], rotated k and v [..., kv_heads, D] (cos/sin [..., 1, D])."""
        fp8 = layer.fp8
        if fp8 is None:
            qkv = F.linear(self._observed(layer, "qkv", self._norm(layer.input_norm, x)), layer.qkv, layer.qkv_bias)
        else:
            qkv = fp8.qkv(self._norm(fp8.input_norm, x), self.unit_rows)
        qkv = qkv.unflatten(-1, (-1, self.head_dim))
        rotary = self.heads + self.kv_heads
        qk = _rotate(qkv[..., :rotary, :], cos, signed_sin)
        return qk[..., :self.heads, :], qk[..., self.heads:, :], qkv[..., rotary:, :]

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean attention mask as the additive float mask attention kernels use (made once per step)."""
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))

    def _attention_out(self, layer: LeanLayer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """x + the o projection of the attention output [..., heads x D]."""
        if layer.fp8 is None:
            return _linear_add(x, self._observed(layer, "o", attended), layer.o, layer.o_bias)
        return x + layer.fp8.o(attended, self.unit_rows)

    def _mlp(self, layer: LeanLayer, x: torch.Tensor) -> torch.Tensor:
        """x + the layer's MLP of x."""
        fp8 = layer.fp8
        if fp8 is not None:
            gate, up = fp8.gate_up(self._norm(fp8.post_norm, x), self.unit_rows).split(self.intermediate, -1)
            if fp8.down.dynamic:
                return x + fp8.down(self.model.act_fn(gate) * up)
            # prescaled by the up half's output scale: the product is written in e4m3 at once (no cast kernel)
            return x + fp8.down(e4m3_product(self.model.act_fn(gate), up), self.unit_rows)
        normed = self._observed(layer, "gate_up", self._norm(layer.post_norm, x))
        gate, up = F.linear(normed, layer.gate_up, layer.gate_up_bias).split(self.intermediate, -1)
        return _linear_add(x, self._observed(layer, "down", self.model.act_fn(gate) * up), layer.down, layer.down_bias)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H] last hidden states -> [N, V] logits."""
        return F.linear(self._norm(self.model.final_norm, x), self.model.lm_head)

    # ----------------------------------------------------------------- prefill
    def _prompt_hidden(self, leaders: torch.Tensor, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Run [N, T, H] embeddings at positions start.. in the `leaders` slots, writing their KV; the last
        layer's hidden states [N, T, H]."""
        length = embeds.shape[1]
        end = start + length
        cos, sin = self.cos[start:end][None, :, None], self.signed_sin[start:end][None, :, None]  # [1, T, 1, D]
        causal = self._additive(torch.ones(length, end, dtype=torch.bool, device=self.device).tril(diagonal=start))
        x = embeds.to(device=self.device, dtype=self.dtype)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.keys[i][leaders, :, start:end] = k.transpose(1, 2)
            self.values[i][leaders, :, start:end] = v.transpose(1, 2)
            keys = self.keys[i][leaders, :, :end].repeat_interleave(self.group, dim=1)
            values = self.values[i][leaders, :, :end].repeat_interleave(self.group, dim=1)
            attended = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=causal,
                                                      scale=self.scaling)
            x = self._attention_out(layer, x, attended.transpose(1, 2).flatten(2))
            x = self._mlp(layer, x)
        return x

    @torch.inference_mode()
    def sequence_logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, T, V] at every position of [N, T, H] embeddings run from position 0 in slots
        0..N-1 (teacher-forced scoring, for measuring numerics; it overwrites those slots' cache)."""
        leaders = torch.arange(embeds.shape[0], device=self.device)
        return self._logits(self._prompt_hidden(leaders, embeds, 0)).float()

    @torch.inference_mode()
    def prefill(self, groups: list[list[int]], embeds: torch.Tensor, start: int, ban_stop: torch.Tensor,
                greedy: torch.Tensor | None = None, streams: torch.Tensor | None = None) -> torch.Tensor:
        """Run [N, T, H] prompt embeddings at positions start.. once per group of slots; returns the first
        token of every slot, groups in order, [sum of group sizes].

        Group i's prompt runs once, in its first slot; its KV is then copied into the group's other slots,
        which choose their own first tokens from the same logits (the candidates of one row). `ban_stop`,
        `greedy` and `streams` are per slot, in the same order (default: greedy). Positions before
        `start` of each group's first slot must already hold the prompt's KV (see `copy_prefix`).
        """
        count, length = embeds.shape[:2]
        if len(groups) != count or any(not group for group in groups):
            raise ValueError(f"{count} prompts need {count} non-empty slot groups, got {groups}")
        end = start + length
        leaders = torch.tensor([group[0] for group in groups], dtype=torch.long, device=self.device)
        logits = self._logits(self._prompt_hidden(leaders, embeds, start)[:, -1])
        sizes = torch.tensor([len(group) for group in groups], device=self.device)
        slots = torch.tensor([slot for group in groups for slot in group], dtype=torch.long, device=self.device)
        if len(slots) > count:  # the other candidates of each row share its prompt's cache
            followers = torch.cat([torch.tensor(group[1:], dtype=torch.long) for group in groups]).to(self.device)
            sources = leaders.repeat_interleave(sizes - 1)
            self.keys[:, followers, :, :end] = self.keys[:, sources, :, :end]
            self.values[:, followers, :, :end] = self.values[:, sources, :, :end]
        self.greedy[slots] = True if greedy is None else greedy.to(self.device)
        self.streams[slots] = 0 if streams is None else streams.to(self.device)
        positions = torch.full((len(slots),), end, dtype=torch.long, device=self.device)
        tokens = self._choose(logits.repeat_interleave(sizes, dim=0), ban_stop.to(self.device), slots, positions)
        self.tokens[slots] = tokens
        self.positions[slots] = end
        return tokens

    @torch.inference_mode()
    def prompt_start(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of a prompt start shared by every row ([1, T, H] embeddings), computed once in slot 0."""
        length = embeds.shape[1]
        ban = torch.zeros(1, dtype=torch.bool, device=self.device)
        self.prefill([[0]], embeds, 0, ban)
        return self.keys[:, 0, :, :length].clone(), self.values[:, 0, :, :length].clone()

    @torch.inference_mode()
    def copy_prefix(self, slots: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put a shared prompt start's KV ([layers, kv_heads, T, D]) at positions 0.. of `slots`."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        length = keys.shape[2]
        self.keys[:, index, :, :length] = keys[:, None]
        self.values[:, index, :, :length] = values[:, None]

    @torch.inference_mode()
    def move_slot(self, source: int, target: int) -> None:
        """Move a row's cache, next token and position from slot `source` to slot `target`."""
        self.keys[:, target] = self.keys[:, source]
        self.values[:, target] = self.values[:, source]
        self.tokens[target] = self.tokens[source]
        self.positions[target] = self.positions[source]
        self.greedy[target] = self.greedy[source]
        self.streams[target] = self.streams[source]

    # ------------------------------------------------------------------ decode
    def _decode(self, batch: int) -> None:
        """One step for slots [0, batch): reads tokens/positions/ban_stop, writes next_tokens, advances."""
        tokens, positions = self.tokens[:batch], self.positions[:batch]
        slot = self.slot_index[:batch]
        cos, sin = self.cos[positions][:, None], self.signed_sin[positions][:, None]  # [B, 1, D]
        mask = self._additive(self.arange[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, L]
        x = self.model.embed(tokens)  # [B, H]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            keys, values = self.keys[i], self.values[i]
            keys[slot, :, positions] = k
            values[slot, :, positions] = v
            # Grouped-query attention without copying the cache: the `group` query heads that share a
            # KV head attend as `group` queries of one position over that head's keys.
            with self._attention_backends():
                attended = F.scaled_dot_product_attention(q.view(batch, self.kv_heads, self.group, self.head_dim),
                                                          keys[:batch], values[:batch], attn_mask=mask,
                                                          scale=self.scaling)
            x = self._attention_out(layer, x, attended.reshape(batch, -1))
            x = self._mlp(layer, x)
        self.next_tokens[:batch] = self._choose(self._logits(x), self.ban_stop[:batch], slice(0, batch), positions + 1)
        tokens.copy_(self.next_tokens[:batch])
        positions.add_(1).clamp_(max=self.max_length - 1)  # free slots run on harmlessly at the end

    @torch.inference_mode()
    def decode(self, batch: int) -> torch.Tensor:
        """Decode one token for slots [0, batch) (captured graph when available); returns next_tokens[:batch]."""
        graph = self.graphs.get(batch)
        if graph is not None:
            graph.replay()
        else:
            self._decode(batch)
        return self.next_tokens[:batch]

    def time_step(self, batch: int) -> float:
        """Seconds one decode step of slots [0, batch) takes, after one untimed step (first-call costs). Only
        while no row decodes: the slots' tokens and positions are reset afterwards, as after a capture."""
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            self.decode(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings.append(time.perf_counter() - started)
        self.tokens.zero_()
        self.positions.zero_()
        return timings[-1]

    def capture(self, buckets: list[int]) -> None:
        """Capture one CUDA graph per batch size in `buckets` (largest first, one shared memory pool)."""
        if not self.use_graphs:
            return
        started = time.perf_counter()
        pool = None
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for batch in sorted(buckets, reverse=True):
                    self._decode(batch)  # warm-up: kernel selection and workspace allocation
            torch.cuda.current_stream().wait_stream(stream)
            for batch in sorted(buckets, reverse=True):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._decode(batch)
                pool = graph.pool()
                self.graphs[batch] = graph
            torch.cuda.synchronize()
        self.tokens.zero_()
        self.positions.zero_()
        self.capture_seconds = time.perf_counter() - started
