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
    non-zero tensor never gets a zero global scale (its effective scales may still be fp32 subnormals; the
    pipeline refuses weights that small, see ``MIN_WEIGHT_AMAX`` below).
  * block scales are clamped below at the smallest positive E4M3 value (2^-9): a zero block gets 2^-9
    instead of 0, so every stored scale is finite and > 0 (engines and our verifier require it) and the
    block still dequantizes to zeros.
Inputs in bf16/fp16/fp32 are converted to float32 first (exact). NaN/inf are rejected by ``check_weight``, and
so are magnitudes above ``MAX_ABS`` (1e18), whose squared errors would overflow float32 in the MSE search.

Tiny tensors: exponent normalization. Multiplying by 2^k is exact in binary floating point unless the result
overflows or is subnormal, and every step above commutes with it: for normal operands and results
fl(2^k x * y) = 2^k fl(x * y), fl(2^k x / 2^k y) = fl(x / y), fl(2^k x - 2^k y) = 2^k fl(x - y),
fl((2^k d)^2) = 2^2k fl(d^2). So with w' = 2^k w and g' = 2^k g: s'_j = 2^k s_j, w'/s'_j = w/s_j (same codes),
d' = 2^k d and every candidate's block error is E'_j = 2^2k E_j: the same comparisons, hence the same E4M3
block scales (dimensionless) and FP4 codes as fp32 arithmetic with an unbounded exponent range on (w, g),
whenever the normalized computation has no subnormal intermediate. Without it a tiny tensor breaks: its d^2
fall below 2^-126 (losing bits) or 2^-150 (vanishing), every candidate ties, the smallest one wins and the
blocks saturate (measured: Gaussian weights scaled by 2^-64 change a few codes, by 2^-72 every block; at
amax ~ 1e-30 the relative squared error is ~1.0 instead of ~0.007).
The rule (``exponent_normalized``), per batch index whose global scale g is finite and 0 < g < 2^-36:
k = -12 - floor(log2 g), so g' is in [2^-12, 2^-11) (amax' ~ 1 for g = amax / 2688), capped so that the
batch's magnitudes stay below 2^60 (their squares finite); other batch indices keep k = 0, and a tensor with
no such index is used as is (no copy: real weights never get there; the first code change measured is at
g ~ 2^-78, 42 octaves below the threshold). Errors handed back are 2^-2k E' rounded once to float32 (via
float64), i.e. the errors of (w, g) in the units of the caller. Every search and error function that takes a
weight ``w`` (here, in ``mse``, ``weighted_mse``, ``global_search`` and ``kernels/``) applies the rule;
functions taking ``blocks`` compute on what they are given. The global scale shipped is g, from the original
amax. ``quantize_nvfp4`` (the codes written) divides w by fl(block_scale * g) as is: the normalized codes
whenever that product is normal. Decoded values are code * fl(block_scale * g); all of them are normal fp32
(as the exactness above assumes, and as engines multiplying in any order agree on) iff 0.5 * 2^-9 * g >=
2^-126, i.e. g >= 2^-116, and the global-scale search may lower g by 2^-1/8: ``MIN_WEIGHT_AMAX`` =
2688 * 2^-115 (~6.5e-32, g >= 2^-115) is the smallest non-zero weight amax the pipeline accepts
(``quantize.check_target_amax``); then the compressed-tensors inverse 2688 / amax <= 2^115 is finite too.

Every division is by a tensor, never a Python number: on CUDA, PyTorch turns ``x / 6.0`` into a multiply by
a rounded reciprocal, which differs from IEEE division in the last bit for about a third of inputs.
"""

from __future__ import annotations

import math

import torch

from moequant.errors import MoequantError
from moequant.formats.fp4 import E2M1_MAX, decode_e2m1, encode_e2m1
from moequant.formats.fp8 import E4M3_MAX, E4M3_MIN_SUBNORMAL, round_to_e4m3
from moequant.reductions import abs_max

BLOCK_SIZE = 16
GLOBAL_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688
MIN_GLOBAL_SCALE = 2.0**-126
MAX_ABS = 1e18
MIN_WEIGHT_AMAX = GLOBAL_DIVISOR * 2.0**-115  # = 21 * 2^-108 exactly; see the module docstring
NORMALIZE_BELOW = 2.0**-36    # global scales below this are searched exponent-normalized
NORMAL_EXPONENT = -12         # ... to g' in [2^-12, 2^-11)
_SHIFTED_LIMIT_EXP = 60       # normalized magnitudes stay below 2^60


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
    low, high = torch.stack(torch.aminmax(storage_order(w))).tolist() if w.numel() else (0.0, 0.0)
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


def _needs_shift(gs: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(gs) & (gs > 0) & (gs < NORMALIZE_BELOW)


def normalization_needed(global_scale: torch.Tensor) -> bool:
    """Whether ``exponent_normalized`` would shift any batch index of this global scale."""
    return bool(_needs_shift(torch.as_tensor(global_scale, dtype=torch.float32)).any())


def batch_amax(w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float32 max |w| per batch index of ``global_scale`` (``[*B]``; one value for a scalar)."""
    gs = torch.as_tensor(global_scale)
    batch = tuple(gs.shape) if gs.numel() > 1 else ()
    if w.numel() == 0:
        return torch.zeros(batch, dtype=torch.float32, device=w.device)
    return (abs_max(w.reshape(*batch, -1), -1) if batch else abs_max(w.reshape(-1))).to(torch.float32)


def _pow2(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 factors whose product is 2^k (int k in [0, 254]), each an exact power of two built from its
    exponent bits (no library exp2 whose exactness would need proof)."""
    half = torch.div(k, 2, rounding_mode="floor")
    return tuple(((e.to(torch.int32) + 127) << 23).view(torch.float32) for e in (half, k - half))


def exponent_normalized(w: torch.Tensor, global_scale: torch.Tensor, amax: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(w', g', k)`` by the module docstring's rule: ``w' = 2^k w`` (float32) and ``g' = 2^k g`` per batch index
    of the global scale (``[*B]`` or a scalar shared by all), ``k`` int32 shaped like ``g``. When no index
    needs it: ``(w, global_scale, None)``, untouched. ``amax`` (per batch index, optional) caps k instead of
    ``w``'s own magnitudes: a group shares one k (``global_search``)."""
    gs = torch.as_tensor(global_scale).to(device=w.device, dtype=torch.float32)
    need = _needs_shift(gs)
    if not bool(need.any()):
        return w, global_scale, None
    batch = tuple(gs.shape) if gs.numel() > 1 else ()
    if tuple(w.shape[:len(batch)]) != batch or w.ndim < len(batch) + 2:
        return w, global_scale, None  # a shape mismatch: the caller's own checks say so
    if amax is None:
        amax = batch_amax(w, gs)
    amax = amax.to(device=w.device, dtype=torch.float32).reshape(gs.shape if gs.numel() > 1 else ())
    k = (NORMAL_EXPONENT + 1 - torch.frexp(gs)[1]).clamp_min(0)   # floor(log2 g) = frexp exponent - 1
    k = torch.minimum(k, torch.where(amax > 0, _SHIFTED_LIMIT_EXP - torch.frexp(amax)[1], k))
    k = torch.where(need, k.clamp_min(0), torch.zeros_like(k))
    return times_pow2(w.to(torch.float32), k), times_pow2(gs, k), k


def times_pow2(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """float32 ``x * 2^k`` (a new tensor), k int ``>= 0`` broadcasting over x's leading dimensions: exact while
    the result is finite (scaling up never rounds, subnormal inputs included)."""
    f1, f2 = _pow2(k)
    shape = k.shape + (1,) * (x.ndim - k.ndim)
    return (x.to(torch.float32) * f1.reshape(shape)).mul_(f2.reshape(shape))


def restore_errors(errors: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
    """Per-block errors ``[*B, ...]`` of a normalized search back in the caller's units: ``fl32(2^-2k E')``."""
    if k is None:
        return errors
    scale = ((1023 - 2 * k.to(torch.int64)) << 52).view(torch.float64)  # 2^-2k, exact (k <= 137 here)
    return (errors.to(torch.float64) * scale.reshape(k.shape + (1,) * (errors.ndim - k.ndim))).to(torch.float32)


def to_blocks(w: torch.Tensor) -> torch.Tensor:
    """``[..., N, K]`` -> float32 ``[..., N, K/16, 16]``."""
    return w.to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)


def storage_order(w: torch.Tensor) -> torch.Tensor:
    """``w``, or its transpose of the last two dimensions where that is the contiguous one (a weight stored
    ``[E, K, N]`` and viewed ``[E, N, K]``): for reductions whose value does not depend on the order of the
    elements within each leading index (min, max, finiteness). Reading a transposed view element by element
    strides through memory (measured 3.5x the time of the contiguous read for an ``[8, 3072, 576]`` float32
    experts tensor), and ``reshape`` of one copies it."""
    if w.ndim >= 2 and not w.is_contiguous() and w.mT.is_contiguous():
        return w.mT
    return w


def tensor_amax(w: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """Absolute max over all but the first ``batch_dims`` dimensions, float32 (+0.0 for an all-zero slice).

    ``max(-min, max)`` in ``w``'s dtype, then widened: the same value as ``w.float().abs().amax()`` (negation,
    max and widening are exact; NaN propagates), without a float32 copy and a ``|w|`` temporary of ``w``'s
    size; ``+ 0.0`` makes a zero +0.0 (``-(+0.0)`` is -0.0). A max does not depend on the order it reads
    the elements in: a transposed view is read in its storage order (``storage_order``) when the reduced
    dimensions include both transposed ones."""
    if batch_dims <= w.ndim - 2:
        w = storage_order(w)
    flat = w.reshape(*w.shape[:batch_dims], -1)
    return abs_max(flat, -1 if batch_dims else None).to(torch.float32)


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
    return squared_block_sum(blocks - deq)


def squared_block_sum(diff: torch.Tensor) -> torch.Tensor:
    """``sum(diff ** 2)`` over the last dimension (16), added left to right: the order that defines every block
    error in moequant (the fast twins reproduce it bit for bit)."""
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
    """Per-block squared error ``[..., N, K/16]`` of ``w`` with the given scales (exponent-normalized)."""
    w, global_scale, k = exponent_normalized(w, global_scale)
    blocks = to_blocks(w)
    return restore_errors(block_squared_error(blocks, effective_scale(block_scale, global_scale, blocks)), k)
