"""Block-scale search, reference: "max" and exact 126-candidate "mse".

``search_block_scales_reference(w, global_scale, method)`` returns float8_e4m3fn block scales
``[..., N, K/16]`` for ``w [..., N, K]`` and a global scale per leading batch index (``[*B]`` or a scalar).

"mse": for every block, among all 126 positive finite E4M3 values ``c`` (ascending), the one minimizing
``block_squared_error(block, float32(c) * global)`` (arithmetic fixed in ``nvfp4``). Ties go to the smaller
candidate: candidates are visited in ascending order and a later one replaces the best only if its error is
strictly lower. The global scale comes from outside so that a group (q/k/v, an expert's gate+up) can share
one, fixed before the search: the block scales searched are the block scales shipped.

A tiny tensor is searched exponent-normalized (``nvfp4.exponent_normalized``): the same scales as at any other
magnitude. This reference loops over candidates, one vectorized pass over all blocks each; ``moequant.kernels`` has the
fast twins that must return identical bytes.
"""

from __future__ import annotations

import torch

from moequant.formats.fp8 import e4m3_positive_values
from moequant.formats.nvfp4 import (
    block_squared_error,
    check_finite,
    expand_global,
    exponent_normalized,
    max_block_scales,
    to_blocks,
)

METHODS = ("max", "mse")


def mse_block_scales_reference(blocks: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MSE search over float32 blocks ``[..., N, K/16, 16]``; returns (scales e4m3, errors f32)."""
    gs = expand_global(global_scale, blocks)  # [*B, 1, 1, 1]
    candidates = e4m3_positive_values(blocks.device)
    best_err = torch.full(blocks.shape[:-1], float("inf"), dtype=torch.float32, device=blocks.device)
    best_idx = torch.zeros(blocks.shape[:-1], dtype=torch.long, device=blocks.device)
    for i, c in enumerate(candidates):
        scale = (c * gs).expand(*blocks.shape[:-1], 1)
        err = block_squared_error(blocks, scale)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_idx = torch.where(better, torch.full_like(best_idx, i), best_idx)
    return candidates[best_idx].to(torch.float8_e4m3fn), best_err


def search_block_scales_reference(w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse") -> torch.Tensor:
    """Block scales (float8_e4m3fn ``[..., N, K/16]``) of ``w [..., N, K]`` by ``method`` ("max" or "mse"),
    exponent-normalized (``nvfp4``'s docstring) for tiny global scales."""
    check_finite(w, "weight")
    w, global_scale, _ = exponent_normalized(w, global_scale)
    blocks = to_blocks(w)
    if method == "max":
        return max_block_scales(blocks, global_scale)
    if method == "mse":
        return mse_block_scales_reference(blocks, global_scale)[0]
    raise ValueError(f"unknown block-scale method {method!r}; expected one of {METHODS}")
