"""NVFP4 block quantization of weights ``[..., out, in]``: the reference arithmetic.

Layout: blocks of 16 consecutive elements along ``in`` (the last dimension); leading dimensions (e.g. the
expert axis of a fused ``[E, N, K]`` tensor) are batch dimensions, each with its own global scale.

Scales (ModelOpt convention, ``weight_scale_2``):
    global_scale_f32 = amax / (6 * 448)              one float32 per tensor (or per expert / per group)
    block_scale_e4m3 = e4m3(block_amax / 6 / global) one FP8 per block ("max"; "mse" searches it)
    scale_f32        = float32(block_scale_e4m3) * global_scale_f32         (one fp32 multiply, RN)
    code             = e2m1(w_f32 / scale_f32)       IEEE division, RN-even, saturating at 6
    dequantized      = e2m1_value(code) * scale_f32  (one fp32 multiply, RN)
    block error      = sum over the 16 elements, in index order, of (w_f32 - dequantized)^2, each
                       step a separately rounded fp32 operation (no fused multiply-add)

Every step is spelled out because fast twins (vectorized CPU, Triton) must reproduce these bits exactly.

Degenerate inputs, documented and deterministic:
  * amax == 0 (all-zero tensor or expert): global scale = 1 / 2688, i.e. as if amax were 1. All codes are 0
    and the tensor dequantizes to exact zeros.
  * global scales computed here are clamped below at 2^-126 (the smallest normal float32), so a tiny but
    non-zero tensor never gets a zero global scale (its effective scales may still be fp32 subnormals,
    which the arithmetic handles exactly like normals).
  * block scales are clamped below at the smallest positive E4M3 value (2^-9): a zero block gets 2^-9
    instead of 0, so every stored scale is finite and > 0 (engines and our verifier require it) and the
    block still dequantizes to zeros.
Inputs in bf16/fp16/fp32 are converted to float32 first (exact). NaN/inf are rejected by ``check_weight``, and
so are magnitudes above ``MAX_ABS`` (1e18), whose squared errors would overflow float32 in the MSE search.

Every division is by a tensor, never a Python number: on CUDA, PyTorch turns ``x / 6.0`` into a multiply by
a rounded reciprocal, which differs from IEEE division in the last bit for about a third of inputs.
"""

from __future__ import annotations

import math

import torch

from moequant.errors import MoequantError
from moequant.formats.fp4 import E2M1_MAX, decode_e2m1, encode_e2m1
from moequant.formats.fp8 import E4M3_MAX, E4M3_MIN_SUBNORMAL, round_to_e4m3

BLOCK_SIZE = 16
GLOBAL_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688
MIN_GLOBAL_SCALE = 2.0**-126
MAX_ABS = 1e18


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 0-d tensor on ``like``'s device (for IEEE divisions on every device)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


class WeightError(MoequantError, ValueError):
    """A weight that cannot be quantized (bad shape, NaN/inf); the message names the tensor."""


def check_weight(w: torch.Tensor, name: str) -> None:
    """Raise ``WeightError`` naming ``name`` if ``w`` cannot be NVFP4-quantized."""
    if w.ndim < 2:
        raise WeightError(f"{name}: expected a weight of shape [..., out, in], got shape {tuple(w.shape)}")
    if w.shape[-1] % BLOCK_SIZE:
        raise WeightError(
            f"{name}: input dimension {w.shape[-1]} is not divisible by the NVFP4 block size {BLOCK_SIZE} "
            f"(shape {tuple(w.shape)}); exclude this tensor from the recipe or use an FP8 scheme for it"
        )
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise WeightError(f"{name}: unsupported dtype {w.dtype}; expected float32, bfloat16 or float16")
    low, high = _finite_range(w, name)
    amax = max(-low, high)  # = max |w|
    if amax > MAX_ABS:
        raise WeightError(f"{name}: magnitude {amax:.3g} exceeds {MAX_ABS:.0e}; such weights are almost surely "
                          "corrupt (and overflow the float32 error arithmetic): fix the checkpoint")


def _finite_range(w: torch.Tensor, name: str) -> tuple[float, float]:
    """(min, max) of ``w``; ``WeightError`` naming ``name`` and the first bad index if any value is NaN or inf."""
    # min and max propagate NaN and inf: one reduction, no full-size temporary (isfinite and abs of a bf16
    # weight allocate 2.5x its size); the full check runs only to describe a bad weight
    low, high = torch.stack(torch.aminmax(w)).tolist() if w.numel() else (0.0, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        finite = torch.isfinite(w)
        bad = (~finite).nonzero()[0].tolist()
        count = int((~finite).sum())
        raise WeightError(
            f"{name}: {count} non-finite value(s) (NaN or inf), first at index {bad}; the checkpoint is "
            "corrupt or was saved after a diverged step: fix the weights before quantizing"
        )
    return low, high


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raise ``WeightError`` naming ``name`` if ``w`` holds NaN or inf (the searches' own guard; ``check_weight``
    also bounds the magnitude and the shape, for the pipeline)."""
    _finite_range(w, name)


def to_blocks(w: torch.Tensor) -> torch.Tensor:
    """``[..., N, K]`` -> float32 ``[..., N, K/16, 16]``."""
    return w.to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)


def tensor_amax(w: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """Absolute max over all but the first ``batch_dims`` dimensions, float32."""
    flat = w.to(torch.float32).abs().reshape(*w.shape[:batch_dims], -1)
    return flat.amax(dim=-1)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax / (6 * 448)`` in float32, with the zero and underflow rules of the module docstring."""
    amax = amax.to(torch.float32)
    divisor = _const(GLOBAL_DIVISOR, amax)
    gs = torch.where(amax > 0, amax / divisor, torch.ones_like(amax) / divisor)
    return gs.clamp_min(MIN_GLOBAL_SCALE)


def expand_global(global_scale: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-batch global scale ``[*B]`` against blocks ``[*B, N, K/16, 16]`` -> ``[*B, 1, 1, 1]``."""
    gs = global_scale.to(torch.float32)
    batch = blocks.ndim - 3
    if gs.ndim != batch and gs.numel() != 1:
        raise ValueError(f"global scale of shape {tuple(gs.shape)} does not match {batch} batch dims")
    if gs.numel() == 1 and gs.ndim != batch:
        gs = gs.reshape([1] * batch)
    return gs.reshape(*gs.shape, 1, 1, 1)


def block_amax(blocks: torch.Tensor) -> torch.Tensor:
    """``[..., 16]`` -> ``[...]`` absolute max per block."""
    return blocks.abs().amax(dim=-1)


def max_block_scales(blocks: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """"Max" calibration: ``e4m3(block_amax / 6 / global)``, at least 2^-9. Returns float8_e4m3fn ``[..., N, K/16]``."""
    gs = expand_global(global_scale, blocks)[..., 0]
    raw = block_amax(blocks) / _const(E2M1_MAX, blocks) / gs
    return round_to_e4m3(raw.clamp_min(E4M3_MIN_SUBNORMAL))


def effective_scale(block_scale: torch.Tensor, global_scale: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """float32(block scale) * global scale, shaped ``[..., N, K/16, 1]`` to broadcast over a block."""
    gs = expand_global(global_scale, blocks)
    return block_scale.to(torch.float32).unsqueeze(-1) * gs


def quantize_blocks(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E2M1 codes ``[..., 16]`` of ``blocks / scale`` (scale ``[..., 1]``, float32)."""
    return encode_e2m1(blocks / scale)


def block_squared_error(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-block squared error ``[...]`` of quantizing ``blocks [..., 16]`` with ``scale [..., 1]``.

    Summed left to right over the 16 elements (the order is part of the definition; see module docstring).
    """
    deq = decode_e2m1(quantize_blocks(blocks, scale)) * scale
    diff = blocks - deq
    sq = diff * diff
    total = sq[..., 0]
    for i in range(1, BLOCK_SIZE):
        total = total + sq[..., i]
    return total


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, unpacked) ``[..., N, K]`` of ``w`` given its scales."""
    blocks = to_blocks(w)
    codes = quantize_blocks(blocks, effective_scale(block_scale, global_scale, blocks))
    return codes.reshape(w.shape)


def dequantize_nvfp4(codes: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., N, K]`` from unpacked codes and scales."""
    shape = codes.shape
    blocks = codes.reshape(*shape[:-1], shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    scale = effective_scale(block_scale, global_scale, blocks)
    return (decode_e2m1(blocks) * scale).reshape(shape)


def fake_quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize in one call (float32)."""
    return dequantize_nvfp4(quantize_nvfp4(w, global_scale, block_scale), global_scale, block_scale)


def weight_squared_error(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """Per-block squared error ``[..., N, K/16]`` of ``w`` with the given scales."""
    blocks = to_blocks(w)
    return block_squared_error(blocks, effective_scale(block_scale, global_scale, blocks))
