"""Where GPTQ's time goes on one projection of all experts (issue 17's cost target), torch loop vs Triton sweep.

Problems shaped like Qwen3-30B-A3B's experts (128 experts; gate_up [E, 1536, 2048], down [E, 2048, 768]) and
its attention (q/k/v stacked [5120, 2048] on one input; o_proj [2048, 4096]), random weights with correlated
inputs (``tests/gptq_problems.py``'s generator, on the device). For each: the factorization alone
(``formats.gptq.inverse_factor`` on the chunks ``gptq_codes`` uses) and the whole ``gptq_codes`` with each
backend; the codes of the two backends are compared (they must be equal). One untimed run first (compile).

    PYTHONPATH=src:tests python3 bench/gptq_sweep.py            # on the lent H200
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from moequant.formats.gptq import inverse_factor  # noqa: E402
from moequant.formats.nvfp4 import global_scale_from_amax, tensor_amax  # noqa: E402
from moequant.kernels import torch_gptq  # noqa: E402
from moequant.kernels.torch_gptq import gptq_codes  # noqa: E402
from moequant.kernels.triton_mse import search_weighted  # noqa: E402

SHAPES = {"experts gate_up": (128, 1536, 2048), "experts down": (128, 2048, 768),
          "attention q/k/v": (None, 5120, 2048), "attention o": (None, 2048, 4096)}


def _problem(experts, n, k, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    e = experts or 1
    w = torch.randn(e, n, k, generator=gen, device=device)
    size = torch.randn(e, 1, k, generator=gen, device=device, dtype=torch.float64).mul(0.7).exp()
    x = torch.randn(e, 1024, k, generator=gen, device=device, dtype=torch.float64) * size
    mix = torch.randn(e, k, k, generator=gen, device=device, dtype=torch.float64) / k ** 0.5
    x = x + x @ mix
    xtx = x.transpose(1, 2) @ x
    del x, mix
    gs = global_scale_from_amax(tensor_amax(w, 1))
    bs = search_weighted(w, gs, xtx.diagonal(dim1=-2, dim2=-1).div(1024).to(torch.float32))
    tokens = torch.full((e,), 1024.0, dtype=torch.float64, device=device)
    if experts is None:
        return w[0], gs[0], bs[0], xtx[0], tokens[0]
    return w, gs, bs, xtx, tokens


def _timed(fn, device):
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-torch", action="store_true", help="time the Triton backend only")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, (experts, n, k) in SHAPES.items():
        w, gs, bs, xtx, tokens = _problem(experts, n, k, device)
        use = torch.ones(w.shape[:-2], dtype=torch.bool, device=device)
        per = max(1, torch_gptq.CHUNK_BYTES // (k * k * 8))
        h3 = (xtx / tokens[..., None, None]).reshape(-1, k, k)
        inverse_factor(h3[:1].clone(), owned=True)
        _, factor = _timed(lambda: [inverse_factor(h3[a:a + per].clone(), owned=True)
                                    for a in range(0, h3.shape[0], per)], device)
        del h3
        times, codes = {}, {}
        for backend in ("triton",) if args.skip_torch else ("triton", "torch"):
            run = lambda: gptq_codes(w, gs, bs, xtx, use, tokens=tokens, backend=backend)  # noqa: E731
            if backend == "triton":
                run()       # compile
            codes[backend], times[backend] = _timed(run, device)
        same = "-" if args.skip_torch else ("yes" if torch.equal(codes["torch"][0], codes["triton"][0]) else "NO")
        rows.append((name, tuple(w.shape), factor, times.get("torch"), times["triton"], same))
        del w, xtx, codes
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name(device)}, torch {torch.__version__}, chunk "
          f"{torch_gptq.CHUNK_BYTES >> 20} MiB of [K, K] float64")
    print("| projection | shape | factor s | gptq_codes torch s | gptq_codes triton s | speedup | codes equal |")
    print("|---|---|---|---|---|---|---|")
    for name, shape, factor, t_torch, t_triton, same in rows:
        tt = f"{t_torch:.2f}" if t_torch is not None else "-"
        sp = f"{t_torch / t_triton:.1f}x" if t_torch is not None else "-"
        print(f"| {name} | {list(shape)} | {factor:.2f} | {tt} | {t_triton:.2f} | {sp} | {same} |")


if __name__ == "__main__":
    main()
