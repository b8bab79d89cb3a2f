"""GPTQ rounding under fixed NVFP4 scales (weights.method "gptq"), reference.

Problem. A linear ``y = x W^T``, ``W [N, K]``, and calibration inputs ``X [T, K]`` (the module's inputs on the
calibration text; for an expert, its routed tokens; for an expert's down projection, its gated inputs).
``H = X^T X / T`` (float64 ``[K, K]``). The scales come FIRST and stay fixed: the group's global scale ``g``
(amax / 2688, group-shared) and the block scales ``S [N, K/16]`` of the weighted exact search
(``formats.weighted_mse``) whose channel weights are the diagonal of ``H``, ``E[x_k^2]`` (the same
observation, ``moequant.channel_stats``): the shipped scales are the searched ones and a group still shares
one global scale. GPTQ (Frantar et al., 2022) then only chooses the E2M1 codes: with ``Q`` the dequantized
weights, it lowers the output error ``tr((W - Q) H (W - Q)^T) = ||X (W - Q)^T||^2 / T`` (round to nearest,
what "weighted_mse" ships, ignores the correlations between input channels) by rounding the columns in order
and spreading each column's rounding error over the columns not yet rounded, optimally for ``H``.

Arithmetic (float64 unless said; ``w`` is converted to float32 first, exactly, then to float64):
  1. dead channels: ``H_kk == 0`` (never non-zero on the calibration text) -> ``H_kk = 1``, GPTQ's rule; such a
     channel is uncorrelated with the others, so it gets no error feedback and is rounded to nearest. Unlike
     GPTQ we keep its weights (GPTQ zeroes them): the calibration text cannot tell them apart, held-out text can.
  2. damping: ``H += lambda I``, ``lambda = DAMP * mean(diag(H))``, ``DAMP = 0.01`` (GPTQ's ``percdamp``).
  3. ``U`` = the upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``), from ONE factorization and a triangular
     inverse: with ``J`` the exchange matrix (reversal of rows/columns), ``J H J = L L^T`` (``cholesky``, L lower)
     gives ``H = V V^T`` with ``V = J L J`` upper, so ``H^-1 = (V^-1)^T V^-1`` and ``U = V^-1 = J L^-1 J``
     (``solve_triangular(L, I)``, flipped; ``inverse_factor``). The textbook route (cholesky, cholesky_inverse,
     cholesky of the inverse) is the same matrix in exact arithmetic; this one is 5x faster on an H200 (0.04 vs
     0.20 s for 32 x [2048, 2048]) and agrees with it to 1e-15 relative. If the factorization fails (its
     ``info`` is non-zero) ``U = I``: the codes are then round to nearest and the caller reports the fallback.
  4. columns in blocks of ``COLUMN_BLOCK = 16`` (one NVFP4 block; the scales are fixed, so the block size is
     only GPTQ's "lazy batch" granularity, not part of the result in exact arithmetic). In a block, for each
     column ``j`` in order, with ``W`` the working weights:
         s_j  = float32(S[:, j // 16]) * g                       (fp32, as ``nvfp4.effective_scale``)
         code = e2m1(fl32(fl32(W[:, j]) / s_j))                  (the working column rounded to fp32 first; IEEE
                                                                  division; RN-even, saturating at 6)
         q_j  = e2m1_value(code) * s_j                           (exact in float64)
         e_j  = (W[:, j] - q_j) / U_jj
         W[:, j:block end] -= e_j U[j, j:block end]              (outer product, the rest of the block)
     then ``W[:, block end:] -= E_block @ U[block, block end:]`` (E_block: the block's ``e_j`` as columns).
  5. results: the codes (uint8 ``[N, K]``; ``dequantize_nvfp4(codes, g, S)`` is what ships) and the plain
     per-block squared error of the shipped weights, ``code_block_squared_error`` (``nvfp4``'s order).

Column order (``weights.act_order``, GPTQ's "act order"): the columns may be taken in any order, because each
keeps its own fixed scale (the usual conflict of act order with grouped scales, scales computed group by group
as the sweep goes, does not arise). With ``act_order`` the columns go by decreasing ``H_kk`` (``column_order``):
steps 1-4 run on ``W``, the element scales and ``H`` permuted alike, and the codes are put back in place. The
largest inputs are rounded while all other columns can still absorb their error. Measured on the built-in
models (docs/quality.md): the W4A4 gap cut by GPTQ grows from 13-14% to 20% (dense); with smoothing it is most
of the difference between the targets missed and met.
With a diagonal ``H`` (no correlation known), ``U`` is diagonal, no other column moves, and the codes are
exactly round to nearest (``nvfp4.quantize_nvfp4``'s bits); the first column's codes always are.
Choice of inputs: ``X`` is what the pipeline observes, the ORIGINAL model's layer inputs (each decoder layer
is run on the unquantized outputs of the previous one, as for every other statistic); GPTQ implementations
often feed the already-quantized earlier layers instead: measured on the built-in models (bench/quality.py
--inputs quantized, docs/quality.md), no change of the W4A4 gap beyond noise, so the original inputs stay.
``kernels.torch_gptq`` is the batched twin (all experts of a projection at once, other column blocks: the
float64 arithmetic order differs, so it is compared by codes on well-conditioned problems, else by objective).
"""

from __future__ import annotations

import torch

from moequant.formats.fp4 import decode_e2m1, encode_e2m1
from moequant.formats.nvfp4 import BLOCK_SIZE, dequantize_nvfp4, expand_global, squared_block_sum, to_blocks

DAMP = 0.01
COLUMN_BLOCK = BLOCK_SIZE

# Per expert (0-d for a linear): where the shipped codes come from. 0: GPTQ; otherwise round to nearest under the
# same scales (what "weighted_mse" ships), for the reason below. Set by the caller (1, 2) or by step 3 (3).
GPTQ, FEW_TOKENS, RANK_DEFICIENT, FACTOR_FAILED = 0, 1, 2, 3
FALLBACK_REASONS = {
    FEW_TOKENS: "fewer routed tokens than calibration.min_tokens",
    RANK_DEFICIENT: "fewer calibration tokens than input channels (H is singular)",
    FACTOR_FAILED: "the Cholesky factorization of the damped H failed",
}


def inverse_factor(h: torch.Tensor, damp: float = DAMP, owned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 for ``h [..., K, K]`` (float64): (``U [..., K, K]``, ok ``[...]`` bool). ``U = I`` where not ok.
    ``owned``: ``h`` is a float64 array the caller hands over (damped in place, freed early: at most two
    ``[..., K, K]`` arrays live at once besides the library's workspace); otherwise it is copied first."""
    h = h if owned and h.dtype == torch.float64 else h.to(torch.float64).clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag.masked_fill_(diag == 0, 1.0)
    diag.add_(damp * diag.mean(-1, keepdim=True))
    del diag
    flipped = h.flip(-1, -2)                                     # J H J (J: the exchange matrix), a copy
    del h
    lower, info = torch.linalg.cholesky_ex(flipped)              # J H J = L L^T
    del flipped
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
    inverse = torch.linalg.solve_triangular(lower, eye, upper=False)            # L^-1
    del lower
    upper = inverse.flip(-1, -2)                                                # U = J L^-1 J
    del inverse
    ok = (info == 0) & torch.isfinite(upper).flatten(-2).all(-1)
    upper.masked_fill_(~ok[..., None, None], 0.0)                                   # where not ok: U = I
    upper.diagonal(dim1=-2, dim2=-1).masked_fill_(~ok[..., None], 1.0)
    return upper, ok


def column_order(h: torch.Tensor) -> torch.Tensor:
    """GPTQ's "act order": each batch index's columns by decreasing ``H_kk`` (the input channels' mean squares;
    ties in index order), int64 ``[..., K]`` for ``h [..., K, K]``. The largest inputs are rounded first, while
    every other column can still absorb their error. Deterministic: a stable sort of the same values."""
    return torch.sort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True).indices


def permute_columns(x: torch.Tensor, order: torch.Tensor, square: bool = False) -> torch.Tensor:
    """``x [..., N, K]`` with its columns (``square``: its rows too, for ``H [..., K, K]``) taken in ``order``
    ``[..., K]`` (a new array; a caller that hands ``x`` over gets at most two such arrays alive at once)."""
    out = x.gather(-1, order.unsqueeze(-2).expand(*x.shape[:-1], order.shape[-1]))
    if not square:
        return out
    del x
    return out.gather(-2, order.unsqueeze(-1).expand(*out.shape))


def unpermute_columns(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``permute_columns``: column ``j`` of ``x`` goes back to column ``order[j]``."""
    return torch.empty_like(x).scatter_(-1, order.unsqueeze(-2).expand(*x.shape), x)


def round_column(w: torch.Tensor, scale_f32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4's rounding of float64 working values ``w`` at fp32 scales ``scale_f32`` (same shape): (codes uint8,
    dequantized float64)."""
    codes = encode_e2m1(w.to(torch.float32) / scale_f32)
    return codes, decode_e2m1(codes).to(torch.float64) * scale_f32.to(torch.float64)


def column_scales(global_scale: torch.Tensor, block_scale: torch.Tensor, k: int) -> torch.Tensor:
    """fp32 effective scale of every element ``[..., N, K]`` (``nvfp4.effective_scale``, repeated over a block)."""
    per_block = block_scale.unsqueeze(-1)  # [..., N, K/16, 1]: the block shape expand_global reads its batch from
    scale = per_block.to(torch.float32) * expand_global(global_scale, per_block).to(block_scale.device)
    return scale.expand(*block_scale.shape, BLOCK_SIZE).reshape(*block_scale.shape[:-1], k)


def gptq_codes_reference(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor, h: torch.Tensor,
                         damp: float = DAMP, act_order: bool = False) -> tuple[torch.Tensor, bool]:
    """Codes uint8 ``[N, K]`` of one weight ``w [N, K]`` under its fixed scales (``global_scale`` 0-d, ``block_scale``
    float8_e4m3fn ``[N, K/16]``) for ``h = X^T X / T [K, K]``, and whether the factorization succeeded.
    ``act_order``: the columns in ``column_order``; each keeps its own (fixed) scale, so any order is valid."""
    n, k = w.shape
    scale = column_scales(global_scale, block_scale, k)
    if act_order:
        order = column_order(h.to(torch.float64))
        codes, ok = _gptq_columns(permute_columns(w, order), permute_columns(scale, order),
                                  permute_columns(h, order, square=True), damp)
        return unpermute_columns(codes, order), ok
    return _gptq_columns(w, scale, h, damp)


def _gptq_columns(w: torch.Tensor, scale: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, bool]:
    """Steps 1-4 for ``w [N, K]`` at fp32 element scales ``scale [N, K]``, columns in their order."""
    n, k = w.shape
    upper, ok = inverse_factor(h, damp)
    work = w.to(torch.float32).to(torch.float64).clone()
    codes = torch.empty((n, k), dtype=torch.uint8, device=w.device)
    for start in range(0, k, COLUMN_BLOCK):
        stop = min(start + COLUMN_BLOCK, k)
        errors = torch.empty((n, stop - start), dtype=torch.float64, device=w.device)
        for j in range(start, stop):
            codes[:, j], q = round_column(work[:, j], scale[:, j])
            e = (work[:, j] - q) / upper[j, j]
            work[:, j:stop] -= e[:, None] * upper[j, j:stop][None, :]
            errors[:, j - start] = e
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    return codes, bool(ok)


def code_block_squared_error(w: torch.Tensor, codes: torch.Tensor, global_scale: torch.Tensor,
                             block_scale: torch.Tensor) -> torch.Tensor:
    """Plain per-block squared error ``[..., N, K/16]`` (fp32, summed in index order as ``nvfp4``) of the weights
    that ship, ``dequantize_nvfp4(codes, ...)``, against ``w [..., N, K]``."""
    return squared_block_sum(to_blocks(w) - to_blocks(dequantize_nvfp4(codes, global_scale, block_scale)))


def output_error(w: torch.Tensor, dequantized: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """GPTQ's objective ``tr((W - Q) H (W - Q)^T)`` per leading index (float64): ``w, dequantized [..., N, K]``,
    ``h [..., K, K]``."""
    d = w.to(torch.float64) - dequantized.to(torch.float64)
    return ((d @ h.to(torch.float64)) * d).sum((-2, -1))
