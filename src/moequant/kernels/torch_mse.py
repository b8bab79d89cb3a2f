"""Vectorized torch twin of ``moequant.formats.mse.search_block_scales_reference`` (any device).

Same contract, bit-identical float8_e4m3fn block scales. Work is done per batch index (expert) and per chunk
of blocks, element-major (``[16, n]``), so that every intermediate (about 1 MiB) stays in cache.
"mse" evaluates, per block, only a window of candidates that provably contains the reference's answer,
each with the reference's exact fp32 arithmetic (``block_error_f32``).

Notation: candidates ``c_0 < ... < c_125`` (E4M3 bits 1..126), ``s_j = fl(c_j * g)``, ``E_j`` the fp32 block
error of ``nvfp4.block_squared_error`` at ``s_j``; ``fl`` is round-to-nearest-even fp32, ``u = 2^-24``.
The reference answer is the smallest ``j`` whose ``E_j`` is strictly below every earlier ``E_i`` and not above
any later one (NaN/inf never replace the initial +inf; with no finite ``E_j`` it is ``j = 0``).

Proof sketch that the fast path returns the same index:
 0. Fast path only where ``g`` is finite > 0 and every scale used is finite > 0 (``_fast_path_ok``; else
    the reference itself runs). Then ``s_j`` is non-decreasing in j (``fl`` is monotone), ``x = fl(|w|/s)``
    is in [0, +inf], never NaN, and ``E_j`` depends on ``w`` only through ``|w|``: ``fl(|w|/s) = |fl(w/s)|``,
    a negative value's code is the negated code of its magnitude (or +0), and RN is sign-symmetric, so
    ``deq``'s magnitude and every ``d_i^2`` are unchanged. The ops are the reference's, one by one (no FMA).
 1. ``e2m1_magnitude_f32`` equals the reference's encode+decode on ``x`` in [0, +inf]: clamping at 6 changes
    no code (everything above 5 codes to 6; +inf too); on [0, 2), [2, 4), [4, 6] the grid is uniform with
    step ``0.5 * max(2^floor(log2 x), 1)`` = 0.5, 1, 2 (x < 1, zero and subnormals included, gets 0.5), the
    even codes are the even multiples of the step, so ``round_half_even(x / step) * step`` (exact: the step
    is a power of two) applies the reference's ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4,
    5->4 (1.75 and 3.5 round up into the next range's first value, as they must).
 2. Let m be the block's "max" candidate (computed with the ops of ``nvfp4.max_block_scales``, so "max" is
    identical too) and ``U = E_m``, finite. The answer a has ``E_a <= U``, and ``E_a < U`` if a < m (tie
    rule). So j < m with ``E_j > U`` and j > m with ``E_j >= U`` are never the answer.
    ``fl`` is monotone, so a sequential fp32 sum of non-negative terms is monotone in every term and at
    least each term: lower bounds on some terms of ``E_j`` (others >= 0) give an exact fp32 lower bound.
 3. Lower end. Every E2M1 magnitude is <= 6, so for the element with ``|w_i| = amax``,
    ``|d_i| >= fl(amax - fl(6 s_j))`` whenever that is >= 0 (monotone rounding), hence
    ``E_j >= B_j = fl(relu(fl(amax - fl(6 s_j)))^2)``, computed with exactly these ops. ``B_j`` is
    non-increasing in j, so ``B_{lo-1} > U`` proves ``E_j > U`` for every ``j < lo``. ``lo`` is estimated
    from ``amax - sqrt(U)`` (any estimate would do) and kept only if that exact test passes (else a
    smaller estimate, finally 0); ``lo <= m``.
 4. Upper end. Take ``h = fl(0.5 s_k)`` and an element ``a = |w_i|``. If ``h > a`` then ``0.5 s_k > a`` (else
    monotone rounding would give ``h <= a``), so for every ``j >= k``: ``fl(a / s_j) <= 0.5`` and the code is
    0 (term ``fl(a^2)``) or 0.5, whose ``deq = fl(0.5 s_j) >= h > a`` gives ``|d| >= fl(h - a)``. Either way the
    term is ``>= fl(min(a, fl(h - a))^2)``; for ``h <= a`` the bound ``fl(min(a, relu(fl(h - a)))^2)`` is 0.
    So ``Z_k``, the index-order fp32 sum of these bounds, satisfies ``E_j >= Z_k`` for all ``j >= k``. Any
    k > m with ``Z_k >= U`` thus proves ``hi = k - 1``; a short binary search looks for a small such k
    (``Z_k`` grows with k, which only matters for how small), else ``hi = 125``; ``hi >= m``.
 5. The window [lo, hi] contains every candidate that could be the answer; it is scanned in ascending order
    with the reference's strict ``<`` update, so the first minimum wins as in the reference. If U is not
    finite, the window is all 126 candidates (plain exhaustive search with the same arithmetic).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from moequant.formats.fp8 import E4M3_MIN_SUBNORMAL, e4m3_positive_values, round_to_e4m3
from moequant.formats.mse import METHODS, search_block_scales_reference
from moequant.formats.nvfp4 import BLOCK_SIZE, E2M1_MAX, block_squared_error, expand_global

NUM_CANDIDATES = 126
BLOCKS_PER_CHUNK = 16384  # [16, chunk] fp32 = 1 MiB per intermediate (about one core's L2)
UPPER_SPAN = 32  # the window end is searched in (m, m + 32]
UPPER_PROBES = 4  # binary-search steps for it (end within 2 candidates of the best the bound allows)
_EXPONENT_MASK = 0x7F800000
_ONE_BITS = 0x3F800000  # float32 1.0


def e2m1_magnitude_f32(x: torch.Tensor) -> torch.Tensor:
    """E2M1 value of finite-or-+inf ``x >= 0`` (fp32), the reference's rounding (proof step 1). Consumes x."""
    x = x.clamp_max_(E2M1_MAX)
    mask = torch.tensor(_EXPONENT_MASK, dtype=torch.int32, device=x.device)
    step_bits = (x.view(torch.int32) & mask).clamp_min_(_ONE_BITS)  # max(2^floor(log2 x), 1)
    step = step_bits.view(torch.float32).mul_(0.5)
    return torch.round(x.div_(step)).mul_(step)


def block_error_f32(wabs_t: torch.Tensor, scale_f32: torch.Tensor) -> torch.Tensor:
    """fp32 squared error ``[n]`` of blocks ``|w|`` stored element-major ``[16, n]`` at scales ``[n]``.

    Op for op ``nvfp4.block_squared_error`` (proof steps 0-1): divide, E2M1 round, multiply, subtract,
    square, then a left-to-right sum over the 16 elements.
    """
    deq = e2m1_magnitude_f32(wabs_t / scale_f32).mul_(scale_f32)  # [16, n]
    diff = torch.sub(wabs_t, deq, out=deq)
    sq = diff.mul_(diff)
    total = sq[0].clone()
    for i in range(1, BLOCK_SIZE):
        total.add_(sq[i])
    return total


def _saturation_bound(amax: torch.Tensor, scale_f32: torch.Tensor) -> torch.Tensor:
    """``B_j`` of proof step 3, ``[n]``."""
    gap = (amax - 6.0 * scale_f32).clamp_min_(0.0)
    return gap * gap


def _lower_end(amax, upper, max_index, scale_table, global_f32):
    """Smallest window start ``[n]`` proven by proof step 3 (estimate, then exact check; fallback 0)."""
    target = ((amax - upper.sqrt()) / E2M1_MAX / global_f32).clamp_(E4M3_MIN_SUBNORMAL, 448.0)
    estimate = target.to(torch.float8_e4m3fn).view(torch.uint8).long() - 1  # nearest candidate index
    lo = torch.zeros_like(max_index)
    for back in (2, 0):  # tried from the weakest; the last that verifies wins
        start = torch.minimum((estimate - back).clamp_(min=0), max_index)
        below = scale_table.index_select(0, (start - 1).clamp_(min=0))
        proven = (start == 0) | (_saturation_bound(amax, below) > upper)
        lo = torch.where(proven, start, lo)
    return lo


def _tail_bound(wabs_t, k, scale_table):
    """``Z_k`` of proof step 4, ``[n]``: index-order fp32 sum of ``min(|w|, relu(fl(s_k / 2) - |w|))^2``."""
    half = scale_table.index_select(0, k.clamp(max=NUM_CANDIDATES - 1)).mul_(0.5)  # fl(0.5 s_k), [n]
    bound = torch.minimum(torch.sub(half, wabs_t).clamp_min_(0.0), wabs_t)  # [16, n]
    terms = bound.mul_(bound)
    total = terms[0].clone()
    for i in range(1, BLOCK_SIZE):
        total.add_(terms[i])
    return total


def _upper_end(wabs_t, upper, max_index, scale_table):
    """Window end ``[n]`` proven by proof step 4: binary search for the first k > m with ``Z_k >= U``.

    ``Z_k`` is non-decreasing in k. The bracket is (m, m + UPPER_SPAN]; if no probe proves anything the
    end stays at 125 (the bracket's right end is only assumed, never used unproven).
    """
    left = max_index.clone()
    right = (max_index + UPPER_SPAN).clamp_(max=NUM_CANDIDATES)  # 126 = past the last candidate
    proven = right == NUM_CANDIDATES
    for _ in range(UPPER_PROBES):
        k = (left + right) // 2
        passed = (k > max_index) & (k < NUM_CANDIDATES) & (_tail_bound(wabs_t, k, scale_table) >= upper)
        right = torch.where(passed, k, right)
        left = torch.where(passed, left, k)
        proven |= passed
    return torch.where(proven, right - 1, NUM_CANDIDATES - 1)


def _scan_windows(wabs_t: torch.Tensor, scale_table: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Best candidate index ``[n]`` over each block's window, reference tie rule (strict ``<``, ascending).

    Blocks are ordered by window width (descending) so those still scanning at offset j are a prefix.
    """
    width = hi - lo + 1  # [n]
    order = torch.argsort(width, descending=True)
    wabs_t, lo, width = wabs_t.index_select(1, order), lo[order], width[order]
    active = torch.bincount(width, minlength=NUM_CANDIDATES + 1).flip(0).cumsum(0).flip(0).tolist()
    best_err = torch.full(lo.shape, float("inf"), dtype=torch.float32, device=lo.device)
    best_idx = lo.clone()
    for offset in range(int(width[0]) if width.numel() else 0):
        n = active[offset + 1]  # blocks whose window is wider than offset
        idx = lo[:n] + offset
        err = block_error_f32(wabs_t[:, :n], scale_table.index_select(0, idx))
        better = err < best_err[:n]
        torch.fmin(best_err[:n], err, out=best_err[:n])  # == where(better, err, best): NaN never wins
        best_idx[:n] = torch.where(better, idx, best_idx[:n])
    result = torch.empty_like(best_idx)
    result[order] = best_idx
    return result, width.sum()


def _mse_chunk(wabs_t, amax, max_index, scale_table, global_f32):
    """Best candidate index ``[n]`` and total window width for blocks ``|w|`` ``[16, n]``."""
    upper = block_error_f32(wabs_t, scale_table.index_select(0, max_index))  # U = E_m, [n]
    lo = _lower_end(amax, upper, max_index, scale_table, global_f32)
    hi = _upper_end(wabs_t, upper, max_index, scale_table)
    finite = torch.isfinite(upper)
    lo = torch.where(finite, lo, 0)
    hi = torch.where(finite, hi, NUM_CANDIDATES - 1)
    return _scan_windows(wabs_t, scale_table, lo, hi)


def _fast_path_ok(global_f32: torch.Tensor, scale_f32: torch.Tensor) -> bool:
    """Proof step 0: ``g`` finite > 0 and every effective scale finite > 0 (else the reference runs)."""
    g_ok = bool(torch.isfinite(global_f32) & (global_f32 > 0))
    return g_ok and bool((torch.isfinite(scale_f32) & (scale_f32 > 0)).all())


def _abs_t(w_blocks: torch.Tensor) -> torch.Tensor:
    """``|w|`` as float32, element-major: ``[n, 16]`` -> ``[16, n]`` (a new tensor, never aliasing w)."""
    return w_blocks.to(torch.float32).abs().t().contiguous()


def _search_chunk(wb: torch.Tensor, global_f32: torch.Tensor, method: str, scale_table: torch.Tensor,
                  six: torch.Tensor) -> tuple[torch.Tensor, int]:
    """E4M3 bits ``[n]`` (uint8) and summed window width for blocks ``wb [n, 16]`` of one batch index."""
    wabs_t = _abs_t(wb)  # [16, n]
    amax = wabs_t.amax(dim=0)  # [n]
    # nvfp4.max_block_scales: amax / 6 / global (IEEE divisions), at least 2^-9, e4m3 with saturation
    max_bits = round_to_e4m3((amax / six / global_f32).clamp_min(E4M3_MIN_SUBNORMAL)).view(torch.uint8)
    if method == "max":
        return max_bits, 0
    best, width_sum = _mse_chunk(wabs_t, amax, max_bits.long() - 1, scale_table, global_f32)
    return (best + 1).to(torch.uint8), int(width_sum)  # candidate j has E4M3 bits j + 1


@contextmanager
def _cpu_workers(device: torch.device):
    """A map over independent chunks: on a multi-threaded CPU, Python threads each running single-threaded
    torch ops (the ops release the GIL). Small per-chunk ops under torch's own intra-op pool spend most of
    their time in thread hand-offs, and collapse when the machine is oversubscribed (measured: 2 threads
    0.6 M elements/s vs 8.8 with 1 on a loaded 2-core machine). The intra-op thread count is process-wide:
    it is restored in ``finally``."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1:
        yield map
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            yield lambda fn, items: pool.map(torch.no_grad()(fn), items)
    finally:
        torch.set_num_threads(threads)


def _batched_blocks(w: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """``w [..., N, K]`` -> blocks ``[batch, nb, 16]`` (a view when possible), global ``[batch]``, out shape."""
    if w.ndim < 2 or w.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"expected w [..., N, K] with K divisible by {BLOCK_SIZE}, got shape {tuple(w.shape)}")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)  # [*B, N, K/16, 16]
    global_f32 = expand_global(global_scale, blocks).expand(*blocks.shape[:-3], 1, 1, 1).reshape(-1).to(w.device)
    per_batch = blocks.shape[-3] * blocks.shape[-2]
    return blocks.reshape(global_f32.numel(), per_batch, BLOCK_SIZE), global_f32, blocks.shape[:-1]


def search_block_scales_with_stats(w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse"):
    """``search_block_scales`` plus the mean number of candidates evaluated per block (window width)."""
    if method not in METHODS:
        raise ValueError(f"unknown block-scale method {method!r}; expected one of {METHODS}")
    w = w.detach()  # worker threads do not inherit the caller's no_grad mode
    flat, global_f32, out_shape = _batched_blocks(w, global_scale)  # [batch, nb, 16], [batch]
    out = torch.empty(flat.shape[:2], dtype=torch.uint8, device=w.device)  # [batch, nb] E4M3 bits
    six = torch.tensor(E2M1_MAX, dtype=torch.float32, device=w.device)  # tensor divisor: see module notes
    tables, items, width = {}, [], 0
    for b in range(flat.shape[0]):
        tables[b] = e4m3_positive_values(w.device) * global_f32[b]  # s_j, [126]
        if method == "mse" and not _fast_path_ok(global_f32[b], tables[b]):
            ref = search_block_scales_reference(flat[b].unsqueeze(0), global_f32[b], "mse")
            out[b] = ref.view(torch.uint8).reshape(-1)
            width += NUM_CANDIDATES * flat.shape[1]
            continue
        items += [(b, start, min(start + BLOCKS_PER_CHUNK, flat.shape[1]))
                  for start in range(0, flat.shape[1], BLOCKS_PER_CHUNK)]

    def run(item):
        b, start, stop = item
        bits, chunk_width = _search_chunk(flat[b, start:stop], global_f32[b], method, tables[b], six)
        out[b, start:stop] = bits
        return chunk_width

    with _cpu_workers(w.device) as mapper:
        width += sum(mapper(run, items))
    num_blocks = max(flat.shape[0] * flat.shape[1], 1)
    return out.view(torch.float8_e4m3fn).reshape(out_shape), width / num_blocks


def search_block_scales(w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse") -> torch.Tensor:
    """Block scales (float8_e4m3fn ``[..., N, K/16]``) of ``w [..., N, K]``: "max" or exact "mse"."""
    return search_block_scales_with_stats(w, global_scale, method)[0]


def weight_squared_error(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """Twin of ``nvfp4.weight_squared_error``: per-block fp32 squared error ``[..., N, K/16]``, same bits."""
    w = w.detach()  # worker threads do not inherit the caller's no_grad mode
    flat, global_f32, out_shape = _batched_blocks(w, global_scale)  # [batch, nb, 16], [batch]
    block_f32 = block_scale.to(torch.float32).reshape(flat.shape[:2])  # [batch, nb]
    out = torch.empty(flat.shape[:2], dtype=torch.float32, device=w.device)
    items = [(b, start, min(start + BLOCKS_PER_CHUNK, flat.shape[1]))
             for b in range(flat.shape[0]) for start in range(0, flat.shape[1], BLOCKS_PER_CHUNK)]

    def run(item):
        b, start, stop = item
        scale = block_f32[b, start:stop] * global_f32[b]  # nvfp4.effective_scale, [n]
        if _fast_path_ok(global_f32[b], scale):
            out[b, start:stop] = block_error_f32(_abs_t(flat[b, start:stop]), scale)
        else:
            out[b, start:stop] = block_squared_error(flat[b, start:stop].to(torch.float32), scale[:, None])

    with _cpu_workers(w.device) as mapper:
        list(mapper(run, items))
    return out.reshape(out_shape)
