"""Exact reductions, each through the torch call that is fastest for it on the tensor's device.

``amin_amax(x, dim)`` is ``torch.aminmax``: the same values, NaN propagated the same way (a min or a max does
not round, so any order of reading gives the same value; only a zero's sign, where a slice holds both -0.0 and
+0.0, and a NaN's payload may come out otherwise, which ``abs_max`` normalizes away). On a CPU, torch's
``aminmax`` over a dimension is 6-16x slower than ``amin`` and ``amax`` run one after the other (torch 2.13,
bf16 and float32, 2 cores, from [1, 14M] to [4096, 1536]: ``bench/cpu_reductions.py``), while the full
reduction (no ``dim``) is the faster of the two; on an accelerator one ``aminmax`` pass reads the tensor once
instead of twice.
"""

from __future__ import annotations

import torch


def amin_amax(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``x``, over ``dim`` (removed) or over every element, as ``torch.aminmax`` returns them."""
    if dim is None:
        return torch.aminmax(x)
    if x.device.type == "cpu":
        return torch.amin(x, dim), torch.amax(x, dim)
    return torch.aminmax(x, dim=dim)


def abs_max(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |x| (over ``dim``) in ``x``'s dtype without a ``|x|`` temporary: ``max(-min, max)``, exact (negation
    is exact; NaN propagates); ``+ 0`` makes a zero +0.0, as ``x.abs().amax()`` has it."""
    low, high = amin_amax(x, dim)
    return torch.maximum(-low, high) + 0
