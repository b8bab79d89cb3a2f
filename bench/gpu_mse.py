"""GPU benchmark of the NVFP4 MSE block-scale search: ours (one Triton launch per fused-expert tensor) vs
ModelOpt 0.47's fp8-sweep Triton kernel called expert by expert as its calibrator does vs plain-torch brute
force (``formats.mse`` reference on the GPU, chunked over experts).

    PYTHONPATH=src python bench/gpu_mse.py [--out DIR] [--skip-brute]

Prints the device, the measured fp32 FMA rate and copy bandwidth, the floors, a side-by-side table
(ms, G elements/s, % of blocks whose choice agrees with our reference) and cold-start times (fresh process,
empty Triton cache, JIT included). Weights: random normal * 0.02 in bf16, one global scale per expert from
its amax (what ModelOpt's per-expert calibration uses too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from moequant.formats.mse import mse_block_scales_reference
from moequant.formats.nvfp4 import global_scale_from_amax, tensor_amax, to_blocks
from moequant.kernels import triton_mse

SHAPES = (
    ("Qwen3-30B-A3B gate_up", (128, 1536, 2048)),
    ("Qwen3-30B-A3B down", (128, 2048, 768)),
    ("Qwen3.5-122B-like gate_up", (256, 2048, 3072)),
    ("Qwen3.5-122B-like down", (256, 3072, 1024)),
)
BRUTE_OPS_PER_CANDIDATE = 10  # divide (as mul+fixup), 7 compares, mul, sub, mul, add: the issue's count
BRUTE_CANDIDATES = 126
OUR_INSTR_PER_BLOCK_CANDIDATE = 341  # SASS of the candidate loop (sm_90, bf16), per lane = per NVFP4 block


@triton.jit
def _fma_rate_kernel(out_ptr, n_iter, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = i.to(tl.float32) * 1e-9
    a0 = x
    a1 = x + 1.0
    a2 = x + 2.0
    a3 = x + 3.0
    a4 = x + 4.0
    a5 = x + 5.0
    a6 = x + 6.0
    a7 = x + 7.0
    for _ in range(n_iter):  # 8 independent FFMA chains per lane
        a0 = a0 * 0.9999 + 0.5
        a1 = a1 * 0.9999 + 0.5
        a2 = a2 * 0.9999 + 0.5
        a3 = a3 * 0.9999 + 0.5
        a4 = a4 * 0.9999 + 0.5
        a5 = a5 * 0.9999 + 0.5
        a6 = a6 * 0.9999 + 0.5
        a7 = a7 * 0.9999 + 0.5
    tl.store(out_ptr + i, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7)


def measure_fp32_rate() -> float:
    """FFMA lane-instructions per second (one FFMA = 2 flops)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block, programs, n_iter = 256, sms * 32, 4096
    out = torch.empty(block * programs, device="cuda")
    run = lambda: _fma_rate_kernel[(programs,)](out, n_iter, BLOCK=block, num_warps=8)  # noqa: E731
    ms = do_bench(run, warmup=50, rep=300, return_mode="median")
    return block * programs * n_iter * 8 / (ms * 1e-3)


def measure_copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    del src, dst
    return 2 * n / (ms * 1e-3)


def make_weight(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 weight ``[E, N, K]``, per-expert amax (fp32) and global scale (amax / 2688)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    amax = tensor_amax(w, 1)
    return w, amax, global_scale_from_amax(amax)


def window_stats(w, gs) -> dict:
    """Mean main-loop window length per block and per 32-block warp (the kernel's loop count; the rare
    downward extension is not counted), from kA and k7 computed exactly as in the kernel."""
    from moequant.formats.fp8 import e4m3_positive_values

    amax = w.abs().reshape(w.shape[0], -1, 16).amax(-1).float()  # [E, blocks]
    s = (e4m3_positive_values(w.device)[None, :] * gs[:, None]).double()  # [E, 126]
    k_a = torch.searchsorted(6.0 * s, amax.double(), right=False)
    k7 = torch.searchsorted((7.0 - 2.0**-22) * s, amax.double(), right=True).clamp(min=k_a - 2)
    hi = (k7.clamp(min=7) + 7).clamp(max=125)
    n = hi - (k_a.clamp(max=125) - 2).clamp(min=0) + 1
    n = torch.where(amax == 0, torch.ones_like(n), n).reshape(-1)
    per_warp = n[: n.numel() // 32 * 32].reshape(-1, 32).amax(-1)
    return {"window_mean": float(n.double().mean()), "window_warp_mean": float(per_warp.double().mean())}


def time_once(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, out


def ours(w, gs) -> tuple[float, torch.Tensor, float]:
    """(median ms, scales uint8, extra GPU bytes over the weight)."""
    scales = triton_mse.search_block_scales(w, gs, "mse")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    triton_mse.search_block_scales(w, gs, "mse")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    ms = do_bench(lambda: triton_mse.search_block_scales(w, gs, "mse"), warmup=25, rep=200, return_mode="median")
    return ms, scales.view(torch.uint8), extra


def modelopt_sweep():
    """ModelOpt 0.47's kernel entry point, or None with the reason printed."""
    try:
        from modelopt.torch.kernels.quantization.gemm import nvfp4_fp8_scale_sweep
    except ImportError as err:
        print(f"ModelOpt unavailable: {err}", flush=True)
        return None
    return nvfp4_fp8_scale_sweep


def modelopt_per_expert(sweep, w, amax) -> tuple[float, torch.Tensor]:
    """Expert by expert, as NVFP4MSECalibrator.collect: x = expert weight as [n_blocks, 16], its own amax.

    Returns (median ms of 3 runs, chosen E4M3 bits); ModelOpt returns best_amax = amax * fp8 / 448.
    """
    def run():
        return [sweep(w[e].reshape(-1, 16), amax[e], block_size=16) for e in range(w.shape[0])]

    run()  # autotune + JIT
    times = []
    for _ in range(3):
        ms, best = time_once(run)
        times.append(ms)
    fp8 = torch.stack([b / amax[e] * 448.0 for e, b in enumerate(best)]).to(torch.float8_e4m3fn)
    return sorted(times)[1], fp8.view(torch.uint8).reshape(w.shape[0], w.shape[1], -1)


def modelopt_one_call(sweep, w, amax) -> float:
    """One launch over the whole tensor with one global amax (raw kernel rate; a different problem)."""
    x = w.reshape(-1, 16)
    g = amax.amax()
    sweep(x, g, block_size=16)
    return do_bench(lambda: sweep(x, g, block_size=16), warmup=5, rep=50, return_mode="median")


def torch_brute(w, gs) -> tuple[float, torch.Tensor]:
    """The reference (126 vectorized passes) on the GPU, a few experts at a time; one timed run."""
    per = max(1, (64 << 20) // (w.shape[1] * w.shape[2]))

    def run():
        parts = [mse_block_scales_reference(to_blocks(w[i:i + per]), gs[i:i + per])[0]
                 for i in range(0, w.shape[0], per)]
        return torch.cat(parts).view(torch.uint8)

    return time_once(run)


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * float((a.reshape(-1) == b.reshape(-1)).double().mean())


COLD_OURS = """
import time, json; t0 = time.perf_counter()
import torch; torch.zeros(1, device="cuda"); t1 = time.perf_counter()
from moequant.kernels import triton_mse; t2 = time.perf_counter()
w = torch.randn(128, 1536, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
gs = (w.float().abs().amax(dim=(1, 2)) / 2688); torch.cuda.synchronize(); t3 = time.perf_counter()
triton_mse.search_block_scales(w, gs, "mse"); torch.cuda.synchronize(); t4 = time.perf_counter()
triton_mse.search_block_scales(w, gs, "mse"); torch.cuda.synchronize(); t5 = time.perf_counter()
print(json.dumps(dict(torch_cuda_init=t1 - t0, import_s=t2 - t1, first_call_s=t4 - t3, second_call_s=t5 - t4)))
"""

COLD_MODELOPT = """
import time, json; t0 = time.perf_counter()
import torch; torch.zeros(1, device="cuda"); t1 = time.perf_counter()
from modelopt.torch.kernels.quantization.gemm import nvfp4_fp8_scale_sweep as f; t2 = time.perf_counter()
w = torch.randn(128, 1536, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
a = w.float().abs().amax(dim=(1, 2)); torch.cuda.synchronize(); t3 = time.perf_counter()
[f(w[e].reshape(-1, 16), a[e]) for e in range(128)]; torch.cuda.synchronize(); t4 = time.perf_counter()
[f(w[e].reshape(-1, 16), a[e]) for e in range(128)]; torch.cuda.synchronize(); t5 = time.perf_counter()
print(json.dumps(dict(torch_cuda_init=t1 - t0, import_s=t2 - t1, first_call_s=t4 - t3, second_call_s=t5 - t4)))
"""


def cold_start(code: str) -> dict:
    """Run ``code`` in a fresh process with an empty Triton cache; returns its JSON line (or the error)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    return out


def bench_shape(name, shape, seed, sweep, skip_brute: bool) -> dict:
    w, amax, gs = make_weight(shape, seed)
    n = w.numel()
    row = {"shape": name, "dims": list(shape), "elements": n}
    row["ours_ms"], mine, row["ours_extra_bytes"] = ours(w, gs)
    row["ours_gelem_s"] = n / row["ours_ms"] / 1e6
    if not skip_brute:
        row["brute_ms"], ref = torch_brute(w, gs)
        row["brute_gelem_s"] = n / row["brute_ms"] / 1e6
        row["ours_agree_pct"] = agree(mine, ref)
        del ref
    if sweep is not None:
        row["mo_ms"], theirs = modelopt_per_expert(sweep, w, amax)
        row["mo_gelem_s"] = n / row["mo_ms"] / 1e6
        row["mo_agree_pct"] = agree(theirs, mine)
        row["mo_one_call_ms"] = modelopt_one_call(sweep, w, amax)
        row["mo_one_call_gelem_s"] = n / row["mo_one_call_ms"] / 1e6
    del w
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def tile_variants(shape) -> list[dict]:
    """Time a few fixed (blocks per program, warps) configurations of our kernel on one shape."""
    w, _, gs = make_weight(shape, 99)
    saved = triton_mse.BLOCK_B, triton_mse.NUM_WARPS
    rows = []
    for block, warps in ((128, 4), (64, 2), (256, 8), (32, 1)):
        triton_mse.BLOCK_B, triton_mse.NUM_WARPS = block, warps
        triton_mse.search_block_scales(w, gs, "mse")
        ms = do_bench(lambda: triton_mse.search_block_scales(w, gs, "mse"), warmup=10, rep=100, return_mode="median")
        rows.append({"blocks_per_program": block, "num_warps": warps, "ms": ms, "gelem_s": w.numel() / ms / 1e6})
        print(json.dumps(rows[-1]), flush=True)
    triton_mse.BLOCK_B, triton_mse.NUM_WARPS = saved
    return rows


def fmt(row: dict, key: str, spec: str = ".1f") -> str:
    return format(row[key], spec) if key in row else "-"


def print_table(rows: list[dict], card: str) -> None:
    print(f"\n## NVFP4 MSE block-scale search on {card} (bf16 weights, per-expert global scales)\n")
    print("| tensor | elements | ours ms | ours G elem/s | ours = reference | ModelOpt per-expert ms | ModelOpt G elem/s "
          "| ModelOpt = ours | ModelOpt one call G elem/s | torch brute ms | torch G elem/s | ours / ModelOpt |")
    print("|" + "---|" * 12)
    for r in rows:
        speedup = f"{r['mo_ms'] / r['ours_ms']:.0f}x" if "mo_ms" in r else "-"
        print(f"| {r['shape']} {tuple(r['dims'])} | {r['elements'] / 1e6:.0f} M | {fmt(r, 'ours_ms', '.2f')} "
              f"| {fmt(r, 'ours_gelem_s')} | {fmt(r, 'ours_agree_pct', '.3f')}% | {fmt(r, 'mo_ms')} "
              f"| {fmt(r, 'mo_gelem_s', '.2f')} | {fmt(r, 'mo_agree_pct', '.3f')}% | {fmt(r, 'mo_one_call_gelem_s', '.2f')} "
              f"| {fmt(r, 'brute_ms', '.0f')} | {fmt(r, 'brute_gelem_s', '.3f')} | {speedup} |")


def print_floors(fma_rate: float, bandwidth: float, candidates: float) -> dict:
    brute = fma_rate / (BRUTE_CANDIDATES * BRUTE_OPS_PER_CANDIDATE)
    ours_instr = OUR_INSTR_PER_BLOCK_CANDIDATE / 16 * candidates
    window = fma_rate / ours_instr
    memory = bandwidth / (2 + 1 / 16)  # read bf16, write one byte per 16 elements
    print(f"\nmeasured fp32 FFMA rate: {fma_rate / 1e12:.1f} T instr/s ({2 * fma_rate / 1e12:.1f} TFLOP/s); "
          f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s")
    print(f"brute-force floor: {BRUTE_CANDIDATES} candidates x {BRUTE_OPS_PER_CANDIDATE} ops = "
          f"{BRUTE_CANDIDATES * BRUTE_OPS_PER_CANDIDATE} instr/elem -> {brute / 1e9:.1f} G elem/s")
    print(f"our window: {candidates:.2f} candidates per warp x {OUR_INSTR_PER_BLOCK_CANDIDATE}/16 instr = {ours_instr:.0f} "
          f"instr/elem -> {window / 1e9:.0f} G elem/s issue floor; memory floor {memory / 1e9:.0f} G elem/s")
    return {"brute_floor_gelem_s": brute / 1e9, "window_floor_gelem_s": window / 1e9, "memory_floor_gelem_s": memory / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-brute", action="store_true")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="benchmark the first N shapes")
    parser.add_argument("--variants", action="store_true", help="also time a few tile configurations")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    card = f"{props.name} ({props.multi_processor_count} SMs)"
    print(f"device: {card}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    fma_rate, bandwidth = measure_fp32_rate(), measure_copy_bandwidth()
    w, _, gs = make_weight(SHAPES[0][1], 0)
    stats = window_stats(w, gs)
    del w
    print("window (Qwen3-30B gate_up):", json.dumps(stats))
    floors = print_floors(fma_rate, bandwidth, stats["window_warp_mean"])
    variants = tile_variants(SHAPES[0][1]) if args.variants else []
    sweep = modelopt_sweep()
    rows = [bench_shape(name, shape, i, sweep, args.skip_brute) for i, (name, shape) in enumerate(SHAPES[: args.shapes])]
    cold = {"ours": cold_start(COLD_OURS)}
    if sweep is not None:
        cold["modelopt"] = cold_start(COLD_MODELOPT)
    print("\ncold start (fresh process, empty Triton cache, Qwen3-30B gate_up):", json.dumps(cold))
    print_table(rows, card)
    result = dict(card=card, fma_rate=fma_rate, copy_bandwidth=bandwidth, floors=floors, rows=rows, cold=cold,
                  variants=variants, window=stats)
    with open(os.path.join(args.out, "gpu_mse.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
