"""FP8 projections on the CPU: quantise, scaled GEMM and de-quantise against fp32/bf16, through torch's CPU
`_scaled_mm` (the GEMM a GPU runs; its numerics, not its speed)."""

from __future__ import annotations

import pytest
import torch

from embcap import fp8
from embcap.fp8 import E4M3_MAX, Fp8Linear, dequantise, e4m3_product, quantise_rows, quantise_weight, to_e4m3
from embcap.lean_llama import fp8_unsupported

E4M3_STEP = 2.0 ** -3  # e4m3 has 3 mantissa bits: neighbouring normal values are 1/8 apart (relative)
SUBNORMAL_STEP = 2.0 ** -9  # below 2^-6 its values are multiples of 2^-9


def weights(rows: int = 48, columns: int = 64, seed: int = 0) -> torch.Tensor:
    """Channels of very different sizes, one of them all zero."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * torch.logspace(-3, 1, rows)[:, None]
    weight[5] = 0.0
    return weight


def test_a_quantised_weight_is_within_half_a_step_of_e4m3_per_output_channel():
    weight = weights()
    quantised, scale = quantise_weight(weight)
    assert quantised.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (48,)
    back = dequantise(quantised, scale)
    assert torch.isfinite(back).all() and back[5].abs().max() == 0  # the zero channel stays zero, no NaN
    # each channel's largest value maps onto e4m3's largest exactly ...
    torch.testing.assert_close(back.abs().amax(1), weight.abs().amax(1), rtol=1e-6, atol=0)
    # ... and every value rounds to its nearest e4m3 neighbour: within half a step (relative), or half a
    # subnormal step of the channel's scale for the smallest values
    bound = torch.maximum(weight.abs() * E4M3_STEP / 2, scale[:, None] * SUBNORMAL_STEP / 2)
    assert ((back - weight).abs() <= bound * (1 + 1e-6)).all()
    assert (back - weight).abs().max() > 0  # it did quantise


def test_the_cast_saturates_at_448_instead_of_overflowing():
    x = torch.tensor([1e4, -1e4, 500.0, 448.0, 1.0, 0.0])
    for cast in (to_e4m3(x), to_e4m3(x / 2, 2.0), to_e4m3(x.bfloat16()), e4m3_product(x / 4, torch.tensor(4.0))):
        assert cast.float().tolist() == [E4M3_MAX, -E4M3_MAX, E4M3_MAX, E4M3_MAX, 1.0, 0.0]


def test_a_product_written_in_e4m3_is_the_cast_of_the_product():
    """How the down projection's input skips a cast kernel: silu(gate) * up written straight in e4m3."""
    a, b = torch.randn(4, 64).bfloat16() * 30, torch.randn(4, 64).bfloat16() * 30
    assert torch.equal(e4m3_product(a, b).float(), to_e4m3(a * b).float())
    linear = Fp8Linear(weights(), None, 0.5, torch.bfloat16, prescaled=True)
    ones = fp8.unit_rows(4, "cpu")
    assert torch.equal(linear(e4m3_product(a, b), ones), linear(a * b, ones))
    with pytest.raises(ValueError, match="prescaled"):
        Fp8Linear(weights(), None, 0.5, torch.bfloat16)(e4m3_product(a, b), ones)


def test_per_token_scales_put_each_rows_largest_value_on_448():
    x = torch.randn(5, 32) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]
    quantised, scale = quantise_rows(x)
    assert scale.shape == (5, 1) and scale.dtype == torch.float32
    assert quantised.float().abs().amax(1)[:4].tolist() == [E4M3_MAX] * 4
    assert quantised[4].float().abs().max() == 0 and torch.isfinite(scale).all()  # a zero row: no NaN
    back = quantised.float() * scale
    assert ((back - x).abs() <= x.abs() * E4M3_STEP / 2 + scale * SUBNORMAL_STEP / 2 + 1e-12).all()


@pytest.mark.parametrize("mode", ["static", "static prescaled", "dynamic"])
def test_the_scaled_gemm_is_the_product_of_its_dequantised_operands(mode):
    """The scale plumbing exactly: [M,1] x [1,N] scales, the folded input scale, the bias, the channel factor."""
    x = torch.randn(7, 64) * 3
    weight, bias = weights(), torch.randn(48)
    factor = torch.linspace(0.5, 2.0, 48)
    input_scale = None if mode == "dynamic" else x.abs().max().item() / E4M3_MAX
    prescaled = mode == "static prescaled"
    linear = Fp8Linear(weight, bias, input_scale, torch.float32, prescaled=prescaled, channel_factor=factor)
    given = x / input_scale if prescaled else x
    out = linear(given, fp8.unit_rows(16, "cpu"))
    if input_scale is None:
        q, row_scale = quantise_rows(x)
        x_back = q.float() * row_scale
    else:
        x_back = to_e4m3(x, 1 / input_scale).float() * input_scale
    w_q, w_scale = quantise_weight(weight)
    expected = (x_back @ dequantise(w_q, w_scale).T) * factor + bias * factor
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)  # fp32 accumulation order apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_scale", [None, "calibrated"])
def test_against_the_unquantised_linear_the_error_is_that_of_two_e4m3_roundings(dtype, input_scale):
    x, weight, bias = torch.randn(16, 64), torch.randn(48, 64) * 0.05, torch.randn(48) * 0.1
    scale = None if input_scale is None else x.abs().max().item() / E4M3_MAX
    out = Fp8Linear(weight.to(dtype), bias.to(dtype), scale, dtype)(x.to(dtype), fp8.unit_rows(16, "cpu"))
    assert out.dtype == dtype and out.shape == (16, 48)
    exact = x @ weight.T + bias
    error = (out.float() - exact).norm() / (exact - bias).norm()
    # each product carries two roundings of at most half a step (1/16) each; their errors are independent,
    # so the output's relative error is about 1/16 x sqrt(2/3) (uniform rounding): bound it by 1/16
    assert 0.005 < error < 1 / 16, error


def test_a_static_input_beyond_its_calibrated_range_is_clipped_not_overflowed():
    weight = torch.eye(64)[:48]
    linear = Fp8Linear(weight, None, 1.0 / E4M3_MAX, torch.float32)  # calibrated for |x| <= 1
    out = linear(torch.full((2, 64), 5.0), fp8.unit_rows(2, "cpu"))
    assert torch.isfinite(out).all() and out.max().item() == pytest.approx(1.0)


def test_sizes_that_are_not_multiples_of_16_are_refused():
    with pytest.raises(ValueError, match=r"multiples of 16.*\[40, 64\]"):
        Fp8Linear(torch.randn(40, 64), None, None, torch.float32)
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=72, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    assert fp8_unsupported(config) == ["hidden_size 72 is not a multiple of 16",  # heads of 18: q/k/v 144 is
                                       "attention output (heads x head_dim) 72 is not a multiple of 16"]
    assert fp8_unsupported(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=2)) == []


def test_fp8_is_served_only_on_gpus_of_compute_capability_8_9_and_later():
    assert "compute capability 8.0; FP8 weights need 8.9 or later" in fp8.capability_problem((8, 0), "GPU 0 (A100)")
    assert "GPU 0 (A100)" in fp8.capability_problem((8, 0), "GPU 0 (A100)")
    assert fp8.capability_problem((7, 5)) is not None
    assert [fp8.capability_problem(c) for c in ((8, 9), (9, 0), (10, 0), (12, 0))] == [None] * 4
    assert "needs 2.5" in fp8.torch_problem("2.4.1+cu121") and fp8.torch_problem("2.13.0+cpu") is None
    assert "GPU only" in fp8.serving_problem("cpu") and "runs on cpu" in fp8.serving_problem("cpu")
