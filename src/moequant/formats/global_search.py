"""Global-scale search, reference: try a few global scales around ``amax / 2688`` and keep the best.

The E4M3 block-scale grid is ``float32(c_j) * global``: changing the global scale shifts the grid under every
block, and the best grid differs from the conventional ``amax / (6 * 448)``. For each candidate

    global_f = max(fl(base_global * f), 2^-126),   f in GLOBAL_FACTORS (visited in that order, 1.0 first)

the exact per-block search of the chosen method runs at that global scale (``block_search``), and the total
error (weighted by the channel weights ``h`` when a member has them, for every method; else plain) is the sum over the member's blocks of its per-block fp32 errors, accumulated in float64 by one
``torch.sum`` over the flattened ``[*B, blocks]`` errors (the same call for every backend, so identical
per-block errors give an identical total). A group (q/k/v, an expert's gate+up fused in one tensor, ...) keeps
ONE global scale: its total is the sum of its members' totals (member order), and the candidate is chosen
for the group. Fused experts ``[E, N, K]`` keep one global scale per expert: the choice is per batch index.
A later candidate replaces the best only if its total is strictly lower, so the search never returns a
worse total than the conventional scale (f = 1.0 is visited first) and ties keep the smaller index.

The factors span a little under one octave: a factor of 2 gives the same grid again (up to the ends of the
E4M3 range), a factor below 1 makes the largest block saturate at 448 (the search may prefer that clip).
Cost: ``len(GLOBAL_FACTORS)`` block searches per tensor (8x the chosen method).
"""

from __future__ import annotations

from typing import Callable

import torch

from moequant.formats.four_over_six import four_over_six_block_scales
from moequant.formats.mse import mse_block_scales_reference
from moequant.formats.nvfp4 import (MIN_GLOBAL_SCALE, batch_amax, block_squared_error, check_finite, effective_scale,
                                     exponent_normalized, max_block_scales, normalization_needed, restore_errors,
                                     times_pow2, to_blocks)
from moequant.formats.weighted_mse import channel_blocks, weighted_block_error, weighted_mse_block_scales_reference

GLOBAL_FACTORS = tuple(2.0 ** (i / 8) for i in (0, -1, 1, 2, 3, 4, 5, 6))

# (w [*B, N, K], global scale [*B], channel weights h or None) -> (block scales e4m3, per-block errors f32)
BlockSearch = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def global_candidates(base_global: torch.Tensor) -> list[torch.Tensor]:
    """``max(fl(base * f), 2^-126)`` for every factor, each shaped like ``base_global``."""
    base = base_global.to(torch.float32)
    return [(base * torch.tensor(f, dtype=torch.float32, device=base.device)).clamp_min(MIN_GLOBAL_SCALE)
            for f in GLOBAL_FACTORS]


def total_error(errors: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """float64 ``[*B]`` sum of per-block errors ``[*B, N, K/16]`` (the one reduction every backend uses)."""
    return errors.to(torch.float64).reshape(*errors.shape[:batch_dims], -1).sum(-1)


def search_global(members: list[tuple[torch.Tensor, torch.Tensor | None]], base_global: torch.Tensor,
                  block_search: BlockSearch) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Best global scale ``[*B]`` (or 0-d) for a group of weights sharing it, and each member's (scales, errors).

    ``members``: (w ``[*B, N, K]``, channel weights or None) of every tensor of the group, same batch shape.
    A tiny group is searched exponent-normalized (``nvfp4``) with one shift per batch index for every member
    and candidate, so that their errors stay comparable; the scale returned is the candidate itself.
    """
    batch_dims = members[0][0].ndim - 2
    members, shift = _normalized_group(members, base_global)
    best_total, best_global, best = None, None, None
    for g in global_candidates(base_global):
        g_search = g if shift is None else times_pow2(g, shift)
        found = [block_search(w, g_search, h) for w, h in members]
        total = total_error(found[0][1], batch_dims)
        for _, err in found[1:]:
            total = total + total_error(err, batch_dims)
        if best_total is None:
            best_total, best_global, best = total, g, found
            continue
        better = total < best_total  # [*B]
        best_total = torch.where(better, total, best_total)
        best_global = torch.where(better, g, best_global)
        mask = better.reshape(*better.shape, 1, 1)
        best = [(torch.where(mask, s.view(torch.uint8), bs.view(torch.uint8)).view(torch.float8_e4m3fn),
                 torch.where(mask, e, be)) for (s, e), (bs, be) in zip(found, best)]
    return best_global, [(s, restore_errors(e, shift)) for s, e in best]


def _normalized_group(members, base_global):
    """Members shifted by one ``exponent_normalized`` k per batch index (capped by the largest member), and k
    to shift each candidate global scale alike; (members, None) when none is tiny."""
    if not normalization_needed(base_global):
        return members, None
    amax = batch_amax(members[0][0], base_global)
    for w, _ in members[1:]:
        amax = torch.maximum(amax, batch_amax(w, base_global))
    out, k = [], None
    for w, h in members:
        w_n, _, k = exponent_normalized(w, base_global, amax)
        out.append((w_n, h))
    return out, k


def reference_block_search(method: str) -> BlockSearch:
    """The reference ``BlockSearch`` of a method: "max", "mse", "weighted_mse" or "four_over_six" (a tiny
    tensor exponent-normalized, ``nvfp4``; its errors handed back in the caller's units)."""
    def run(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None):
        check_finite(w, "weight")
        if method not in ("mse", "max", "weighted_mse", "four_over_six"):
            raise ValueError(f"unknown block-scale method {method!r}")
        hb = channel_blocks(h, w) if h is not None else None
        w, g, k = exponent_normalized(w, g)
        scales, err = _search_blocks(method, to_blocks(w), g, hb)
        return scales, restore_errors(err, k)

    return run


def _search_blocks(method: str, blocks: torch.Tensor, g: torch.Tensor, hb: torch.Tensor | None):
    if method == "weighted_mse":
        return weighted_mse_block_scales_reference(blocks, g, hb)
    if method == "four_over_six":
        return four_over_six_block_scales(blocks, g, hb)
    scales = mse_block_scales_reference(blocks, g)[0] if method == "mse" else max_block_scales(blocks, g)
    scale = effective_scale(scales, g, blocks)
    return scales, block_squared_error(blocks, scale) if hb is None else weighted_block_error(blocks, scale, hb)
