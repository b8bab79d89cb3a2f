"""Export's twin of ``fp4.pack_fp4(nvfp4.quantize_nvfp4(w, global_scale, block_scale))``: the same bytes by
arithmetic alone (the reference's comparisons are its slow part on a CPU). The rounding onto the E2M1 grid is
``torch_mse``'s (proof step 1 in its docstring); tested byte for byte against the reference."""

from __future__ import annotations

import sys

import torch

from moequant.formats.nvfp4 import BLOCK_SIZE, E2M1_MAX
from moequant.kernels.cpu_workers import cpu_workers
from moequant.kernels.torch_mse import _EXPONENT_MASK, _MAGIC_SHIFT

PACK_ROWS = 256  # rows per work item on a CPU (worker threads, one core each)
DEVICE_PACK_ELEMENTS = 1 << 24  # elements per work item on an accelerator: a few launches per tensor, not per rows


def _codes_f32_blocks(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int32 E2M1 codes of ``blocks / scale`` (``[..., 16]`` fp32, scale ``[..., 1]``), as ``fp4.encode_e2m1``.

    Magnitude: ``a = min(|q|, 6)``, ``M = 2^floor(log2 max(a, 1))`` (1, 2 or 4) and ``R = fl(a + 2^22 M)``
    (proof step 1): ``R = 2^22 M + k * ulp`` with ulp 0.5, 1, 2 and k <= 4, so R's low significand bits are
    k, and the magnitude index is ``k + 2 log2(M)`` (0.5 -> 1, 2 -> 4 on the first range, 3 -> 5 and
    4 -> 6 on the second, 6 -> 7 on the third). Sign: the sign bit of ``q`` moved to bit 3, kept only where
    the index is > 0 (``(index + 7) & 8``), so -0 and negative values that round to 0 get code 0."""
    q = blocks / scale  # IEEE division, the reference's
    mag = q.abs().clamp_max_(E2M1_MAX)
    step = torch.clamp_min(mag, 1.0)
    step_bits = step.view(torch.int32).bitwise_and_(_EXPONENT_MASK)  # M = 1, 2 or 4 (exact)
    index = mag.add_(step, alpha=_MAGIC_SHIFT).view(torch.int32).bitwise_and_(7)  # k
    index.add_(step_bits.bitwise_right_shift_(22)).sub_(_ONE_EXPONENT_X2)  # + 2 log2(M)
    sign = q.view(torch.int32).bitwise_right_shift(28).bitwise_and_(8)  # 8 where q's sign bit is set
    return index.bitwise_or_(sign.bitwise_and_(index + 7))


_ONE_EXPONENT_X2 = 0x3F800000 >> 22  # float32 1.0's bits >> 22 = 2 * 127
_LITTLE_ENDIAN = sys.byteorder == "little"


def quantize_pack_nvfp4(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """``fp4.pack_fp4(nvfp4.quantize_nvfp4(w, global_scale, block_scale))`` for ``w [..., N, K]`` with one global
    scale per leading index (``[]`` for ``[N, K]``, ``[E]`` for ``[E, N, K]``, or one scalar for all): uint8
    ``[..., N, K/2]``, the same bytes (element 2j in the low nibble), computed with arithmetic only
    (comparisons are the reference's slow part on CPU), over row slices (on a CPU, on worker threads each
    running single-threaded torch ops, see ``kernels.cpu_workers``; on an accelerator, a few large launches).
    The effective scale is ``float32(block) * global`` per row, the product ``nvfp4.effective_scale`` forms."""
    lead = tuple(w.shape[:-2])
    if w.ndim < 2 or w.shape[-1] % BLOCK_SIZE or global_scale.numel() not in (1, _numel(lead)):
        raise ValueError(f"expected w [..., N, K] with K divisible by {BLOCK_SIZE} and one global scale per leading "
                         f"index, got {tuple(w.shape)} and {tuple(global_scale.shape)}")
    w = w.detach()
    n, k = w.shape[-2], w.shape[-1]
    rows_total = _numel(lead) * n
    w2 = w.reshape(rows_total, k)
    blocks2 = block_scale.reshape(rows_total, k // BLOCK_SIZE)
    gs = global_scale.to(device=w.device, dtype=torch.float32).reshape(-1, 1)  # [lead or 1, 1]
    out = torch.empty((rows_total, k // 2), dtype=torch.uint8, device=w.device)
    rows = PACK_ROWS if w.device.type == "cpu" else max(PACK_ROWS, DEVICE_PACK_ELEMENTS // k)

    def row_scales(start: int, stop: int) -> torch.Tensor:  # [rows, 1, 1]: the global scale of each row
        if gs.shape[0] == 1:
            return gs.reshape(1, 1, 1)
        return gs[torch.arange(start, stop, device=w.device) // n].reshape(-1, 1, 1)

    def run(start):
        stop = min(start + rows, rows_total)
        blocks = w2[start:stop].to(torch.float32).reshape(stop - start, k // BLOCK_SIZE, BLOCK_SIZE)
        scale = blocks2[start:stop].to(torch.float32).unsqueeze(-1) * row_scales(start, stop)  # effective_scale
        codes = _codes_f32_blocks(blocks, scale)
        if _LITTLE_ENDIAN:  # an int64 holds (even code) | (odd code) << 32; its low byte, once shifted, is the pair
            pairs = codes.view(torch.int64).view(stop - start, k // 2)
            out[start:stop] = pairs.bitwise_or(pairs.bitwise_right_shift(28))  # uint8 keeps the low byte
        else:
            pairs = codes.view(stop - start, k // 2, 2)
            out[start:stop] = pairs[..., 0].bitwise_or(pairs[..., 1].bitwise_left_shift(4))

    with cpu_workers(w.device) as mapper:
        list(mapper(run, range(0, rows_total, rows)))
    return out.reshape(*lead, n, k // 2)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
