"""Min and max over a dimension on this machine's CPU: ``torch.aminmax(x, dim)`` against ``amin`` + ``amax``
(and the full ``aminmax`` for scale), on the shapes the job reduces: a weight per expert, routed pairs' gated
activations, one long row. Why ``moequant.reductions.amin_amax`` takes the two calls on a CPU.

    python3 bench/cpu_reductions.py
"""

from __future__ import annotations

import time

import torch

SHAPES = [(4096, 1536), (8, 3072 * 576), (1, 8 * 3072 * 576), (128, 100_000), (64, 4096 * 64)]


def best(f, repeats: int = 5) -> float:
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shape | dtype | aminmax(dim) ms | amin + amax ms | aminmax(all) ms | aminmax(dim) / two |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(*shape).to(dtype)
            one = best(lambda: torch.aminmax(x, dim=-1))
            two = best(lambda: (torch.amin(x, -1), torch.amax(x, -1)))
            full = best(lambda: torch.aminmax(x.reshape(-1)))
            print(f"| {list(shape)} | {str(dtype)[6:]} | {1e3 * one:.2f} | {1e3 * two:.2f} | {1e3 * full:.2f} | "
                  f"{one / two:.1f}x |")


if __name__ == "__main__":
    main()
