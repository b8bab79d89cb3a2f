"""Vectorized torch twin of ``formats.weighted_mse`` (any device): bit-identical weighted-MSE block scales.

A tiny tensor is exponent-normalized first (``nvfp4.exponent_normalized``, as the reference does). Like
``torch_mse`` it works per batch index and per chunk of blocks, element-major (``[16, n]``), and scans
per block only a window of candidates that provably contains the reference's answer, each candidate with the
reference's exact fp32 ops (``weighted_error_f32``). Notation as in ``torch_mse``: ``s_j = fl(c_j * g)``,
``E_j`` the reference's weighted error at ``s_j``, ``m`` the block's "max" candidate, ``U = E_m``; weights
``h_i`` finite >= 0 (checked), so ``fl(x * h_i)`` is monotone in x >= 0 and a left-to-right fp32 sum of
non-negative terms is monotone in every term: lower bounds on terms give lower bounds on ``E_j``.

 0. Fast path only where ``g`` is finite > 0 and every ``s_j`` is finite > 0 (else the reference runs); then
    ``E_j`` depends on ``w`` only through ``|w|`` and ``e2m1_magnitude_f32`` is the reference's rounding
    (``torch_mse`` proof steps 0-1; the extra multiply by ``h_i`` is applied to the same ``d_i^2``).
 1. The answer a has ``E_a <= U``, and ``E_a < U`` if a > m (the tie rule keeps m over later equals). If U is
    not finite the window is all 126 candidates.
 2. Lower end. A code's magnitude is <= 6, so ``|d_i| >= fl(|w_i| - fl(6 s_j))`` when that is >= 0, for every
    element: ``E_j >= L_j`` = index-order sum of ``fl(fl(relu(fl(|w_i| - fl(6 s_j)))^2) * h_i)``, and L_j is
    non-increasing in j. ``L_j > U`` for some j proves that no index <= j is the answer. A binary search
    (7 steps cover 0..125) keeps ``left`` with ``L_left > U`` (or -1); ``lo = left + 1 <= m`` (``L_m <= U``).
 3. Upper end. With ``hh = fl(0.5 s_k)``, element ``a = |w_i|``: for every j >= k the term is at least
    ``fl(fl(min(a, relu(fl(hh - a)))^2) * h_i)`` (``torch_mse`` proof step 4); their index-order sum ``Z_k``
    is a lower bound of ``E_j`` for all j >= k. ``Z_k >= U`` for some k > m proves that no index >= k is the
    answer (step 1). A binary search keeps ``right`` = 126 or such a k; ``hi = right - 1 >= m``.
 4. The window [lo, hi] is scanned in ascending order with the strict ``<`` update (first minimum wins).
"""

from __future__ import annotations

import torch

from moequant.formats.fp8 import E4M3_MIN_SUBNORMAL, e4m3_positive_values, round_to_e4m3
from moequant.formats.nvfp4 import BLOCK_SIZE, E2M1_MAX, check_finite, expand_global, exponent_normalized
from moequant.formats.weighted_mse import check_channel_weights, weighted_mse_block_scales_reference
from moequant.kernels.cpu_workers import cpu_workers
from moequant.kernels.torch_mse import e2m1_magnitude_f32

NUM_CANDIDATES = 126
BLOCKS_PER_CHUNK = 16384
SEARCH_STEPS = 7  # 2^7 = 128 > 126 candidates


def _index_sum(terms: torch.Tensor) -> torch.Tensor:
    """Left-to-right fp32 sum over the 16 rows of ``[16, n]`` (the reference's order)."""
    total = terms[0].clone()
    for i in range(1, BLOCK_SIZE):
        total.add_(terms[i])
    return total


def weighted_error_f32(wabs_t: torch.Tensor, h_t: torch.Tensor, scale_f32: torch.Tensor) -> torch.Tensor:
    """Weighted fp32 error ``[n]`` of blocks ``|w|`` ``[16, n]`` with weights ``h_t [16, n]`` at scales ``[n]``."""
    deq = e2m1_magnitude_f32(wabs_t / scale_f32).mul_(scale_f32)
    diff = torch.sub(wabs_t, deq, out=deq)
    return _index_sum(diff.mul_(diff).mul_(h_t))


def _lower_bound(wabs_t, h_t, scale_f32):
    """``L_j`` of proof step 2 at scales ``[n]``."""
    gap = torch.sub(wabs_t, scale_f32 * 6.0).clamp_min_(0.0)
    return _index_sum(gap.mul_(gap).mul_(h_t))


def _tail_bound(wabs_t, h_t, scale_f32):
    """``Z_k`` of proof step 3 at scales ``s_k`` ``[n]``."""
    half = scale_f32 * 0.5
    bound = torch.minimum(torch.sub(half, wabs_t).clamp_min_(0.0), wabs_t)
    return _index_sum(bound.mul_(bound).mul_(h_t))


def _window(wabs_t, h_t, upper, max_index, table):
    """[lo, hi] per block (proof steps 2-3)."""
    left = torch.full_like(max_index, -1)
    right = max_index.clone()
    for _ in range(SEARCH_STEPS):
        mid = torch.div(left + right, 2, rounding_mode="floor").clamp_(min=0)
        probe = right - left > 1
        passed = probe & (_lower_bound(wabs_t, h_t, table.index_select(0, mid)) > upper)
        left = torch.where(passed, mid, left)
        right = torch.where(probe & ~passed, mid, right)
    lo = left + 1
    left, right = max_index.clone(), torch.full_like(max_index, NUM_CANDIDATES)
    for _ in range(SEARCH_STEPS):
        mid = torch.div(left + right, 2, rounding_mode="floor")
        probe = (right - left > 1) & (mid > max_index)
        k = mid.clamp(max=NUM_CANDIDATES - 1)
        passed = probe & (_tail_bound(wabs_t, h_t, table.index_select(0, k)) >= upper)
        right = torch.where(passed, mid, right)
        left = torch.where(probe & ~passed, mid, left)
    finite = torch.isfinite(upper)
    return torch.where(finite, lo, 0), torch.where(finite, right - 1, NUM_CANDIDATES - 1)


def _scan(wabs_t, h_t, table, lo, hi):
    """Best index ``[n]`` over each window, ascending, strict ``<`` (blocks sorted by window width)."""
    width = hi - lo + 1
    order = torch.argsort(width, descending=True)
    wabs_t, h_t, lo, width = wabs_t.index_select(1, order), h_t.index_select(1, order), lo[order], width[order]
    active = torch.bincount(width, minlength=NUM_CANDIDATES + 1).flip(0).cumsum(0).flip(0).tolist()
    best_err = torch.full(lo.shape, float("inf"), dtype=torch.float32, device=lo.device)
    best_idx = lo.clone()
    for offset in range(int(width[0]) if width.numel() else 0):
        n = active[offset + 1]
        idx = lo[:n] + offset
        err = weighted_error_f32(wabs_t[:, :n], h_t[:, :n], table.index_select(0, idx))
        better = err < best_err[:n]
        best_err[:n] = torch.where(better, err, best_err[:n])
        best_idx[:n] = torch.where(better, idx, best_idx[:n])
    result = torch.empty_like(best_idx)
    result[order] = best_idx
    return result


def _search_chunk(wb, hb, global_f32, table):
    """E4M3 bits ``[n]`` (uint8) for blocks ``wb [n, 16]`` with weights ``hb [n, 16]``."""
    wabs_t = wb.to(torch.float32).abs().t().contiguous()  # [16, n]
    h_t = hb.t().contiguous()
    amax = wabs_t.amax(dim=0)
    six = torch.tensor(E2M1_MAX, dtype=torch.float32, device=wb.device)
    max_bits = round_to_e4m3((amax / six / global_f32).clamp_min(E4M3_MIN_SUBNORMAL)).view(torch.uint8)
    max_index = max_bits.long() - 1
    upper = weighted_error_f32(wabs_t, h_t, table.index_select(0, max_index))
    lo, hi = _window(wabs_t, h_t, upper, max_index, table)
    return (_scan(wabs_t, h_t, table, lo, hi) + 1).to(torch.uint8)




def search_weighted(w: torch.Tensor, global_scale: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Twin of ``formats.weighted_mse.search_weighted_reference``: float8_e4m3fn ``[..., N, K/16]``."""
    check_finite(w, "weight")
    check_channel_weights(h, w, "weight")
    w, global_scale, _ = exponent_normalized(w.detach(), global_scale)  # tiny tensors: nvfp4's docstring
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)  # [*B, N, K/16, 16]
    batch_shape = blocks.shape[:-3]
    global_f32 = expand_global(global_scale, blocks).expand(*batch_shape, 1, 1, 1).reshape(-1).to(w.device)
    batch, n_rows, n_cols = global_f32.numel(), blocks.shape[-3], blocks.shape[-2]
    flat = blocks.reshape(batch, n_rows * n_cols, BLOCK_SIZE)
    hh = h.detach().to(torch.float32).reshape(-1, n_cols, BLOCK_SIZE).expand(batch, n_cols, BLOCK_SIZE)
    out = torch.empty(flat.shape[:2], dtype=torch.uint8, device=w.device)
    items, tables = [], {}
    for b in range(batch):
        tables[b] = e4m3_positive_values(w.device) * global_f32[b]
        ok = bool(torch.isfinite(global_f32[b]) & (global_f32[b] > 0)) and bool(
            (torch.isfinite(tables[b]) & (tables[b] > 0)).all())
        if not ok:
            ref = weighted_mse_block_scales_reference(
                flat[b].to(torch.float32).reshape(n_rows, n_cols, BLOCK_SIZE), global_f32[b], hh[b][None])[0]
            out[b] = ref.view(torch.uint8).reshape(-1)
            continue
        items += [(b, s, min(s + BLOCKS_PER_CHUNK, flat.shape[1])) for s in range(0, flat.shape[1], BLOCKS_PER_CHUNK)]

    def run(item):
        b, start, stop = item
        cols = torch.arange(start, stop, device=w.device) % n_cols
        out[b, start:stop] = _search_chunk(flat[b, start:stop], hh[b].index_select(0, cols), global_f32[b], tables[b])

    with cpu_workers(w.device) as mapper:
        list(mapper(run, items))
    return out.view(torch.float8_e4m3fn).reshape(*blocks.shape[:-1])
