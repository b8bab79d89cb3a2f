"""Vectorized torch twin of ``moequant.formats.mse.search_block_scales_reference`` (any device).

Same contract and bit-identical float8_e4m3fn block scales. "max" is elementwise and cheap, so it calls the
reference ``max_block_scales``. "mse" evaluates only a window of candidates per block that provably contains
the reference's answer, with the reference's exact fp32 arithmetic (``_block_error_f32``).

The reference answer: candidates ``c_0 < ... < c_125``, ``s_j = fl(c_j * g)``, ``E_j`` the fp32 block error
(``nvfp4.block_squared_error``); the answer is the smallest ``j`` with ``E_j < E_i`` for all ``i < j`` and
``E_j <= E_i`` for all ``i > j`` among finite errors (NaN/inf never replace the initial +inf; if no ``E_j`` is
finite the answer is ``j = 0``). Write ``u = 2^-24`` and ``fl`` for round-to-nearest-even fp32.

Proof sketch that the window holds the answer (``U = E_m``, m = the "max" candidate of the block):
 0. ``E_j`` depends on ``w`` only through ``|w|``: ``fl(|w|/s) = |fl(w/s)|`` and the E2M1 code of a negative
    value is the negated code of its magnitude (or +0), and RN is sign-symmetric, so ``d_i^2`` is unchanged.
    ``fl`` is monotone, so a sequential fp32 sum of non-negative terms is monotone in every term, and
    ``fl(a + b) >= max(a, b)`` for ``a, b >= 0``. Hence if some term ``t_i`` of ``E_j`` is bounded below by
    ``b_i`` (with the other terms >= 0), ``E_j >= fl-sequential-sum(b)``.
 1. Only candidates with ``E_j <= U`` can be the answer when ``U`` is finite (the answer's error is a minimum
    over finite errors, and ``E_m = U`` is one of them). A candidate with ``E_j`` NaN never is the answer.
 2. Saturation bound. Every E2M1 magnitude ``v <= 6`` so ``|deq_i| = fl(v * s_j) <= fl(6 * s_j)``; for the
    element with ``|w_i| = amax``, ``|d_i| = fl(amax - |deq_i|) >= fl(amax - fl(6 s_j))`` when that is >= 0,
    so ``E_j >= d_i^2 >= B_j := fl(relu(fl(amax - fl(6 s_j)))^2)``. We compute ``B_j`` with exactly these
    fp32 ops, so ``B_j > U`` proves ``E_j > U``: no margin is needed.
 3. Small-element bound. If ``fl(4|w_i|) <= s_j`` (an exact test: multiplying by 4 is exact unless it
    overflows to inf, which only makes the test fail) then ``|w_i| / s_j <= 0.25`` in the reals, so
    ``fl(|w_i| / s_j) <= 0.25`` and the code is 0 (0.25 ties to 0); with ``s_j`` finite, ``deq_i = 0`` and the
    term is exactly ``t_i = fl(w_i^2)`` (if ``s_j`` is inf the error is NaN and j cannot win anyway).
    Let ``a_1 <= ... <= a_16`` be the sorted ``|w|`` and ``L_k`` a float32 cumulative sum of the k smallest
    ``t``. For non-negative summands any fp32 summation order has relative error <= gamma_15 = 15u/(1-15u)
    (subnormal additions are exact), so ``E_j >= (1 - gamma_15) S_k`` and ``L_k <= (1 + gamma_15) S_k`` where
    ``S_k`` is the exact sum of those k terms: ``E_j >= (1 - 2 gamma_15) L_k``, with ``2 gamma_15 < 1.8e-6``.
    We skip j when ``s_j >= fl(4 a_k)`` for the first k with ``L_k > T``, ``T = fl(fl(U (1 + 2^-16)) + 2^-126)``.
    If U is normal, ``T >= U (1 + 2^-16)(1 - u) > U (1 + 1.5e-5)`` and ``(1 - 1.8e-6)(1 + 1.5e-5) > 1``;
    if U is subnormal, ``T = fl(U') + 2^-126 >= U + 2^-126`` exactly and ``1.8e-6 * 2^-125 < 2^-126``; if
    ``U(1 + 2^-16)`` overflows, T = inf and nothing is skipped. Either way ``E_j > U``.
 4. The window is [first, last] non-skipped candidate, so it contains every candidate that could be the
    answer, in ascending order; scanning it with the reference's strict ``<`` update gives the same index.
    m itself is never skipped (``B_m <= E_m = U < T``), so the window is non-empty. Pruning is switched off
    (window = all 126) for a block whose U is not finite, whose max scale is not a candidate (NaN), or whose
    global scale is not finite and > 0.
"""

from __future__ import annotations

import torch

from moequant.formats.fp8 import e4m3_positive_values
from moequant.formats.mse import METHODS
from moequant.formats.nvfp4 import BLOCK_SIZE, E2M1_MAX, expand_global, max_block_scales, to_blocks

NUM_CANDIDATES = 126
BLOCKS_PER_CHUNK = 1 << 16  # [chunk, 126] fp32 tables are 32 MiB; [16, chunk] error terms 4 MiB each
_SUM_MARGIN = 1.0 + 2.0**-16  # > 1 + 2 gamma_15 with room for the rounding of T (proof step 3)
_TINY_F32 = 2.0**-126


def _e2m1_magnitude_f32(x: torch.Tensor) -> torch.Tensor:
    """E2M1 value of ``x >= 0`` (or NaN), same rounding as ``fp4.encode_e2m1``: RNE ties, saturate at 6, NaN -> 0.

    On each binade range the E2M1 grid is uniform with step 0.5 / 1 / 2, and even codes are even multiples of
    the step, so round-half-even of ``x / step`` (exact: step is a power of two) is the reference's tie rule.
    """
    x = torch.fmax(x, torch.zeros((), dtype=x.dtype, device=x.device))  # NaN (0/0) -> 0 like the reference
    fine = torch.round(x * 2.0) * 0.5  # x in [0, 2): step 0.5
    mid = torch.round(x)  # x in [2, 4): step 1
    coarse = torch.round(x * 0.5) * 2.0  # x in [4, inf]: step 2
    v = torch.where(x < 2.0, fine, torch.where(x < 4.0, mid, coarse))
    return v.clamp_max(E2M1_MAX)


def _block_error_f32(wabs_t: torch.Tensor, scale_f32: torch.Tensor) -> torch.Tensor:
    """fp32 squared error ``[n]`` of blocks ``|w|`` stored element-major ``[16, n]`` at scales ``[n]``.

    Op for op ``nvfp4.block_squared_error`` on magnitudes (proof step 0): divide, E2M1 round, multiply,
    subtract, square, then a left-to-right sum over the 16 elements.
    """
    deq = _e2m1_magnitude_f32(wabs_t / scale_f32) * scale_f32  # [16, n]
    diff = wabs_t - deq
    sq = diff * diff
    total = sq[0]
    for i in range(1, BLOCK_SIZE):
        total = total + sq[i]
    return total


def _skip_mask(wabs: torch.Tensor, scale_rows: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Candidates ``[n, 126]`` proven to have error > ``upper [n]`` (proof steps 2 and 3); wabs ``[n, 16]``."""
    amax = wabs.amax(dim=1, keepdim=True)  # [n, 1]
    gap = (amax - 6.0 * scale_rows).clamp_min(0.0)  # [n, 126]
    skip = gap * gap > upper[:, None]
    sorted_abs = wabs.sort(dim=1).values  # [n, 16]
    partial = torch.cumsum(sorted_abs * sorted_abs, dim=1)  # L_k, [n, 16]
    threshold = upper * _SUM_MARGIN + _TINY_F32  # T, [n]
    over = partial > threshold[:, None]
    first = over.to(torch.uint8).argmax(dim=1, keepdim=True)  # first k with L_k > T, [n, 1]
    zero_scale = 4.0 * sorted_abs.gather(1, first)  # [n, 1]
    zero_scale = torch.where(over.any(dim=1, keepdim=True), zero_scale, torch.full_like(zero_scale, float("inf")))
    return skip | (scale_rows >= zero_scale)


def _windows(wabs: torch.Tensor, scale_rows: torch.Tensor, max_index: torch.Tensor, prune_ok: torch.Tensor):
    """Per-block candidate window ``[lo, hi]`` (inclusive, each ``[n]``) that holds the reference's answer."""
    s_max = scale_rows.gather(1, max_index[:, None]).squeeze(1)  # [n]
    upper = _block_error_f32(wabs.t(), s_max)  # U = E_m, [n]
    prune_ok = prune_ok & torch.isfinite(upper)
    keep = ~_skip_mask(wabs, scale_rows, upper)  # [n, 126]
    keep |= ~prune_ok[:, None]
    keep.scatter_(1, max_index[:, None], True)  # belt and braces: m is provably kept already
    keep_u8 = keep.to(torch.uint8)
    lo = keep_u8.argmax(dim=1)
    hi = NUM_CANDIDATES - 1 - keep_u8.flip(1).argmax(dim=1)
    return lo, hi


def _scan_windows(wabs_t: torch.Tensor, scale_rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Best candidate index ``[n]`` over each block's window, reference tie rule (strict ``<``, ascending).

    Blocks are sorted by window width (descending) so that the blocks still scanning at offset j are a prefix.
    """
    width = hi - lo + 1  # [n]
    order = torch.argsort(width, descending=True, stable=True)
    wabs_t, scale_rows, lo, width = wabs_t[:, order], scale_rows[order], lo[order], width[order]
    max_width = int(width[0]) if width.numel() else 0
    active = torch.bincount(width, minlength=max_width + 1).flip(0).cumsum(0).flip(0).tolist()  # [W + 1]
    best_err = torch.full(lo.shape, float("inf"), dtype=torch.float32, device=lo.device)
    best_idx = lo.clone()
    for offset in range(max_width):
        n = active[offset + 1]  # blocks with width > offset
        idx = lo[:n] + offset
        scale = scale_rows[:n].gather(1, idx[:, None]).squeeze(1)  # [n]
        err = _block_error_f32(wabs_t[:, :n], scale)
        better = err < best_err[:n]
        best_err[:n] = torch.where(better, err, best_err[:n])
        best_idx[:n] = torch.where(better, idx, best_idx[:n])
    result = torch.empty_like(best_idx)
    result[order] = best_idx
    return result


def _mse_chunk(wabs: torch.Tensor, scale_rows: torch.Tensor, max_index: torch.Tensor, prune_ok: torch.Tensor):
    """Best candidate index ``[n]`` and window widths ``[n]`` for blocks ``|w| [n, 16]``."""
    lo, hi = _windows(wabs, scale_rows, max_index, prune_ok)
    best = _scan_windows(wabs.t().contiguous(), scale_rows, lo, hi)
    return best, hi - lo + 1


def mse_block_scales(w: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE block scales float8_e4m3fn ``[..., N, K/16]`` and the window width per block (int64, same shape)."""
    blocks = to_blocks(w)  # [*B, N, K/16, 16] f32
    gs = expand_global(global_scale, blocks)  # [*B, 1, 1, 1] (or [1]*batch for a scalar)
    out_shape = blocks.shape[:-1]
    max_bits = max_block_scales(blocks, global_scale).view(torch.uint8).reshape(-1).long()  # [nb]
    prune_ok = (max_bits >= 1) & (max_bits <= NUM_CANDIDATES)
    gs_flat = gs.expand(*blocks.shape[:-3], 1, 1, 1).reshape(-1)  # [batch]
    gs_ok = torch.isfinite(gs_flat) & (gs_flat > 0)
    table = e4m3_positive_values(w.device)[None, :] * gs_flat[:, None]  # s_j per batch, [batch, 126]
    wabs = blocks.reshape(-1, BLOCK_SIZE).abs()  # [nb, 16]
    per_batch = out_shape[-2] * out_shape[-1] if len(out_shape) >= 2 else 1
    best = torch.empty(wabs.shape[0], dtype=torch.long, device=w.device)
    width = torch.empty_like(best)
    for start in range(0, wabs.shape[0], BLOCKS_PER_CHUNK):
        stop = min(start + BLOCKS_PER_CHUNK, wabs.shape[0])
        batch_id = torch.arange(start, stop, device=w.device) // per_batch  # [n]
        ok = prune_ok[start:stop] & gs_ok[batch_id]
        max_index = (max_bits[start:stop] - 1).clamp(0, NUM_CANDIDATES - 1)
        best[start:stop], width[start:stop] = _mse_chunk(wabs[start:stop], table[batch_id], max_index, ok)
    scales = (best + 1).to(torch.uint8).view(torch.float8_e4m3fn)  # candidate j has E4M3 bits j + 1
    return scales.reshape(out_shape), width.reshape(out_shape)


def search_block_scales(w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse") -> torch.Tensor:
    """Block scales (float8_e4m3fn ``[..., N, K/16]``) of ``w [..., N, K]``; see the module docstring."""
    if method == "max":
        return max_block_scales(to_blocks(w), global_scale)
    if method == "mse":
        return mse_block_scales(w, global_scale)[0]
    raise ValueError(f"unknown block-scale method {method!r}; expected one of {METHODS}")
