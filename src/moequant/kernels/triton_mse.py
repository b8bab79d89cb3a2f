"""Triton twin of ``moequant.formats.mse``: NVFP4 block-scale search ("max" and exact "mse"), one launch.

``search_block_scales(w, global_scale, method)`` returns float8_e4m3fn scales ``[..., N, K/16]`` bit-identical to
``search_block_scales_reference`` for CUDA ``w [..., N, K]`` (bf16/fp16/fp32), plus optionally the packed FP4
codes (as ``formats.fp4.pack_fp4``) and the per-block errors of ``formats.nvfp4.block_squared_error``.

Exact arithmetic without a division. The reference codes ``fl(a/s)`` against the E2M1 thresholds
t = 0.25(>), 0.75(>=), 1.25(>), 1.75(>=), 2.5(>), 3.5(>=), 5(>). Every t has an even fp32 significand, so a
tie between t and its neighbour rounds to t and, for real ``a/s``:  fl(a/s) > t  <=>  a/s > t + ulp(t)/2, and
fl(a/s) >= t  <=>  a/s >= t - ulp_below(t)/2. With B = (t +- half ulp) * s, exact in fp64 (25 x 24 bits), and
``a`` fp32: a > B <=> a >= succ32(RD32(B)), a >= B <=> a >= RU32(B). So per (block, candidate) seven fp32
thresholds T are built once (fp64, amortized over 16 elements); per element, the indicators p_t = [a >= T_t]
give g = 0.5 (p1+p2+p3+p4) + p5 + p6 + 2 p7 exactly, then fl(g s), one subtract, multiply and add: the exact
reference sequence (launched with ``enable_fp_fusion=False``: no FMA contraction; sums in index order).

Below brute force: a provable window. Let A = block amax, s_k = fl(c_k * gs) (candidates ascending, c_{k+8} =
2 c_k for k >= 7), E_k the fp32 error the reference computes, kA = min{k : 6 s_k >= A} and
k7 = min{k : A < (7 - 2^-22) s_k} <= kA (both exact compares in fp64; the second means fl(A / s_k) < 7).
  Lemma (doubling). If s = s_k >= 2^-125, 2s is finite, k >= 7 and fl(A/s) < 7, then E_{k+8} >= E_k exactly.
  Proof: s_{k+8} = 2s exactly, so fl(a/2s) = fl(a/s)/2 =: r/2 with r < 7 for every element. Write g for the
  E2M1 value of r and g' for that of r/2; deq = fl(g s), deq' = fl(2g' s). 2 RNE(r/2) = RNE(r) whenever
  RNE(r) is in {0,1,2,3,4,6} (thresholds and ties halve consistently: 1.25->1 / 0.625->0.5, 2.5->2 /
  1.25->1, 3.5->4 / 1.75->2, 5->4 / 2.5->2, (5,7)->6 / (2.5,3.5)->3), so deq' = deq. Otherwise g = 0.5 or 1.5
  and 2g' is a neighbour in {0,1,2}: r in (0.25,0.5] -> 0 vs 0.5s (exact): a > s/4 gives |a - s/2| < a;
  r in (0.5,0.75) -> s: a < 3s/4 gives |a - s/2| < |a - s|; r in (1.25,1.5) -> s: a/s > 1.25 + 2^-24 and
  fl(1.5s) <= 1.5s(1 + 2^-24) give |a - fl(1.5s)| < a - s; r in [1.5,1.75) -> 2s: a/s < 1.75 - 2^-24 gives
  |a - fl(1.5s)| <= 2s - a. Hence |a - deq| <= |a - deq'| per element, and RN subtraction, squaring and
  left-to-right addition are monotone, so E_{k+8} >= E_k. (0.5s and 2s are exact because s >= 2^-125.)
  Upper side: the window holds the octave [k1, k1+7], k1 = max(k7, 7); every k > k1+7 chains down by steps
  of 8 to a window candidate with no larger error, and a larger index loses ties: it cannot win.
  Lower side: for k < kA, 6 s_k < A, so the max element saturates (code 6) and E_k >= fl(fl(A - fl(6 s_k))^2)
  (a partial sum of non-negative terms never decreases). That bound grows as k decreases, so once it is
  > the best error found (strictly: smaller indices win ties), every lower candidate is excluded.
  Guards: if s_{k1} < 2^-125 or fl(448 gs) is not finite the window runs up to 125; A == 0 gives k = 0 (all
  errors are 0). The window starts at [kA-2, k1+7] (about 9 candidates, k7 being 1-2 below kA) and grows down
  one candidate at a time until the lower bound excludes the rest (10-15% of blocks on normal/Student-t data).
Memory: the weight is read in place (a copy only if non-contiguous, or a float32 copy of a tiny tensor, which is
searched exponent-normalized as ``formats.nvfp4`` prescribes; that path has not run on a GPU yet); outputs are
O(#blocks).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moequant.formats.mse import METHODS
from moequant.formats.nvfp4 import BLOCK_SIZE, MIN_GLOBAL_SCALE, check_finite, exponent_normalized, restore_errors
from moequant.formats.weighted_mse import check_channel_weights
from moequant.kernels.pending import Pending

BLOCK_B = 32  # NVFP4 blocks per program (one per lane): one warp, so loop counts are per-warp maxima
NUM_WARPS = 1
_BIG = tl.constexpr(1 << 20)  # index of "no candidate"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _cand_value(k):
    """fp32 value of E4M3 candidate ``k`` (0-based, bits k+1) for k in [0, 125]."""
    bits = k + 1
    normal = (((bits >> 3) + 120) << 23) | ((bits & 7) << 20)
    return tl.where(bits < 8, bits.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))


@triton.jit
def _thr(s64, t_plus_h, INCLUSIVE: tl.constexpr):
    """Smallest fp32 f with f > B (or f >= B), B = (t +- h) * s exact in fp64: a >= f <=> fl(a/s) > t (>= t)."""
    b = s64 * tl.full(s64.shape, t_plus_h, tl.float64)  # fp64 constant: t +- h keeps its 25 bits
    f = b.to(tl.float32)  # RN
    succ = (f.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
    if INCLUSIVE:
        keep = f.to(tl.float64) >= b
    else:
        keep = f.to(tl.float64) > b
    return tl.where(keep, f, succ)


@triton.jit
def _thresholds(s):
    """The seven E2M1 decision thresholds for scale ``s`` (t +- ulp(t)/2, see module docstring)."""
    s64 = s.to(tl.float64)
    t1 = _thr(s64, 0.25000001490116119384765625, False)  # 0.25 + 2^-26
    t2 = _thr(s64, 0.74999997019767761230468750, True)  # 0.75 - 2^-25
    t3 = _thr(s64, 1.25000005960464477539062500, False)  # 1.25 + 2^-24
    t4 = _thr(s64, 1.74999994039535522460937500, True)  # 1.75 - 2^-24
    t5 = _thr(s64, 2.50000011920928955078125000, False)  # 2.5 + 2^-23
    t6 = _thr(s64, 3.49999988079071044921875000, True)  # 3.5 - 2^-23
    t7 = _thr(s64, 5.00000023841857910156250000, False)  # 5 + 2^-22
    return t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _sq_err(a, t1, t2, t3, t4, t5, t6, t7, s):
    """fl((a - fl(g s))^2) for magnitude ``a`` whose E2M1 value g is decided by the thresholds.

    g = 0.5 (p1 + p2 + p3 + p4) + p5 + p6 + 2 p7 with p_t = [a >= T_t] in {0.0, 1.0} (the p_t are monotone),
    exact in fp32, so fl(g s) is the reference's dequantized value; indicator sums run on the FMA pipe.
    """
    p = (a >= t1).to(tl.float32) + (a >= t2).to(tl.float32)
    p = p + (a >= t3).to(tl.float32)
    p = p + (a >= t4).to(tl.float32)
    g = tl.fma(p, 0.5, (a >= t5).to(tl.float32))  # exact: small multiples of 0.5
    g = g + (a >= t6).to(tl.float32)
    g = tl.fma((a >= t7).to(tl.float32), 2.0, g)
    d = a - g * s  # two roundings: enable_fp_fusion=False keeps them separate
    return d * d


@triton.jit
def _load_abs(w_ptr, base, live):
    """The 16 magnitudes of each lane's block, fp32, as a tuple (kept in registers across candidates)."""
    p = w_ptr + base
    return (tl.abs(tl.load(p + 0, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 1, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 2, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 3, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 4, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 5, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 6, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 7, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 8, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 9, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 10, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 11, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 12, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 13, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 14, mask=live, other=0.0).to(tl.float32)),
            tl.abs(tl.load(p + 15, mask=live, other=0.0).to(tl.float32)))


@triton.jit
def _block_error(xs, hs, s, WEIGHTED: tl.constexpr):
    """Reference block error of magnitudes ``xs`` at scale ``s``, elements summed in index order: fl((a - fl(g s))^2)
    per element, or with WEIGHTED ``formats.weighted_mse``'s fl(fl(d * d) * h) for channel weights ``hs``."""
    t1, t2, t3, t4, t5, t6, t7 = _thresholds(s)
    acc = _sq_err(xs[0], t1, t2, t3, t4, t5, t6, t7, s)
    if WEIGHTED:
        acc = acc * hs[0]
    for j in tl.static_range(1, 16):
        term = _sq_err(xs[j], t1, t2, t3, t4, t5, t6, t7, s)
        if WEIGHTED:
            term = term * hs[j]
        acc = acc + term
    return tl.where(s == float("inf"), float("inf"), acc)  # reference: 0 * inf = NaN, never chosen


@triton.jit
def _first_unsaturated(amax, gs):
    """kA = min{k : 6 s_k >= amax} (exact, fp64), 126 if none."""
    lo = tl.zeros(amax.shape, dtype=tl.int32)
    hi = lo + 126
    a64 = amax.to(tl.float64)
    for _ in tl.static_range(7):
        mid = (lo + hi) >> 1
        s = _cand_value(tl.minimum(mid, 125)) * gs
        ok = (s.to(tl.float64) * 6.0 >= a64) & (mid < 126)
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)
    return lo


@triton.jit
def _below_seven(amax, gs, k_a):
    """k7 = min{k : amax < (7 - 2^-22) s_k} searched among kA-2 .. kA (a larger k7 is still safe, only wider)."""
    a64 = amax.to(tl.float64)
    k7 = tl.minimum(k_a, 125)
    for step in tl.static_range(1, 3):
        k = tl.maximum(k_a - step, 0)
        s = _cand_value(k) * gs
        seven = tl.full(s.shape, 6.99999976158142089843750, tl.float64)  # 7 - 2^-22, not an fp32 value
        ok = (s.to(tl.float64) * seven > a64) & (k_a - step >= 0)
        k7 = tl.where(ok & (k == k7 - 1), k, k7)
    return k7


@triton.jit
def _mse_search(xs, hs, hstar, live, gs, amax, km, LOW: tl.constexpr, WEIGHTED: tl.constexpr):
    """(index, its error, the error at index ``km``) per block: the exact argmin (ties to the lower index)
    over the provable window, with ONE error evaluation site (code size is what a cold start compiles).

    Candidates are visited in descending order from max(hi, km); a lane stays active while its candidate is
    in the window [lo, hi], or at or above ``km`` (the "max" method's index, whose error is captured on the
    way), or not excluded by the lower bound (below kA: fl(fl(A - fl(6 s_k))^2) > best, times hstar). Descending with ``<=``,
    the lowest index among equal errors is kept, as the reference's strict ``<`` in ascending order does.
    Candidates above hi visited to reach km cannot beat the window (doubling lemma) and lose ties.

    WEIGHTED: the error is ``formats.weighted_mse``'s (channel weights ``hs`` >= 0; ``hstar`` = the weight of
    an element whose magnitude is the block amax). The window's proofs carry over term by term: the doubling
    lemma bounds each |d| (so each fl(fl(d^2) h), h >= 0), and below kA the amax element's term alone,
    fl(fl(fl(A - fl(6 s))^2) hstar), is a lower bound of the sum that grows as s falls. A NaN error (a zero
    weight times an overflowed square) counts as +inf: as in the reference, it never wins."""
    k_a = _first_unsaturated(amax, gs)
    k1 = tl.maximum(_below_seven(amax, gs, k_a), 7)
    s_k1 = _cand_value(tl.minimum(k1, 125)) * gs
    doubling_ok = (s_k1 >= 2.350988701644575e-38) & (gs * 448.0 < float("inf"))  # 2^-125
    zero = amax == 0.0
    hi = tl.where(zero, 0, tl.where(doubling_ok, tl.minimum(k1 + 7, 125), 125))
    lo = tl.where(zero, 0, tl.maximum(tl.minimum(k_a, 125) - LOW, 0))
    best_err = tl.full(amax.shape, float("inf"), tl.float32)
    best_k = tl.full(amax.shape, _BIG, tl.int32)
    km_err = tl.full(amax.shape, float("inf"), tl.float32)
    k = tl.maximum(hi, km)
    active = live
    while tl.max(active.to(tl.int32), 0) > 0:  # (a while loop: the interpreter cannot range() over a reduction)
        s = _cand_value(tl.minimum(tl.maximum(k, 0), 125)) * gs
        err = _block_error(xs, hs, s, WEIGHTED)
        if WEIGHTED:
            err = tl.where(err == err, err, float("inf"))
        better = active & (err <= best_err)
        best_err = tl.where(better, err, best_err)
        best_k = tl.where(better, k, best_k)
        km_err = tl.where(active & (k == km), err, km_err)
        k = k - 1
        d = amax - (_cand_value(tl.minimum(tl.maximum(k, 0), 125)) * gs) * 6.0
        unexcluded = ~((d * d) * hstar > best_err)
        active = live & (k >= 0) & ((k >= lo) | (k >= km) | unexcluded)
    # best_err = inf: every candidate's error is inf or NaN (the lower bound never excluded anything, so the
    # loop reached index 0; larger candidates are no better by the doubling lemma): the reference keeps 0
    return tl.where(best_err == float("inf"), 0, best_k), best_err, km_err


@triton.jit
def e4m3_round(x):
    """RNE of fp32 ``x`` (|x| <= 448) to the nearest E4M3 value, as fp32 (sign kept; no hardware cast needed)."""
    a = tl.abs(x)
    b = a.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFFF + ((b >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # 3 mantissa bits, RNE
    sub = ((a * 512.0 + 8388608.0) - 8388608.0) * 0.001953125  # multiples of 2^-9, RNE
    r = tl.where(a < 0.015625, sub, r)
    sign = x.to(tl.int32, bitcast=True) & -2147483648  # copy the sign bit: -0.0 stays -0.0 (`-r` is 0 - r)
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _max_index(amax, gs):
    """"max" calibration: index of e4m3(max(amax / 6 / gs, 2^-9)) (IEEE divisions, RNE, saturating)."""
    raw = tl.math.div_rn(tl.math.div_rn(amax, 6.0), gs)
    v = e4m3_round(tl.minimum(tl.maximum(raw, 0.001953125), 448.0))
    b = v.to(tl.int32, bitcast=True)
    normal = ((b >> 23) - 120) * 8 + ((b >> 20) & 7)
    bits = tl.where(v < 0.015625, (v * 512.0).to(tl.int32), normal)
    return bits - 1


@triton.jit
def _codes_word(w_ptr, base, live, s):
    """Packed E2M1 codes of one block (element 2j in the low nibble of byte j) as an int64."""
    t1, t2, t3, t4, t5, t6, t7 = _thresholds(s)
    word = tl.zeros(s.shape, dtype=tl.int64)
    for j in tl.static_range(16):
        x = tl.load(w_ptr + base + j, mask=live, other=0.0).to(tl.float32)
        a = tl.abs(x)
        idx = (a >= t1).to(tl.int64) + (a >= t2).to(tl.int64) + (a >= t3).to(tl.int64)
        idx += (a >= t4).to(tl.int64) + (a >= t5).to(tl.int64) + (a >= t6).to(tl.int64)
        idx += (a >= t7).to(tl.int64)
        code = tl.where((x < 0) & (idx > 0), idx | 8, idx)
        word = word | (code << (4 * j))
    return word


@triton.jit
def _load_h(h_ptr, base, live):
    """The 16 channel weights of each lane's block (fp32), as a tuple."""
    p = h_ptr + base
    return (tl.load(p + 0, mask=live, other=1.0), tl.load(p + 1, mask=live, other=1.0),
            tl.load(p + 2, mask=live, other=1.0), tl.load(p + 3, mask=live, other=1.0),
            tl.load(p + 4, mask=live, other=1.0), tl.load(p + 5, mask=live, other=1.0),
            tl.load(p + 6, mask=live, other=1.0), tl.load(p + 7, mask=live, other=1.0),
            tl.load(p + 8, mask=live, other=1.0), tl.load(p + 9, mask=live, other=1.0),
            tl.load(p + 10, mask=live, other=1.0), tl.load(p + 11, mask=live, other=1.0),
            tl.load(p + 12, mask=live, other=1.0), tl.load(p + 13, mask=live, other=1.0),
            tl.load(p + 14, mask=live, other=1.0), tl.load(p + 15, mask=live, other=1.0))


@triton.jit
def _search_kernel(w_ptr, gs_ptr, h_ptr, scale_ptr, code_ptr, err_ptr, base_err_ptr, n_blocks, blocks_per_batch,
                   col_blocks, h_batch_stride, IS_MSE: tl.constexpr, WEIGHTED: tl.constexpr,
                   WRITE_CODES: tl.constexpr, WRITE_ERR: tl.constexpr, WRITE_BASE_ERR: tl.constexpr,
                   BLOCK: tl.constexpr, LOW: tl.constexpr):
    blk = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # one NVFP4 block per lane
    live = blk < n_blocks
    base = blk.to(tl.int64) * 16
    batch = blk // blocks_per_batch
    gs = tl.load(gs_ptr + batch, mask=live, other=1.0)
    xs = _load_abs(w_ptr, base, live)
    amax = xs[0]
    for j in tl.static_range(1, 16):
        amax = tl.maximum(amax, xs[j])
    if WEIGHTED:
        hs = _load_h(h_ptr, batch.to(tl.int64) * h_batch_stride + (blk % col_blocks).to(tl.int64) * 16, live)
        hstar = tl.where(xs[0] == amax, hs[0], 0.0)
        for j in tl.static_range(1, 16):
            hstar = tl.maximum(hstar, tl.where(xs[j] == amax, hs[j], 0.0))
    else:
        hs = xs
        hstar = tl.full(amax.shape, 1.0, tl.float32)
    km = _max_index(amax, gs)
    if IS_MSE:
        k, k_err, km_err = _mse_search(xs, hs, hstar, live, gs, amax, km, LOW, WEIGHTED)
    else:
        k = km
    tl.store(scale_ptr + blk, (k + 1).to(tl.uint8), mask=live)
    s = _cand_value(k) * gs
    if WRITE_CODES:
        tl.store(code_ptr + blk, _codes_word(w_ptr, base, live, s), mask=live)
    if IS_MSE and not WEIGHTED:  # the search evaluated the plain error at k and at km already
        if WRITE_ERR:
            tl.store(err_ptr + blk, k_err, mask=live)
        if WRITE_BASE_ERR:
            tl.store(base_err_ptr + blk, km_err, mask=live)
    else:
        if WRITE_ERR:
            tl.store(err_ptr + blk, _block_error(xs, xs, s, False), mask=live)
        if WRITE_BASE_ERR:  # the "max" baseline's error too, from the same loaded block (quantize's report)
            tl.store(base_err_ptr + blk, _block_error(xs, xs, _cand_value(km) * gs, False), mask=live)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_inputs(w: torch.Tensor, global_scale: torch.Tensor, method: str) -> torch.Tensor:
    """Validate and return the per-batch global scales as a contiguous fp32 vector."""
    if method not in METHODS:
        raise ValueError(f"unknown block-scale method {method!r}; expected one of {METHODS}")
    if w.device.type != "cuda" and not _interpreting():
        raise ValueError(f"triton_mse needs a CUDA tensor, got one on {w.device}")
    if w.ndim < 2 or w.shape[-1] % BLOCK_SIZE or w.dtype not in _DTYPES:
        raise ValueError(f"expected w [..., N, K] with K % 16 == 0 in {_DTYPES}, got {tuple(w.shape)} {w.dtype}")
    check_finite(w, "weight")  # NaN / inf, as the torch twin and the reference
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=w.device)
    batch = w.shape[:-2]
    if gs.numel() == 1:
        gs = gs.reshape(1).expand(max(1, batch.numel()))
    elif tuple(gs.shape) != tuple(batch):
        raise ValueError(f"global scale of shape {tuple(gs.shape)} does not match batch dims {tuple(batch)}")
    gs = gs.reshape(-1).contiguous()
    if not bool(((gs >= MIN_GLOBAL_SCALE) & torch.isfinite(gs)).all()):
        raise ValueError(f"global scales must be finite and >= 2^-126 (formats.nvfp4 clamps them), got {gs}")
    return gs


def search_block_scales(w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse",
                        return_codes: bool = False, return_errors: bool = False, *, _low_margin: int = 2):
    """Block scales of ``w [..., N, K]`` (float8_e4m3fn ``[..., N, K/16]``), one kernel launch.

    Same contract as ``formats.mse.search_block_scales_reference``. With ``return_codes`` or ``return_errors``
    returns ``(scales, codes, errors)`` where codes is uint8 ``[..., N, K/2]`` (packed as ``pack_fp4``) and
    errors float32 ``[..., N, K/16]`` (each None unless asked for). ``_low_margin`` (tests only): how many
    candidates below kA the window starts with; any value is exact, 0 exercises the downward extension.
    """
    scales, codes, errors, _ = _launch(w, global_scale, method, return_codes, return_errors, False, _low_margin)
    if not (return_codes or return_errors):
        return scales
    return scales, codes, errors


def search_with_max_errors(w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse",
                           return_codes: bool = False):
    """``(scales, errors, max_errors)``: ``search_block_scales(..., return_errors=True)``'s scales and errors,
    plus the per-block errors the "max" method's scales would give, all from one launch (one compile in a
    fresh process, one read of the weight): what ``quantize`` reports as the MSE gain. ``return_codes``: also
    the packed codes of the chosen scales, from the same launch (4-tuple)."""
    scales, codes, errors, base = _launch(w, global_scale, method, return_codes, True, method != "max", 2)
    out = (scales, errors, base if method != "max" else errors)
    return (*out, codes) if return_codes else out


def search_weighted(w: torch.Tensor, global_scale: torch.Tensor, h: torch.Tensor, return_errors: bool = False,
                    *, _low_margin: int = 2):
    """Twin of ``formats.weighted_mse.search_weighted_reference`` (channel weights ``h [K]`` or ``[*B, K]``):
    float8_e4m3fn scales ``[..., N, K/16]``, one launch. With ``return_errors``: ``(scales, errors,
    max_errors)``, the plain (unweighted, ``weight_squared_error``) per-block errors at those scales and at
    the "max" method's scales, from the same launch."""
    check_channel_weights(h, w, "weight")
    hf = h.detach().to(device=w.device, dtype=torch.float32).contiguous()
    scales, _, errors, base = _launch(w, global_scale, "weighted_mse", False, return_errors, return_errors,
                                      _low_margin, h=hf)
    return (scales, errors, base) if return_errors else scales


# Cold start: compiling a specialization takes 2-4 s (Triton to PTX, then ptxas). ``compile_in_background``
# starts the compile of quantize's specialization on a side thread while the pipeline discovers the model and
# runs the calibration forward; the first launch on that device waits for it instead of compiling again.
_PENDING = Pending("compiling the Triton block-scale search")


def compile_in_background(device: torch.device, dtype: torch.dtype, method: str) -> None:
    """Compile (and run once, on a tiny tensor) the kernel ``search_with_max_errors(..., return_codes=True)``
    (what ``quantize`` launches) for ``dtype`` weights."""
    _PENDING.start(device, lambda d: _compile(d, dtype, method))


def _compile(device: torch.device, dtype: torch.dtype, method: str) -> None:
    with torch.cuda.device(device):
        # [1, 16, 256]: block counts that are multiples of 16, as real weights' are (Triton specializes
        # integer arguments on that), so the real launch finds this compile in the cache
        w = torch.zeros(1, 16, 256, dtype=dtype, device=device)
        _launch(w, torch.ones(1, device=device), method, True, True, method != "max", 2, wait=False)
        torch.cuda.synchronize(device)


def _launch(w, global_scale, method, return_codes, return_errors, return_base, low_margin, wait=True, h=None):
    if wait:
        _PENDING.wait(w.device)
    # a tiny tensor is searched as 2^k w (a float32 copy) with 2^k g, the reference's own rule (formats.nvfp4);
    # NOT RUN ON A GPU YET: written to the CPU twins' pattern, the parity tests below cover it on the lent GPU
    w, global_scale, shift = exponent_normalized(w, global_scale)
    gs = _check_inputs(w, global_scale, "mse" if method == "weighted_mse" else method)
    w_c = w.contiguous()
    n_blocks = w.numel() // BLOCK_SIZE
    blocks_per_batch = max(1, w.shape[-2] * w.shape[-1] // BLOCK_SIZE)
    scales = torch.empty(n_blocks, dtype=torch.uint8, device=w.device)
    codes = torch.empty(n_blocks if return_codes else 1, dtype=torch.int64, device=w.device)
    errors = torch.empty(n_blocks if return_errors else 1, dtype=torch.float32, device=w.device)
    base = torch.empty(n_blocks if return_base else 1, dtype=torch.float32, device=w.device)
    weighted = h is not None
    h_arg = h if weighted else gs  # unread unless weighted
    h_batch_stride = (w.shape[-1] if h.ndim > 1 else 0) if weighted else 0
    if n_blocks:
        grid = (triton.cdiv(n_blocks, BLOCK_B),)
        _search_kernel[grid](w_c, gs, h_arg, scales, codes, errors, base, n_blocks, blocks_per_batch,
                             w.shape[-1] // BLOCK_SIZE, h_batch_stride, IS_MSE=method != "max",
                             WEIGHTED=weighted, WRITE_CODES=return_codes, WRITE_ERR=return_errors,
                             WRITE_BASE_ERR=return_base, BLOCK=BLOCK_B, LOW=low_margin, num_warps=NUM_WARPS,
                             enable_fp_fusion=False)
    out_scales = scales.view(torch.float8_e4m3fn).reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE)
    out_codes = codes.view(torch.uint8).reshape(*w.shape[:-1], w.shape[-1] // 2) if return_codes else None
    out_err = restore_errors(errors.reshape(out_scales.shape), shift) if return_errors else None
    out_base = restore_errors(base.reshape(out_scales.shape), shift) if return_base else None
    return out_scales, out_codes, out_err, out_base
