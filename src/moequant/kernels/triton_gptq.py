"""Triton twin of the innermost loop of ``kernels.torch_gptq``: one 16-column NVFP4 block of GPTQ, one launch.

``torch_gptq._gptq_batch`` sweeps a block's 16 columns one at a time with ~15 torch launches per column (round,
error, rank-1 update of the rest of the block), for all experts of a chunk at once: on a GPU that loop is bound
by launches, not arithmetic (docs/quality.md: 20x "mse"'s time). ``sweep_block`` does the same 16 steps in one
launch: a program holds ``BLOCK_N`` rows x 16 float64 working values of one expert in registers and, for each
column ``j`` in order, computes exactly the torch ops' values:

    x    = W[:, j]                                   (float64 working value)
    code = e2m1(fl32(fl32(x) / s_j))                 (IEEE division ``div_rn``, thresholds of ``formats.fp4``)
    q    = float64(e2m1_value(code)) * float64(s_j)
    err  = (x - q) / U[j, j]                         (IEEE float64 division)
    W[:, c] = W[:, c] - err * U[j, c]  for c > j     (product rounded, then the difference: no FMA)

and stores the codes and the errors. GPTQ's rows are independent (each row's feedback reads only that row and
``U``), so programs never communicate. Launched with ``enable_fp_fusion=False`` (no contraction of the product
and the difference into an FMA, which would round once instead of twice): every value is the torch loop's, bit
for bit, and the codes are equal (tests/kernels/test_triton_gptq.py; the torch loop also updates column ``j``
itself, which nothing reads afterwards). The batched matmuls that carry a block's errors to the later columns
stay torch's (the same calls in both paths).

Extracting column ``j`` from the register tile is a sum of the row with every other entry replaced by -0.0,
the additive identity: exact in any order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moequant.formats.nvfp4 import BLOCK_SIZE
from moequant.kernels.triton_mse import _interpreting

BLOCK_N = 64     # rows per program
NUM_WARPS = 2


@triton.jit
def _encode(r):
    """E2M1 codes (int32) of fp32 ``r``, ``formats.fp4.encode_e2m1``'s rule: RN-even, saturating, -0 -> 0."""
    mag = tl.abs(r)
    idx = (mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32)
    idx += (mag > 1.25).to(tl.int32) + (mag >= 1.75).to(tl.int32)
    idx += (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
    idx += (mag > 5.0).to(tl.int32)
    neg = ((r < 0.0) & (idx > 0)).to(tl.int32)
    return idx | (neg << 3)


@triton.jit
def _decode(code):
    """fp32 value of E2M1 ``code`` (``formats.fp4.decode_e2m1``)."""
    idx = code & 7
    mag = tl.where(idx < 4, idx.to(tl.float32) * 0.5, tl.where(idx == 7, 6.0, (idx - 2).to(tl.float32)))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _sweep_kernel(work_ptr, scale_ptr, upper_ptr, code_ptr, err_ptr, n_rows,
                  w_se, w_sn, s_se, s_sn, u_se, u_sr, u_sc, c_se, c_sn, e_se, e_sn,
                  BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < n_rows
    cols = tl.arange(0, WIDTH)
    tile = tl.load(work_ptr + e * w_se + rows[:, None] * w_sn + cols[None, :], mask=live[:, None], other=0.0)
    for j in tl.static_range(WIDTH):
        x = tl.sum(tl.where(cols[None, :] == j, tile, -0.0), axis=1)
        s = tl.load(scale_ptr + e * s_se + rows * s_sn + j, mask=live, other=1.0)
        code = _encode(tl.math.div_rn(x.to(tl.float32), s))
        q = _decode(code).to(tl.float64) * s.to(tl.float64)
        u = tl.load(upper_ptr + e * u_se + j * u_sr + cols * u_sc)
        ujj = tl.sum(tl.where(cols == j, u, -0.0), axis=0)
        err = (x - q) / ujj     # float64: div.rn.f64 (div_rn is fp32 only)
        tile = tl.where(cols[None, :] > j, tile - err[:, None] * u[None, :], tile)
        tl.store(code_ptr + e * c_se + rows * c_sn + j, code.to(tl.uint8), mask=live)
        tl.store(err_ptr + e * e_se + rows * e_sn + j, err, mask=live)


def sweep_block(block: torch.Tensor, scale: torch.Tensor, upper: torch.Tensor, codes: torch.Tensor,
                errors: torch.Tensor) -> None:
    """One 16-column NVFP4 block: ``block`` float64 ``[E, N, 16]`` (working weights, read only), ``scale`` fp32
    ``[E, N, 16]``, ``upper`` float64 ``[E, 16, 16]`` (the block's diagonal block of U); writes ``codes`` uint8
    ``[E, N, 16]`` and ``errors`` float64 ``[E, N, 16]``. Views (slices of the caller's arrays) with unit column
    stride, except ``upper``."""
    e, n, width = block.shape
    if width != BLOCK_SIZE or block.dtype != torch.float64 or scale.dtype != torch.float32:
        raise ValueError(f"sweep_block: block {tuple(block.shape)} {block.dtype}, scale {scale.dtype}")
    arrays = (block, scale, codes, errors)    # upper: any strides (LAPACK's factors are column-major)
    if any(a.stride(-1) != 1 for a in arrays) or (block.device.type != "cuda" and not _interpreting()):
        raise ValueError("sweep_block needs CUDA views with unit column stride")
    if e == 0 or n == 0:
        return
    grid = (e, triton.cdiv(n, BLOCK_N))
    _sweep_kernel[grid](block, scale, upper, codes, errors, n,
                        block.stride(0), block.stride(1), scale.stride(0), scale.stride(1),
                        upper.stride(0), upper.stride(1), upper.stride(2), codes.stride(0), codes.stride(1),
                        errors.stride(0), errors.stride(1),
                        BLOCK_N=BLOCK_N, WIDTH=BLOCK_SIZE, num_warps=NUM_WARPS, enable_fp_fusion=False)
