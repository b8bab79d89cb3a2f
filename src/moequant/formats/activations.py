"""Activation fake-quantization as the engines compute it at run time (reference, plain torch).

NVFP4 activations (W4A4): the checkpoint ships one global ``input_scale`` (= act_amax / 2688); the engine
computes per-block FP8 scales from each 16-element block of the live activation. We mirror vLLM's emulation
path (``ref_nvfp4_quant`` / ``dequantize_to_dtype`` in vllm/model_executor/layers/quantization/utils/
nvfp4_emulation_utils.py), which works with the inverse global scale ``g = 1 / input_scale``:

    block_scale = e4m3(clamp(g * (block_amax * (1/6)), +-448))      (fp32 ops, RN; FP8 cast RNE)
    out_scale   = recip(block_scale * recip(g))                      recip(0) = 0 (zero block)
    code        = e2m1(clamp(x * out_scale, -6, 6))
    dequantized = code * (block_scale / g)

FP8 activations (W8A8, static per-tensor): ``e4m3(clamp(x / scale, +-448)) * scale``.
"""

from __future__ import annotations

import torch

from moequant.formats.fp4 import E2M1_MAX, round_to_e2m1
from moequant.formats.fp8 import E4M3_MAX, dequantize_fp8_tensor, quantize_fp8_tensor
from moequant.formats.nvfp4 import BLOCK_SIZE


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.zeros_like(x), 1.0 / x)


def fake_quantize_activation_nvfp4(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x [..., K]`` (K % 16 == 0) with dynamic per-block scales; returns x's dtype."""
    shape, dtype = x.shape, x.dtype
    if shape[-1] % BLOCK_SIZE:
        raise ValueError(f"activation last dimension {shape[-1]} is not a multiple of {BLOCK_SIZE}")
    blocks = x.to(torch.float32).reshape(-1, shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    g = _reciprocal(input_scale.to(torch.float32).reshape(()))
    vec_max = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = (g * (vec_max * (1.0 / E2M1_MAX))).clamp(-E4M3_MAX, E4M3_MAX)
    block_scale = block_scale.to(torch.float8_e4m3fn).to(torch.float32)
    out_scale = _reciprocal(block_scale * _reciprocal(g))
    codes = round_to_e2m1((blocks * out_scale).clamp(-E2M1_MAX, E2M1_MAX))
    deq = codes * (block_scale / g) if bool(g != 0) else torch.zeros_like(codes)
    return deq.reshape(shape).to(dtype)


def fake_quantize_activation_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 quantize-dequantize; returns x's dtype."""
    return dequantize_fp8_tensor(quantize_fp8_tensor(x, scale), scale).to(x.dtype)
