"""Random GPTQ problems: weights, correlated calibration inputs (like an LLM's: a few channels much larger,
channels mixed), their X^T X / T, and the weighted search's scales (the scales "gptq" keeps fixed)."""

from __future__ import annotations

import torch

from moequant.formats.nvfp4 import global_scale_from_amax, tensor_amax
from moequant.formats.weighted_mse import search_weighted_reference


def inputs(tokens: int, k: int, gen: torch.Generator, mix: float = 1.0) -> torch.Tensor:
    """float64 ``[tokens, K]``: independent normals times lognormal channel sizes, mixed by ``I + mix * M``."""
    size = torch.randn(k, generator=gen, dtype=torch.float64).mul(0.7).exp()
    mixing = torch.eye(k, dtype=torch.float64) + mix * torch.randn(k, k, generator=gen, dtype=torch.float64) / k**0.5
    return (torch.randn(tokens, k, generator=gen, dtype=torch.float64) * size) @ mixing


def problem(experts: int | None, n: int, k: int, tokens: int, seed: int, mix: float = 1.0):
    """(w [E, N, K] or [N, K] float32, global scale [E] or 0-d, block scales, h [E, K, K] or [K, K] float64)."""
    gen = torch.Generator().manual_seed(seed)
    e = experts or 1
    w = torch.randn(e, n, k, generator=gen) * torch.rand(e, n, 1, generator=gen).add(0.5)
    xs = [inputs(tokens, k, gen, mix) for _ in range(e)]
    h = torch.stack([x.T @ x / tokens for x in xs])
    gs = global_scale_from_amax(tensor_amax(w, 1))
    bs = search_weighted_reference(w, gs, h.diagonal(dim1=-2, dim2=-1).to(torch.float32))
    if experts is None:
        return w[0], gs[0], bs[0], h[0]
    return w, gs, bs, h
