"""GPU fake quantization == the plain-torch references in ``formats``, bit for bit (signed zeros included).

Marked ``gpu``: skipped without CUDA (CI), run on the lent GPU. Case generators take no device so the same
cases run on CPU through Triton's interpreter while developing.
"""

from __future__ import annotations

import pytest
import torch

from moequant.formats.activations import fake_quantize_activation_fp8, fake_quantize_activation_nvfp4
from moequant.formats.fp8 import dequantize_fp8_tensor, e4m3_positive_values, quantize_fp8_tensor
from moequant.formats.nvfp4 import fake_quantize_nvfp4, global_scale_from_amax, max_block_scales, tensor_amax, to_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent GPU)"),
]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit view for exact comparison (distinguishes -0.0 from 0.0)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def activation_cases(gen: torch.Generator):
    """(name, x fp32, input_scale) for dynamic NVFP4 activation fake quant."""
    x = torch.randn(37, 256, generator=gen) * 3
    yield "normal", x, global_scale_from_amax(x.abs().amax())
    x = torch.distributions.StudentT(torch.tensor(2.0)).sample((8, 9, 128))
    yield "student-t 3-D", x, global_scale_from_amax(x.abs().amax())
    x = torch.randn(16, 64, generator=gen)
    x[:4] = 0.0
    x[4, :16] = -0.0
    x[5] *= 1e-9  # block scales round to 0 -> zeros
    yield "zeros, -0.0, vanishing blocks", x, global_scale_from_amax(x.abs().amax())
    yield "input scale 0 (zeros out)", x, torch.tensor(0.0)
    yield "calibrated amax too small (saturates)", x * 50, global_scale_from_amax(x.abs().amax())
    s = e4m3_positive_values()[torch.randint(40, 120, (64, 1), generator=gen)] * 2.0**-6
    t = torch.tensor(THRESHOLDS)[torch.randint(0, 7, (64, 16), generator=gen)]
    ties = t * s
    ties[:, 0] = 6 * s[:, 0]  # block amax = 6 s: the dynamic scale is exactly s / 2^-6
    yield "FP4 ties", ties.reshape(32, 32), torch.tensor(2.0**-6)


def weight_cases(gen: torch.Generator):
    """(name, w fp32, global scale, block scales e4m3) for static NVFP4 weight fake quant."""
    w = torch.randn(4, 24, 64, generator=gen)
    gs = global_scale_from_amax(tensor_amax(w, 1))
    yield "per-expert max scales", w, gs, max_block_scales(to_blocks(w), gs)
    codes = torch.randint(0, 127, (4, 24, 4), generator=gen, dtype=torch.uint8)
    codes[0, 0] = 0  # zero block scales: x / 0
    yield "random scale bits incl. 0 and subnormal", w, gs, codes.view(torch.float8_e4m3fn)
    w2 = w.clone()
    w2[1, :3] = -0.0
    yield "scalar global, -0.0", w2, gs.amax(), max_block_scales(to_blocks(w2), gs.amax())


def fp8_cases(gen: torch.Generator):
    """(name, x fp32, scale) for FP8 per-tensor fake quant, incl. ties between E4M3 values and saturation."""
    x = torch.randn(33, 100, generator=gen)
    yield "normal", x, x.abs().amax() / 448
    vals = e4m3_positive_values()
    mids = (vals[:-1] + vals[1:]) / 2  # exact ties (ties to even)
    x = torch.cat([mids, -mids, vals, torch.tensor([0.0, -0.0, 500.0, -1e4, 1e-6, -1e-6])])
    yield "ties, saturation, zeros", x, torch.tensor(1.0)
    yield "ties scaled", x * 0.125, torch.tensor(0.125)


def check_activation(x, input_scale, dtype, device, fn, ref_fn, **kwargs) -> bool:
    x = x.to(dtype)
    got = fn(x.to(device), input_scale.to(device), **kwargs)
    return torch.equal(bits(got.cpu()), bits(ref_fn(x, input_scale)))


def fp8_reference_f32(x, scale):
    return dequantize_fp8_tensor(quantize_fp8_tensor(x, scale), scale)


def check_weight(w, gs, block_scale, dtype, device, fn) -> bool:
    w = w.to(dtype)
    got = fn(w.to(device), gs.to(device), block_scale.to(device))
    return torch.equal(bits(got.cpu()), bits(fake_quantize_nvfp4(w, gs, block_scale)))


def _fq():
    from moequant.kernels import triton_fakequant

    return triton_fakequant


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activation_nvfp4_matches_reference(dtype):
    fq = _fq()
    for name, x, gs in activation_cases(torch.Generator().manual_seed(0)):
        if dtype == torch.float16 and x.abs().max() * 50 > 65504:
            continue
        ok = check_activation(x, gs, dtype, "cuda", fq.fake_quantize_activation_nvfp4, fake_quantize_activation_nvfp4)
        assert ok, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_nvfp4_matches_reference(dtype):
    fq = _fq()
    for name, w, gs, scales in weight_cases(torch.Generator().manual_seed(1)):
        assert check_weight(w, gs, scales, dtype, "cuda", fq.fake_quantize_weight_nvfp4), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_matches_reference(dtype):
    fq = _fq()
    for name, x, scale in fp8_cases(torch.Generator().manual_seed(2)):
        if dtype == torch.float16 and x.abs().max() > 65504:
            continue
        assert check_activation(x, scale, dtype, "cuda", fq.fake_quantize_fp8, fake_quantize_activation_fp8), name
        f32 = check_activation(x, scale, dtype, "cuda", fq.fake_quantize_fp8, fp8_reference_f32, out_dtype=torch.float32)
        assert f32, name


def test_out_dtype_rounds_the_float32_result():
    fq = _fq()
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    gs = global_scale_from_amax(x.float().abs().amax())
    got = fq.fake_quantize_weight_nvfp4(x, gs, max_block_scales(to_blocks(x), gs), out_dtype=torch.bfloat16)
    ref = fake_quantize_nvfp4(x.cpu(), gs.cpu(), max_block_scales(to_blocks(x.cpu()), gs.cpu())).to(torch.bfloat16)
    assert torch.equal(bits(got.cpu()), bits(ref))


def test_search_then_fake_quant_roundtrip():
    """Scales from the Triton search, fake-quantized on GPU, equal the reference pipeline on CPU."""
    from moequant.kernels import triton_mse

    w = torch.randn(3, 40, 128, dtype=torch.bfloat16)
    gs = global_scale_from_amax(tensor_amax(w, 1))
    scales = triton_mse.search_block_scales(w.cuda(), gs.cuda(), "mse")
    got = _fq().fake_quantize_weight_nvfp4(w.cuda(), gs.cuda(), scales)
    assert torch.equal(bits(got.cpu()), bits(fake_quantize_nvfp4(w, gs, scales.cpu())))
