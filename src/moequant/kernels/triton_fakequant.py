"""GPU fake quantization (quantize-dequantize) for evaluating a quantized model on GPU, equal to the references.

Three Triton kernels, each ``torch.equal`` (bit for bit, signed zeros included) to its plain-torch reference:
  * ``fake_quantize_weight_nvfp4(w, global_scale, block_scale)``: NVFP4 weights with given scales
    == ``formats.nvfp4.fake_quantize_nvfp4`` (float32 out).
  * ``fake_quantize_activation_nvfp4(x, input_scale)``: W4A4 activations with dynamic per-block scales
    == ``formats.activations.fake_quantize_activation_nvfp4`` (the engines' rule, vLLM's emulation: inverse
    global scale g = 1/input_scale, block_scale = e4m3(min(g * (amax * fl(1/6)), 448)), codes of
    x * recip(block_scale * recip(g)), dequantized as code * (block_scale / g); x's dtype out).
  * ``fake_quantize_fp8(x, scale)``: FP8 E4M3 per-tensor == ``formats.activations.fake_quantize_activation_fp8``
    (x's dtype out; float32 out == ``formats.fp8`` quantize + dequantize).
``out_dtype`` overrides the output dtype (the float32 result rounded RNE, as ``Tensor.to``). Divisions are IEEE
(``div_rn``), kernels launch without FMA contraction, and signs of zeros follow the references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moequant.formats.nvfp4 import BLOCK_SIZE
from moequant.kernels.triton_mse import _interpreting, e4m3_round

BLOCKS_PER_PROGRAM = 64  # NVFP4 blocks per program
ELEMS_PER_PROGRAM = 2048  # FP8 elements per program
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _e4m3_bits_value(bits):
    """float32 value of E4M3 bit patterns (int32 0..255; 0x7F/0xFF are NaN)."""
    mag = bits & 0x7F
    normal = (((mag >> 3) + 120) << 23) | ((mag & 7) << 20)
    v = tl.where(mag < 8, mag.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
    v = tl.where(mag == 0x7F, float("nan"), v)
    return (v.to(tl.int32, bitcast=True) | ((bits & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_value(q):
    """decode(encode(q)): E2M1 value with the reference thresholds; +0 for zero codes, NaN -> 0, saturating."""
    m = tl.abs(q)
    g = tl.where(m > 0.25, 0.5, 0.0)
    g = tl.where(m >= 0.75, 1.0, g)
    g = tl.where(m > 1.25, 1.5, g)
    g = tl.where(m >= 1.75, 2.0, g)
    g = tl.where(m > 2.5, 3.0, g)
    g = tl.where(m >= 3.5, 4.0, g)
    g = tl.where(m > 5.0, 6.0, g)
    return tl.where((q < 0) & (g > 0), -g, g)


@triton.jit
def _recip(x):
    """1 / x (IEEE) with recip(0) = 0, as formats.activations."""
    return tl.where(x == 0, 0.0, tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), x))


@triton.jit
def _weight_fake_kernel(x_ptr, gs_ptr, bs_ptr, out_ptr, n_blocks, blocks_per_batch, BLOCK: tl.constexpr):
    blk = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = blk < n_blocks
    offs = blk.to(tl.int64)[:, None] * 16 + tl.arange(0, 16)[None, :]
    x = tl.load(x_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)  # [BLOCK, 16]
    gs = tl.load(gs_ptr + blk // blocks_per_batch, mask=live, other=1.0)
    block_scale = _e4m3_bits_value(tl.load(bs_ptr + blk, mask=live, other=0).to(tl.int32))
    s = (block_scale * gs)[:, None]
    fake = _e2m1_value(tl.math.div_rn(x, s)) * s
    tl.store(out_ptr + offs, fake.to(out_ptr.dtype.element_ty), mask=live[:, None])


@triton.jit
def _act_fake_kernel(x_ptr, scale_ptr, out_ptr, n_blocks, BLOCK: tl.constexpr):
    blk = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = blk < n_blocks
    offs = blk.to(tl.int64)[:, None] * 16 + tl.arange(0, 16)[None, :]
    x = tl.load(x_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)  # [BLOCK, 16]
    g = _recip(tl.load(scale_ptr + tl.zeros([BLOCK], tl.int32)))  # inverse global scale, [BLOCK]
    raw = g * (tl.max(tl.abs(x), 1) * 0.1666666716337204)  # fl32(1/6)
    block_scale = e4m3_round(tl.minimum(raw, 448.0))
    out_scale = _recip(block_scale * _recip(g))
    deq_scale = tl.math.div_rn(block_scale, tl.where(g == 0, 1.0, g))
    fake = _e2m1_value(x * out_scale[:, None]) * deq_scale[:, None]
    fake = tl.where((g == 0)[:, None], 0.0, fake)
    tl.store(out_ptr + offs, fake.to(out_ptr.dtype.element_ty), mask=live[:, None])


@triton.jit
def _fp8_fake_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    fake = e4m3_round(q) * scale
    tl.store(out_ptr + offs, fake.to(out_ptr.dtype.element_ty), mask=live)


def _check(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{name}: needs a CUDA tensor, got one on {x.device}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: unsupported dtype {x.dtype}; expected one of {_DTYPES}")


def _blocked_out(x: torch.Tensor, out_dtype: torch.dtype):
    if x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the NVFP4 block size {BLOCK_SIZE}")
    n_blocks = x.numel() // BLOCK_SIZE
    return x.contiguous(), torch.empty(x.shape, dtype=out_dtype, device=x.device), n_blocks


def fake_quantize_weight_nvfp4(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor,
                               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``w [..., N, K]`` with float8_e4m3fn ``block_scale [..., N, K/16]`` and a
    global scale per leading batch index (``[*B]`` or scalar); == ``formats.nvfp4.fake_quantize_nvfp4``."""
    _check(w, "fake_quantize_weight_nvfp4")
    expected = (*w.shape[:-1], w.shape[-1] // BLOCK_SIZE)
    if tuple(block_scale.shape) != expected or block_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"block scales must be float8_e4m3fn {expected}, got {block_scale.dtype} {tuple(block_scale.shape)}")
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=w.device)
    batch = w.shape[:-2]
    if gs.numel() == 1:
        gs = gs.reshape(1)
        per_batch = w.numel() // BLOCK_SIZE
    elif tuple(gs.shape) == tuple(batch):
        per_batch = w.shape[-2] * w.shape[-1] // BLOCK_SIZE
    else:
        raise ValueError(f"global scale of shape {tuple(gs.shape)} does not match batch dims {tuple(batch)}")
    w_c, out, n_blocks = _blocked_out(w, out_dtype or torch.float32)
    if n_blocks:
        _weight_fake_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
            w_c, gs.reshape(-1).contiguous(), block_scale.contiguous().view(torch.uint8), out, n_blocks, per_batch,
            BLOCK=BLOCKS_PER_PROGRAM, num_warps=4, enable_fp_fusion=False)
    return out


def fake_quantize_activation_nvfp4(x: torch.Tensor, input_scale: torch.Tensor,
                                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W4A4 activation fake quant of ``x [..., K]``: dynamic per-block scales, one global ``input_scale``."""
    _check(x, "fake_quantize_activation_nvfp4")
    scale = torch.as_tensor(input_scale, dtype=torch.float32, device=x.device).reshape(1)
    x_c, out, n_blocks = _blocked_out(x, out_dtype or x.dtype)
    if n_blocks:
        _act_fake_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
            x_c, scale, out, n_blocks, BLOCK=BLOCKS_PER_PROGRAM, num_warps=4, enable_fp_fusion=False)
    return out


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """FP8 E4M3 per-tensor fake quant: ``float32(e4m3(x / scale)) * scale`` (saturating at 448)."""
    _check(x, "fake_quantize_fp8")
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(1)
    x_c = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    if x.numel():
        grid = (triton.cdiv(x.numel(), ELEMS_PER_PROGRAM),)
        _fp8_fake_kernel[grid](x_c, scale_t, out, x.numel(), BLOCK=ELEMS_PER_PROGRAM, num_warps=4,
                               enable_fp_fusion=False)
    return out
