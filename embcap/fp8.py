"""FP8 (e4m3) projections for the continuous engine: quantise a weight, cast an input, the scaled GEMM.

W8A8 through `torch._scaled_mm`: a weight [N, K] is stored row-major in e4m3 with one fp32 scale
per output channel (so its transpose is the column-major B the GEMM wants); the input is cast to
e4m3 on every call, with either

- a static per-tensor scale, calibrated offline from the checkpoint's own held-out inputs
  (embcap.fp8_calibration) and recorded in the exported config, or
- a per-token scale measured on the fly ("dynamic": one reduction per row and call).

Both use row-wise scales ([M, 1] for the input, [1, N] for the weight, fp32; SM90 since torch 2.5);
the GEMM accumulates in fp32 and writes the serving dtype. Static is the default because it costs
one elementwise kernel per projection where dynamic costs four (a reduction, two on its [M, 1]
scales, the scaled cast), and the decode step is short enough for that to show (docs/engines.md, "FP8 weights").

The GEMM runs on GPUs of compute capability 8.9 and later. Torch's CPU build runs `_scaled_mm`
too (the tests measure the numerics with it), but serving FP8 on the CPU is refused
(`serving_problem`): there it is a reference implementation, several times slower than fp32.
"""

from __future__ import annotations

import re

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
MIN_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0
MIN_TORCH = (2, 5)  # row-wise scaled FP8 GEMMs
ALIGNMENT = 16  # _scaled_mm needs K and N to be multiples of 16
AMAX_FLOOR = 1e-12  # an all-zero row or channel gets this largest value (no division by zero)
# Newer torch builds saturate a cast to e4m3 at +-448; older ones give NaN from 480 on, so there
# the cast is clamped first (one more kernel). The CPU and CUDA casts share one conversion routine.
SATURATING_CAST = torch.tensor([1e4]).to(E4M3).float().item() == E4M3_MAX


def capability_problem(capability: tuple[int, int], name: str = "the GPU") -> str | None:
    """Why a GPU of this compute capability cannot run the FP8 GEMM, or None."""
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    return (f"{name} has compute capability {capability[0]}.{capability[1]}; FP8 weights need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later (Ada, Hopper, Blackwell)")


def torch_problem(version: str = torch.__version__) -> str | None:
    """Why this torch version lacks the row-wise scaled FP8 GEMM, or None."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and (int(found[1]), int(found[2])) >= MIN_TORCH:
        return None
    return f"torch {version} has no row-wise scaled FP8 matrix multiply (needs {MIN_TORCH[0]}.{MIN_TORCH[1]} or later)"


def serving_problem(device: str | torch.device) -> str | None:
    """Why FP8 weights cannot be served on `device`, or None (checked at export and when the model loads)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"FP8 weights are served on a GPU only (compute capability >= {MIN_CAPABILITY[0]}."
                f"{MIN_CAPABILITY[1]}); the decoder runs on {device.type}, whose FP8 matrix multiply is a "
                "slow reference implementation: serve the unquantised weights there")
    problem = torch_problem()
    if problem is None and not torch.cuda.is_available():
        problem = "CUDA is not available to torch here"
    if problem is None:
        index = torch.cuda.current_device() if device.index is None else device.index
        problem = capability_problem(torch.cuda.get_device_capability(index),
                                     f"GPU {index} ({torch.cuda.get_device_name(index)})")
    return problem


def quantise_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], fp32 [N]): each output channel scaled so that its largest |value| is 448."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=AMAX_FLOOR) / E4M3_MAX
    return (weight / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantise(quantised: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3 [N, K] and its [N] (per row) or scalar scale -> the values it stands for, in `dtype`."""
    scale = scale.float()
    return (quantised.float() * (scale[:, None] if scale.ndim else scale)).to(dtype)


def to_e4m3(x: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
    """x (times `multiplier`) in e4m3, saturated at +-448; one kernel where the cast saturates by itself."""
    out = torch.empty(x.shape, dtype=E4M3, device=x.device)
    if SATURATING_CAST:
        return out.copy_(x) if multiplier is None else torch.mul(x, multiplier, out=out)
    scaled = x if multiplier is None else x * multiplier
    return out.copy_(scaled.clamp(-E4M3_MAX, E4M3_MAX))


def e4m3_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b in e4m3, saturated at +-448: the product written straight in e4m3 where the cast saturates."""
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=E4M3, device=a.device)
    return torch.mul(a, b, out=out) if SATURATING_CAST else out.copy_((a * b).clamp_(-E4M3_MAX, E4M3_MAX))


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], fp32 [M, 1]): each row (token) scaled so that its largest |value| is 448."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = scale.clamp_(min=AMAX_FLOOR).mul_(1.0 / E4M3_MAX)
    out = torch.empty(x.shape, dtype=E4M3, device=x.device)
    # |x / scale| <= 448 by construction (rounding stays below 480), so no clamp is needed even where
    # the cast does not saturate.
    return (torch.div(x, scale, out=out) if SATURATING_CAST else out.copy_(x / scale)), scale


class Fp8Linear(nn.Module):
    """y = x @ W.T (+ bias) with W in e4m3 and per-output-channel scales, x cast to e4m3 per call.

    `input_scale` is the static per-tensor scale of x (None: dynamic, per token). With `prescaled`
    the caller hands x already divided by it (folded into the weight of the norm or projection
    that makes x), so the cast is all that is left. `channel_factor` [N] multiplies the output
    channels (how the next projection's input scale is folded into this one). The output is in
    the dtype of `out_dtype`, the serving dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float | None,
                 out_dtype: torch.dtype, prescaled: bool = False, channel_factor: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.shape[0] % ALIGNMENT or weight.shape[1] % ALIGNMENT:
            raise ValueError(f"FP8 weights need both dimensions to be multiples of {ALIGNMENT}, not "
                             f"{list(weight.shape)}")
        if prescaled and input_scale is None:
            raise ValueError("a prescaled input needs a static input scale")
        quantised, scale = quantise_weight(weight)
        scale = scale * (1.0 if input_scale is None else float(input_scale))
        if channel_factor is not None:
            scale = scale * channel_factor.float()
            bias = None if bias is None else bias * channel_factor.to(bias.dtype)
        self.register_buffer("weight", quantised, persistent=False)
        self.register_buffer("scale", scale[None, :].contiguous(), persistent=False)  # [1, N]
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype), persistent=False)
        self.input_scale = None if input_scale is None else float(input_scale)
        self.prescaled = prescaled
        self.out_dtype = out_dtype

    @property
    def dynamic(self) -> bool:
        return self.input_scale is None

    def forward(self, x: torch.Tensor, unit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N]; `unit_rows` is a [rows, 1] fp32 column of ones, at least as long as x has
        rows (a static scale is folded into the weight's, and the GEMM still wants a row-wise input scale).
        A prescaled x may come in e4m3 already (`e4m3_product`)."""
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self.input_scale is None:
            quantised, row_scale = quantise_rows(rows)
        elif rows.dtype == E4M3:
            if not self.prescaled:
                raise ValueError("an e4m3 input must already be divided by the input scale (prescaled)")
            quantised, row_scale = rows, unit_rows[:rows.shape[0]]
        else:
            quantised = to_e4m3(rows, None if self.prescaled else 1.0 / self.input_scale)
            row_scale = unit_rows[:rows.shape[0]]
        # The GEMM adds a bias only into a 16-bit output (a CUDA restriction): an fp32 output adds it after.
        fused_bias = self.bias is not None and self.out_dtype != torch.float32
        out = torch._scaled_mm(quantised, self.weight.t(), scale_a=row_scale, scale_b=self.scale,
                               bias=self.bias if fused_bias else None, out_dtype=self.out_dtype)
        if self.bias is not None and not fused_bias:
            out = out + self.bias
        return out.view(*shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        mode = "dynamic" if self.input_scale is None else f"static {self.input_scale:.3g}"
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, input {mode}, out {self.out_dtype}"


def unit_rows(rows: int, device: torch.device | str) -> torch.Tensor:
    """The [rows, 1] fp32 ones a static-scale Fp8Linear takes as its row-wise input scale."""
    return torch.ones(rows, 1, dtype=torch.float32, device=device)
