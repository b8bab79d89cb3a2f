"""Vectorized torch twin of ``moequant.formats.mse.search_block_scales_reference`` (any device).

Same contract, bit-identical float8_e4m3fn block scales; a tiny tensor is exponent-normalized first with the
reference's own function (``nvfp4.exponent_normalized``), and the proof below is about the normalized tensor.
Work is done per batch index (expert) and per chunk of blocks (``BLOCKS_PER_CHUNK``), element-major
(``[16, n]``), on worker threads (``kernels.cpu_workers``). "mse" evaluates, per block, only a window of
candidates that provably contains the reference's answer (9 of 126 on real weights, more for under 1% of
blocks), each with the reference's exact fp32 arithmetic (``_errors_loop``: slices of ``SUB_BLOCKS`` blocks that
stay in cache, scratch reused across candidates, compiled by TorchScript where available so that the two
workers do not queue for the GIL between ops).

Notation: candidates ``c_0 < ... < c_125`` (E4M3 bits 1..126), ``s_j = fl(c_j * g)``, ``E_j`` the fp32 block
error of ``nvfp4.block_squared_error`` at ``s_j``; ``fl`` is round-to-nearest-even fp32, ``A`` the block amax.
The reference answer is the smallest ``j`` whose ``E_j`` is strictly below every earlier ``E_i`` and not above
any later one (NaN/inf never replace the initial +inf; with no finite ``E_j`` it is ``j = 0``).

Proof sketch that the fast path returns the same index:
 0. Fast path only where ``g`` is finite > 0 and every scale used is finite > 0 (``_fast_path_ok``; else
    the reference itself runs). Then ``s_j`` is non-decreasing in j (``fl`` is monotone), ``x = fl(|w|/s)``
    is in [0, +inf], never NaN, and ``E_j`` depends on ``w`` only through ``|w|``: ``fl(|w|/s) = |fl(w/s)|``,
    a negative value's code is the negated code of its magnitude (or +0), and RN is sign-symmetric, so
    ``deq``'s magnitude and every ``d_i^2`` are unchanged. The ops are the reference's, one by one (no FMA
    that could change a rounding: see step 1). ``E_j`` is in [0, +inf], never NaN (``|w|`` is finite).
 1. ``e2m1_magnitude_f32`` equals the reference's encode+decode on ``x`` in [0, +inf]: clamping at 6 changes
    no code (everything above 5 codes to 6; +inf too). On [0, 2), [2, 4), [4, 6] the E2M1 grid is uniform
    with step 0.5, 1, 2 and its even codes are the even multiples of the step. With ``M = 2^22 *
    2^floor(log2(max(x, 1)))`` (= 2^22, 2^23, 2^24 on those ranges; an exponent mask on ``max(x, 1)``, exact),
    ``fl(x + M)`` lies in [M, 2M) whose ulp is exactly that step, so it is ``M + RNE(x)`` on the grid, ties
    to the even multiple (the sum's last significand bit); ``- M`` is exact (Sterbenz). That is the
    reference's rounding: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (1.75 and 3.5 round up
    into the next range's first value, as they must). torch's ``add_(M, alpha=2^22)`` multiplies exactly
    (a power of two), so fused or not it rounds once, as ``fl(x + 2^22 M')`` must.
 2. Upper end (doubling lemma, proven in ``kernels/triton_mse.py``'s docstring and docs/gpu-mse.md): for
    ``k >= 7``, ``s_k >= 2^-125``, ``2 s_k`` finite and ``fl(A / s_k) < 7``: ``E_{k+8} >= E_k``. With
    ``k7 = min{k : fl(A / s_k) < 7}`` (tested with that IEEE division; monotone in k, so any k passing the
    test is >= k7 and serves as well, ``_below_seven``) and ``k1 = max(k7, 7)``: if ``s_{k1} >= 2^-125``
    every candidate above ``k1 + 7`` chains down in steps of 8 to one in [k1, k1 + 7] with no larger error,
    and loses the tie by its larger index: ``hi = k1 + 7`` (capped at 125; 125 when the guard fails or no k
    passes). ``A == 0`` makes every ``E_j`` 0: the answer is 0, which the scan from 0 finds.
 3. Lower end. Every E2M1 magnitude is <= 6, so for the element with ``|w_i| = A``,
    ``|d_i| >= fl(A - fl(6 s_j))`` whenever that is >= 0 (monotone rounding), and an index-order fp32 sum of
    non-negative terms is at least each term: ``E_j >= B_j = fl(relu(fl(A - fl(6 s_j)))^2)``, computed with
    exactly these ops. ``B_j`` is non-increasing in j, so once ``B_{lo-1} > best`` (the minimum over the
    scanned [lo, hi], which holds the answer's error), every ``j < lo`` has ``E_j > E_answer``.
 4. The scan: a set S of candidates holding [lo, hi], ``lo = k7 - 1`` (any start is exact; this one needs
    the extension for under 1% of real blocks): [lo, lo + 8] for every block, then up to hi where the window
    is wider, in ascending order with the reference's strict ``<`` from +inf (the first minimum wins);
    then ``lo`` moves down one candidate at a time while ``B_{lo-1} <= best``, taking a candidate on ``<=``
    (a lower index wins a tie). Candidates of S above hi are harmless: none has a smaller error than the
    answer, and on a tie the answer's index is smaller. The result is the smallest index of the minimum
    over S, which is the answer. With no finite error the extension runs to 0 and returns 0, as the
    reference does.
"""

from __future__ import annotations

import threading
import warnings

import torch

from moequant.formats.fp8 import E4M3_MIN_SUBNORMAL, e4m3_positive_values, round_to_e4m3
from moequant.formats.mse import METHODS, search_block_scales_reference
from moequant.formats.nvfp4 import (
    BLOCK_SIZE,
    E2M1_MAX,
    block_squared_error,
    check_finite,
    expand_global,
    exponent_normalized,
    restore_errors,
)
from moequant.kernels.cpu_workers import cpu_workers

NUM_CANDIDATES = 126
BLOCKS_PER_CHUNK = 32768  # blocks per work item: per-block ([n]) bookkeeping amortizes its per-op overhead
SUB_BLOCKS = 8192  # [16, sub] fp32 = 512 KiB: the |w| slice and two scratch buffers stay in one core's L2
MAIN_WIDTH = 9  # candidates every block scans (k7 - 1 .. k7 + 7); wider windows continue on a subset
DOUBLING_MIN_SCALE = 2.0**-125  # proof step 2's guard
SEVEN = 7.0
_EXPONENT_MASK = 0x7F800000
_MAGIC_SHIFT = 2.0**22  # M = 2^22 * 2^floor(log2 max(x, 1)): fl(x + M) - M rounds x onto the E2M1 grid


def e2m1_round_(x: torch.Tensor, magic: torch.Tensor) -> torch.Tensor:
    """In place: E2M1 value of finite-or-+inf ``x >= 0`` (fp32), the reference's rounding (proof step 1).

    ``magic`` is scratch of ``x``'s shape (overwritten)."""
    x.clamp_max_(E2M1_MAX)
    torch.clamp_min(x, 1.0, out=magic)
    magic.view(torch.int32).bitwise_and_(_EXPONENT_MASK)  # 2^floor(log2 max(x, 1)): 1, 2 or 4
    return x.add_(magic, alpha=_MAGIC_SHIFT).sub_(magic, alpha=_MAGIC_SHIFT)


def e2m1_magnitude_f32(x: torch.Tensor) -> torch.Tensor:
    """E2M1 value of finite-or-+inf ``x >= 0`` (fp32), the reference's rounding (proof step 1). Consumes x."""
    return e2m1_round_(x, torch.empty_like(x))


def _errors_loop(wabs_t: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                 r_bits: torch.Tensor, sub: int) -> None:
    """``out[c, j]`` = fp32 error of block j (``|w|`` element-major ``wabs_t [16, n]``) at scale ``scales[c, j]``.

    Op for op ``nvfp4.block_squared_error`` (proof steps 0-1): divide, E2M1 round (``e2m1_round_``'s ops),
    multiply, subtract, square, then a left-to-right sum over the 16 elements. Column slices of ``sub``
    blocks, every row of ``scales`` back to back while the slice is in cache; ``q``, ``r`` ``[16, >= sub]``
    scratch, ``r_bits`` = ``r`` viewed as int32. Written in the TorchScript subset: ``_errors_runner`` runs it
    compiled (no Python between ops) or, where TorchScript is unavailable, as is."""
    n = wabs_t.shape[1]
    for start in range(0, n, sub):
        stop = min(start + sub, n)
        w = wabs_t[:, start:stop]
        qq, rr, bits = q[:, : stop - start], r[:, : stop - start], r_bits[:, : stop - start]
        for c in range(scales.shape[0]):
            s = scales[c, start:stop]
            torch.div(w, s, out=qq)
            qq.clamp_max_(6.0)
            torch.clamp_min(qq, 1.0, out=rr)
            bits.bitwise_and_(0x7F800000)  # 2^floor(log2 max(x, 1))
            qq.add_(rr, alpha=4194304.0).sub_(rr, alpha=4194304.0)  # 2^22: RNE onto the E2M1 grid
            qq.mul_(s)
            torch.sub(w, qq, out=rr)
            rr.mul_(rr)
            total = out[c, start:stop]
            torch.add(rr[0], rr[1], out=total)
            for i in range(2, 16):
                total.add_(rr[i])


_SCRIPTED: list = []  # [the compiled _errors_loop, or None where TorchScript is unavailable], made on first use
_SCRIPT_LOCK = threading.Lock()


def _errors_runner():
    """``_errors_loop`` compiled by TorchScript, else the Python function itself (the same ops either way).

    Why: the worker threads of ``kernels.cpu_workers`` hand the GIL to each other around every torch op; with
    about 150 ops per slice that hand-off, not the arithmetic, bounded two threads to the speed of one (measured on
    a 2-core VM: 54 M elements/s with 1 or 2 threads in Python, 56 and 101-106 M/s compiled). The compiled
    loop runs without the GIL. It is run with ``optimized_execution(False)``: plain interpretation, no graph
    optimization or fusion, so each op is the ATen kernel the Python code calls."""
    with _SCRIPT_LOCK:
        if not _SCRIPTED:
            try:
                with warnings.catch_warnings():  # torch.jit.script is deprecated (still shipped in torch 2.13)
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    _SCRIPTED.append(torch.jit.script(_errors_loop))
            except (AttributeError, OSError, RuntimeError):  # no torch.jit, no source, or a compile failure
                _SCRIPTED.append(None)
    scripted = _SCRIPTED[0]
    if scripted is None:
        return _errors_loop

    def run(*args) -> None:
        with torch.jit.optimized_execution(False):  # thread-local: set in the thread that runs
            scripted(*args)

    return run


def block_errors(wabs_t: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 errors ``[C, n]`` of blocks ``|w|`` ``[16, n]`` (element-major) at each row of ``scales [C, n]``."""
    n = wabs_t.shape[1]
    out = out if out is not None else torch.empty(scales.shape, dtype=torch.float32, device=wabs_t.device)
    width = min(n, SUB_BLOCKS)
    q = torch.empty((BLOCK_SIZE, width), dtype=torch.float32, device=wabs_t.device)
    r = torch.empty((BLOCK_SIZE, width), dtype=torch.float32, device=wabs_t.device)
    if n:
        _errors_runner()(wabs_t, scales, out, q, r, r.view(torch.int32), SUB_BLOCKS)
    return out


def block_error_f32(wabs_t: torch.Tensor, scale_f32: torch.Tensor) -> torch.Tensor:
    """fp32 squared error ``[n]`` of blocks ``|w|`` stored element-major ``[16, n]`` at scales ``[n]``."""
    return block_errors(wabs_t, scale_f32.unsqueeze(0))[0]


def _saturation_bound(amax: torch.Tensor, scale_f32: torch.Tensor) -> torch.Tensor:
    """``B_j`` of proof step 3, ``[n]``."""
    gap = (amax - 6.0 * scale_f32).clamp_min_(0.0)
    return gap * gap


def _below_seven(amax: torch.Tensor, scale_table: torch.Tensor, global_f32: torch.Tensor) -> torch.Tensor:
    """An index ``k >= k7 = min{k : fl(A / s_k) < 7}`` (126 if none is found), almost always k7 itself.

    ``est``, the e4m3 rounding of ``A / 7 / g``, is k7 or k7 - 1 on real weights; the exact test (an IEEE
    fp32 division) is monotone in k, so a passing ``est`` or ``est + 1`` is >= k7. Neither: 126."""
    est = round_to_e4m3((amax / SEVEN / global_f32).clamp_min_(E4M3_MIN_SUBNORMAL)).view(torch.uint8).long() - 1
    fail_est = amax / scale_table.index_select(0, est) >= SEVEN
    fail_next = amax / scale_table.index_select(0, (est + 1).clamp_(max=NUM_CANDIDATES - 1)) >= SEVEN
    return est.add_(fail_est).masked_fill_(fail_est & fail_next, NUM_CANDIDATES)


def _window(amax, scale_table, global_f32) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan start ``lo`` and proven end ``hi`` ``[n]`` (int64) of proof steps 2 and 4, with
    ``lo <= NUM_CANDIDATES - MAIN_WIDTH`` and ``lo <= hi - MAIN_WIDTH + 1`` where possible: the first
    ``MAIN_WIDTH`` candidates from ``lo`` exist, and scanning past ``hi`` is harmless (those never win)."""
    k7 = _below_seven(amax, scale_table, global_f32)
    k1 = k7.clamp(min=7)
    hi = (k1 + 7).clamp_(max=NUM_CANDIDATES - 1)  # k1 = 126 (nothing proven) also gives 125
    guarded = int((scale_table < DOUBLING_MIN_SCALE).sum())  # s_j >= 2^-125 exactly for j >= guarded
    if guarded > 7:  # a tiny global scale: the doubling lemma's guard fails for some blocks
        hi.masked_fill_(k1 < guarded, NUM_CANDIDATES - 1)
    lo = torch.minimum(k7 - 1, hi - (MAIN_WIDTH - 1)).clamp_(0, NUM_CANDIDATES - MAIN_WIDTH)
    return lo, hi


def _first_minimum(errors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, index of its first occurrence) over dim 0 of ``errors [C, n]`` (never NaN): what the reference's
    strict-``<`` scan from +inf over the rows in order keeps (all +inf: index 0, where +inf == +inf).
    ``torch.min(dim=0)`` returns the same but runs several times slower on CPU."""
    best = errors.amin(dim=0)
    rows = torch.arange(errors.shape[0], dtype=torch.float32, device=errors.device).unsqueeze(1)
    key = torch.ne(errors, best).to(torch.float32).mul_(errors.shape[0]).add_(rows)  # row, or C + row
    return best, key.amin(dim=0).long()


def _mse_chunk(wabs_t, amax, scale_table, global_f32) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Best candidate index ``[n]``, its fp32 error ``[n]`` and the number of candidates evaluated.

    Per-block bookkeeping (``[n]`` tensors) runs once over the whole chunk; the ``[16, n]`` error work runs
    over column slices of ``SUB_BLOCKS`` blocks, each slice's 9 candidates back to back while it is in cache.
    """
    n = wabs_t.shape[1]
    lo, hi = _window(amax, scale_table, global_f32)
    offsets = torch.arange(MAIN_WIDTH, device=lo.device).unsqueeze(1)
    scales = scale_table.index_select(0, (lo.unsqueeze(0) + offsets).view(-1)).view(MAIN_WIDTH, n)  # [9, n]
    errors = block_errors(wabs_t, scales)  # [9, n]: every block, lo .. lo + 8, ascending
    best_err, first = _first_minimum(errors)
    best_idx = lo + first
    evaluated = MAIN_WIDTH * n
    wide = (hi - lo >= MAIN_WIDTH).nonzero().squeeze(1)  # guard failures, tiny blocks: rare
    if wide.numel():
        evaluated += _scan_wide(wabs_t, scale_table, lo, hi, wide, best_err, best_idx)
    evaluated += _extend_down(wabs_t, amax, scale_table, lo, best_err, best_idx)
    return best_idx, best_err, evaluated


def _scan_wide(wabs_t, scale_table, lo, hi, rows, best_err, best_idx) -> int:
    """Continue the ascending scan (strict ``<``) past the first 9 candidates for windows wider than that."""
    sub, sub_lo, sub_hi = wabs_t.index_select(1, rows), lo[rows], hi[rows]
    err_best, idx_best = best_err[rows], best_idx[rows]
    evaluated = 0
    for offset in range(MAIN_WIDTH, int((sub_hi - sub_lo).max()) + 1):
        idx = torch.minimum(sub_lo + offset, sub_hi)
        err = block_error_f32(sub, scale_table.index_select(0, idx))
        better = err < err_best
        err_best = torch.where(better, err, err_best)
        idx_best = torch.where(better, idx, idx_best)
        evaluated += rows.numel()
    best_err[rows], best_idx[rows] = err_best, idx_best
    return evaluated


def _extend_down(wabs_t, amax, scale_table, lo, best_err, best_idx) -> int:
    """Proof step 4's downward extension (a lower index wins ties); returns the candidates evaluated.

    ``below[lo]`` is ``s_{lo-1}``, NaN for lo = 0: its bound is NaN, never ``<= best``."""
    below = torch.cat([scale_table.new_full((1,), float("nan")), scale_table])
    rows = (_saturation_bound(amax, below.index_select(0, lo)) <= best_err).nonzero().squeeze(1)
    evaluated = 0
    while rows.numel():
        idx = lo[rows] - 1
        err = block_error_f32(wabs_t.index_select(1, rows), scale_table.index_select(0, idx))
        take = err <= best_err[rows]
        best_err[rows] = torch.where(take, err, best_err[rows])
        best_idx[rows] = torch.where(take, idx, best_idx[rows])
        lo[rows] = idx
        evaluated += rows.numel()
        rows = rows[_saturation_bound(amax[rows], below.index_select(0, idx)) <= best_err[rows]]
    return evaluated


def _fast_path_ok(global_f32: torch.Tensor, scale_f32: torch.Tensor) -> bool:
    """Proof step 0: ``g`` finite > 0 and every effective scale finite > 0 (else the reference runs)."""
    g_ok = bool(torch.isfinite(global_f32) & (global_f32 > 0))
    return g_ok and bool((torch.isfinite(scale_f32) & (scale_f32 > 0)).all())


def _abs_t(w_blocks: torch.Tensor) -> torch.Tensor:
    """``|w|`` as float32, element-major: ``[n, 16]`` -> ``[16, n]`` (a new tensor, never aliasing w).

    Transposed slice by slice (``SUB_BLOCKS`` blocks): a cache-sized strided copy runs twice as fast."""
    n = w_blocks.shape[0]
    out = torch.empty((w_blocks.shape[1], n), dtype=torch.float32, device=w_blocks.device)
    for start in range(0, n, SUB_BLOCKS):
        src, dst = w_blocks[start:start + SUB_BLOCKS].t(), out[:, start:start + SUB_BLOCKS]
        if w_blocks.dtype == torch.float32:
            torch.abs(src, out=dst)
        else:
            dst.copy_(src).abs_()  # exact widening, then |.|
    return out


def _max_chunk(wabs_t, amax, global_f32, scale_table, six, want_errors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """"max" E4M3 bits ``[n]`` (uint8) and, if wanted, their fp32 errors: ``nvfp4.max_block_scales``, amax / 6 /
    global (IEEE divisions), at least 2^-9, e4m3 with saturation."""
    bits = round_to_e4m3((amax / six / global_f32).clamp_min(E4M3_MIN_SUBNORMAL)).view(torch.uint8)
    errors = block_error_f32(wabs_t, scale_table.index_select(0, bits.long() - 1)) if want_errors else None
    return bits, errors


def _search_chunk(wb: torch.Tensor, global_f32: torch.Tensor, method: str, scale_table: torch.Tensor,
                  six: torch.Tensor, want_errors: bool, with_max: bool = False):
    """E4M3 bits ``[n]`` (uint8), their fp32 errors (or None), the candidates evaluated, and (``with_max``) the
    fp32 errors of the "max" method's bits, for ``wb [n, 16]``: one ``|w|`` transpose and amax serve both."""
    wabs_t = _abs_t(wb)  # [16, n]
    amax = wabs_t.amax(dim=0)  # [n]
    if method == "max":
        bits, errors = _max_chunk(wabs_t, amax, global_f32, scale_table, six, want_errors or with_max)
        return bits, errors, 0, errors
    best, errors, evaluated = _mse_chunk(wabs_t, amax, scale_table, global_f32)
    max_errors = _max_chunk(wabs_t, amax, global_f32, scale_table, six, True)[1] if with_max else None
    return (best + 1).to(torch.uint8), errors, evaluated, max_errors  # candidate j has E4M3 bits j + 1


def _batched_blocks(w: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """``w [..., N, K]`` -> blocks ``[batch, nb, 16]`` (a view when possible), global ``[batch]``, out shape."""
    if w.ndim < 2 or w.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"expected w [..., N, K] with K divisible by {BLOCK_SIZE}, got shape {tuple(w.shape)}")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)  # [*B, N, K/16, 16]
    global_f32 = expand_global(global_scale, blocks).expand(*blocks.shape[:-3], 1, 1, 1).reshape(-1).to(w.device)
    per_batch = blocks.shape[-3] * blocks.shape[-2]
    return blocks.reshape(global_f32.numel(), per_batch, BLOCK_SIZE), global_f32, blocks.shape[:-1]


def _reference_batch(flat_b, global_b, method: str, want_errors: bool):
    """Bits ``[nb]`` (uint8) and fp32 errors (or None) of one batch index by the reference (proof step 0)."""
    ref = search_block_scales_reference(flat_b.unsqueeze(0), global_b, method)
    errors = None
    if want_errors:
        scale = ref.reshape(-1).to(torch.float32) * global_b  # nvfp4.effective_scale
        errors = block_squared_error(flat_b.to(torch.float32), scale[:, None])
    return ref.view(torch.uint8).reshape(-1), errors


def _search(w: torch.Tensor, global_scale: torch.Tensor, method: str, want_errors: bool, with_max: bool = False):
    """(E4M3 scales ``[..., N, K/16]``, fp32 errors at them or None, mean candidates evaluated per block, fp32
    errors at the "max" method's scales or None). ``with_max``: the last, from the same pass over ``|w|``, the
    same bits as ``_search(w, global_scale, "max", True)[1]``."""
    if method not in METHODS:
        raise ValueError(f"unknown block-scale method {method!r}; expected one of {METHODS}")
    check_finite(w, "weight")  # NaN / inf: a clear WeightError, not an index error inside
    w = w.detach()  # worker threads do not inherit the caller's no_grad mode
    w, global_scale, shift = exponent_normalized(w, global_scale)  # tiny tensors: nvfp4's docstring
    flat, global_f32, out_shape = _batched_blocks(w, global_scale)  # [batch, nb, 16], [batch]
    out = torch.empty(flat.shape[:2], dtype=torch.uint8, device=w.device)  # [batch, nb] E4M3 bits
    errors = torch.empty(flat.shape[:2], dtype=torch.float32, device=w.device) if want_errors else None
    max_errors = torch.empty(flat.shape[:2], dtype=torch.float32, device=w.device) if with_max else None
    six = torch.tensor(E2M1_MAX, dtype=torch.float32, device=w.device)  # tensor divisor: see nvfp4's notes
    tables, items, width = {}, [], 0
    for b in range(flat.shape[0]):
        tables[b] = e4m3_positive_values(w.device) * global_f32[b]  # s_j, [126]
        if not _fast_path_ok(global_f32[b], tables[b]):
            out[b], err = _reference_batch(flat[b], global_f32[b], method, want_errors or with_max)
            if want_errors:
                errors[b] = err
            if with_max:
                max_errors[b] = err if method == "max" else _reference_batch(flat[b], global_f32[b], "max", True)[1]
            width += NUM_CANDIDATES * flat.shape[1] if method == "mse" else 0
            continue
        items += [(b, start, min(start + BLOCKS_PER_CHUNK, flat.shape[1]))
                  for start in range(0, flat.shape[1], BLOCKS_PER_CHUNK)]

    def run(item):
        b, start, stop = item
        bits, chunk_errors, evaluated, chunk_max = _search_chunk(flat[b, start:stop], global_f32[b], method,
                                                                 tables[b], six, want_errors, with_max)
        out[b, start:stop] = bits
        if want_errors:
            errors[b, start:stop] = chunk_errors
        if with_max:
            max_errors[b, start:stop] = chunk_max
        return evaluated

    with cpu_workers(w.device) as mapper:
        width += sum(mapper(run, items))
    num_blocks = max(flat.shape[0] * flat.shape[1], 1)
    scales = out.view(torch.float8_e4m3fn).reshape(out_shape)

    def restored(e):
        return restore_errors(e.reshape(out_shape), shift) if e is not None else None

    return scales, restored(errors), width / num_blocks, restored(max_errors)


def search_block_scales_with_stats(w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse"):
    """``search_block_scales`` plus the mean number of candidates evaluated per block."""
    scales, _, width, _ = _search(w, global_scale, method, want_errors=False)
    return scales, width


def search_block_scales_with_errors(w: torch.Tensor, global_scale: torch.Tensor,
                                    method: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """(``search_block_scales``, ``weight_squared_error`` at those scales), bit-identical to calling the two,
    in one pass: the search has already computed the chosen candidate's error."""
    scales, errors, _, _ = _search(w, global_scale, method, want_errors=True)
    return scales, errors


def search_with_max_errors(w: torch.Tensor, global_scale: torch.Tensor,
                           method: str = "mse") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``search_block_scales``, ``weight_squared_error`` at those scales, ``weight_squared_error`` at the "max"
    method's scales), bit-identical to ``search_block_scales_with_errors`` with ``method`` and with "max", in
    one pass: the NaN check, the normalization, the ``|w|`` transpose and the block amax serve both (they were
    about half of a second "max" search on a CPU)."""
    scales, errors, _, max_errors = _search(w, global_scale, method, want_errors=True, with_max=True)
    return scales, errors, max_errors


def search_block_scales(w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse") -> torch.Tensor:
    """Block scales (float8_e4m3fn ``[..., N, K/16]``) of ``w [..., N, K]``: "max" or exact "mse"."""
    return _search(w, global_scale, method, want_errors=False)[0]


def weight_squared_error(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """Twin of ``nvfp4.weight_squared_error``: per-block fp32 squared error ``[..., N, K/16]``, same bits."""
    check_finite(w, "weight")
    w = w.detach()  # worker threads do not inherit the caller's no_grad mode
    w, global_scale, shift = exponent_normalized(w, global_scale)
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

    with cpu_workers(w.device) as mapper:
        list(mapper(run, items))
    return restore_errors(out.reshape(out_shape), shift)
