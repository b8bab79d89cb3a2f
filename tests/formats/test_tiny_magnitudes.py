"""Tiny tensors quantize like any other: every search is exponent-normalized (``formats.nvfp4`` docstring).

The property: for an exact power-of-two rescale ``w * 2^-100`` (about 1e-30) with its own global scale, every
block-scale search (max, mse, weighted_mse, four_over_six, the global-scale search; reference and torch
twins) returns the block scales of ``w``, the codes are those of ``w``, and the decoded relative error is
that of ``w``, exactly. It holds when the arithmetic on ``w`` itself has no subnormal intermediate, which
these weights satisfy (asserted: no magnitude below 2^-30 of the max, so no residual squares below 2^-126).
Before the normalization, the MSE searches returned ~100% relative squared error at this magnitude.
"""

from __future__ import annotations

import pytest
import torch

from moequant import kernels
from moequant.formats import fp8
from moequant.formats.fp8 import dequantize_fp8_tensor, fp8_tensor_scale, quantize_fp8_tensor
from moequant.formats.global_search import GLOBAL_FACTORS
from moequant.formats.global_search import reference_block_search, search_global
from moequant.formats.mse import search_block_scales_reference
from moequant.formats.nvfp4 import (MIN_WEIGHT_AMAX, NORMALIZE_BELOW, dequantize_nvfp4, exponent_normalized, global_scale_from_amax,
                                    quantize_nvfp4, tensor_amax, weight_squared_error)
from moequant.formats.weighted_mse import search_weighted_reference, weighted_weight_error
from moequant.kernels import torch_mse, torch_weighted

TINY = 2.0**-100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(dtype=torch.float32) -> torch.Tensor:
    """[3, 32, 128] Student-t-ish experts of different magnitudes (heavy tails give MSE something to do)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 32, 128, generator=gen) / (torch.rand(3, 32, 128, generator=gen) + 0.2)
    w = (w * torch.tensor([0.02, 0.3, 1.5]).reshape(3, 1, 1)).to(dtype)
    amax = w.abs().amax()
    assert float(w.abs()[w != 0].min()) > float(amax) * 2.0**-30  # the precondition of the module docstring
    assert torch.equal((w * TINY) / TINY, w)  # the rescale is exact
    return w


def _global(w: torch.Tensor) -> torch.Tensor:
    return global_scale_from_amax(tensor_amax(w, 1))


H = torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.01

SEARCHES = {
    "reference max": lambda w, g: search_block_scales_reference(w, g, "max"),
    "reference mse": lambda w, g: search_block_scales_reference(w, g, "mse"),
    "reference weighted_mse": lambda w, g: search_weighted_reference(w, g, H),
    "reference four_over_six": lambda w, g: reference_block_search("four_over_six")(w, g, None)[0],
    "torch max": lambda w, g: torch_mse.search_block_scales(w, g, "max"),
    "torch mse": lambda w, g: torch_mse.search_block_scales(w, g, "mse"),
    "torch weighted_mse": lambda w, g: torch_weighted.search_weighted(w, g, H),
    "fast four_over_six": lambda w, g: kernels.block_search("four_over_six", "torch")(w, g, None)[0],
    "fast mse + max errors": lambda w, g: kernels.search_with_max_errors(w, g, "mse", "torch")[0],
    "fast weighted + errors": lambda w, g: kernels.search_weighted_with_errors(w, g, H, "torch")[0],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SEARCHES))
def test_block_scales_of_a_tiny_tensor_are_those_of_the_tensor(name, dtype):
    w = _weights(dtype)
    tiny = w * TINY
    g, g_tiny = _global(w), _global(tiny)
    assert torch.equal(g_tiny, g * TINY)  # amax / 2688 is normal: exact
    assert bool((g_tiny < NORMALIZE_BELOW).all()) and not bool((g < NORMALIZE_BELOW).any())
    scales, scales_tiny = SEARCHES[name](w, g), SEARCHES[name](tiny, g_tiny)
    assert torch.equal(scales_tiny.view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(quantize_nvfp4(tiny, g_tiny, scales_tiny), quantize_nvfp4(w, g, scales))


@pytest.mark.parametrize("method", ["mse", "max"])
def test_decoded_relative_error_at_1e_30_equals_that_at_1(method):
    """amax ~ 1 vs the same tensor times 2^-100 (~1e-30): the same relative error, bit for bit in float64."""
    w = _weights()
    w = w / w.abs().amax()
    results = []
    for x in (w, w * TINY):
        g = _global(x)
        scales = kernels.search_block_scales(x, g, method, "torch")[0]
        decoded = dequantize_nvfp4(quantize_nvfp4(x, g, scales), g, scales).to(torch.float64)
        results.append(float((decoded - x.double()).square().sum() / x.double().square().sum()))
    assert results[0] == results[1]
    assert results[0] < 0.05  # an honest NVFP4 error (it was ~1.0 at 1e-30 before the normalization)


def test_global_search_picks_the_same_candidate():
    w = _weights()
    members = [(w[:, :16], None), (w[:, 16:], None)]  # a group of two sharing one global scale per expert
    for search in (reference_block_search("mse"), kernels.block_search("mse", "torch")):
        g, found = search_global(members, _global(w), search)
        g_tiny, found_tiny = search_global([(m * TINY, h) for m, h in members], _global(w * TINY), search)
        assert torch.equal(g_tiny, g * TINY)
        for (s, _), (s_tiny, _) in zip(found, found_tiny):
            assert torch.equal(s_tiny.view(torch.uint8), s.view(torch.uint8))


def test_errors_come_back_in_the_callers_units():
    """A shift of 2^-40 triggers the normalization while the errors (scaled by 2^-80) stay normal: they equal
    the unshifted errors times 2^-80 exactly, and the twins equal the reference bit for bit."""
    w = _weights()
    shifted = w * 2.0**-40
    g, g_s = _global(w), _global(shifted)
    assert bool((g_s < NORMALIZE_BELOW).all())
    scales, errors = torch_mse.search_block_scales_with_errors(w, g, "mse")
    scales_s, errors_s = torch_mse.search_block_scales_with_errors(shifted, g_s, "mse")
    assert torch.equal(scales_s.view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(errors_s, errors * 2.0**-80)
    assert torch.equal(errors_s, weight_squared_error(shifted, g_s, scales_s))
    assert torch.equal(torch_mse.weight_squared_error(shifted, g_s, scales_s), errors_s)
    assert torch.equal(weighted_weight_error(shifted, g_s, scales_s, H), weighted_weight_error(w, g, scales, H) * 2.0**-80)


def test_ordinary_tensors_are_not_copied():
    w = _weights(torch.bfloat16)
    g = _global(w)
    out, g_out, k = exponent_normalized(w, g)
    assert out is w and g_out is g and k is None


def test_fp8_weights_of_a_tiny_tensor_are_those_of_the_tensor():
    """FP8 has no error search: the quotient w / (amax / 448) is magnitude-free while the scale is normal."""
    w = _weights()
    s, s_tiny = fp8_tensor_scale(w.abs().amax()), fp8_tensor_scale((w * TINY).abs().amax())
    assert torch.equal(s_tiny, s * TINY)
    q, q_tiny = quantize_fp8_tensor(w, s), quantize_fp8_tensor(w * TINY, s_tiny)
    assert torch.equal(q_tiny.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(dequantize_fp8_tensor(q_tiny, s_tiny), dequantize_fp8_tensor(q, s) * TINY)


def test_smallest_accepted_amax_keeps_every_scale_and_decoded_value_normal():
    """At the pipeline's thresholds (quantize.check_target_amax): the NVFP4 global scale (also after the
    global-scale search's smallest factor) times the smallest non-zero code (0.5) and block scale (2^-9) is a
    normal float32, the compressed-tensors inverse is finite; FP8's scale times 2^-9 likewise."""
    normal = torch.finfo(torch.float32).tiny  # 2^-126
    g = global_scale_from_amax(torch.tensor(MIN_WEIGHT_AMAX))
    assert float(g) == 2.0**-115
    g_low = g * torch.tensor(min(GLOBAL_FACTORS))
    assert float(torch.tensor(0.5) * (torch.tensor(2.0**-9) * g_low)) >= normal
    assert bool(torch.isfinite(1.0 / g))
    half = global_scale_from_amax(torch.tensor(MIN_WEIGHT_AMAX / 2)) * torch.tensor(min(GLOBAL_FACTORS))
    assert float(torch.tensor(0.5) * (torch.tensor(2.0**-9) * half)) < normal  # an octave less would not do
    s = fp8_tensor_scale(torch.tensor(fp8.MIN_WEIGHT_AMAX))
    assert float(s) == 2.0**-117 and float(torch.tensor(2.0**-9) * s) >= normal
