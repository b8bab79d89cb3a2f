"""Activation-weighted exact block-scale search ("weighted_mse"), reference.

A weight's error matters in proportion to the activations it multiplies: the expected squared output error
of ``y = x @ w^T`` from a weight error ``d`` is ``sum_i E[x_i^2] d_i^2`` (channels taken as uncorrelated).
So each input channel ``i`` gets a weight ``h_i >= 0``, the calibration's mean squared activation of that
channel (``E[x_i^2]``; for an expert, over the tokens routed to it), and the error of a block is

    weighted block error = sum over the 16 elements, in index order, of fl(fl(d_i * d_i) * h_i)
    d_i = w_f32_i - dequantized_i          (dequantized exactly as in ``nvfp4``: divide, E2M1 round, multiply)

every step a separately rounded fp32 operation (no fused multiply-add), summed left to right starting from
the first term. The search is ``mse``'s: all 126 positive finite E4M3 candidates in ascending order, a later
one replaces the best only if its weighted error is strictly lower (ties go to the smaller candidate; a NaN
error never wins; if no error is finite the answer is the smallest candidate). The global scale comes from
outside (group-shared, fixed before the search) exactly as for ``mse``, and a tiny tensor is searched
exponent-normalized as there (``nvfp4.exponent_normalized``: every term, weighted or not, scales by 2^2k).

Channel weights: ``h`` is float32 ``[K]`` (one per input channel, shared by every row and batch index) or
``[*B, K]`` (one vector per leading batch index, e.g. per expert of a fused ``[E, N, K]`` weight). It must be
finite and >= 0 (``check_channel_weights`` raises otherwise). With ``h == 1`` everywhere the weighted error
equals ``nvfp4.block_squared_error`` bit for bit (``fl(x * 1) = x``), so the search equals ``mse``.
A block whose channel weights are all zero has zero error at every candidate and gets the smallest candidate
(2^-9): callers should floor ``h`` (``moequant.channel_stats`` does) so that no channel is ignored.
"""

from __future__ import annotations

import torch

from moequant.formats.fp4 import decode_e2m1
from moequant.formats.fp8 import e4m3_positive_values
from moequant.formats.nvfp4 import (BLOCK_SIZE, WeightError, expand_global, exponent_normalized, quantize_blocks,
                                     restore_errors, to_blocks)


def check_channel_weights(h: torch.Tensor, w: torch.Tensor, name: str) -> None:
    """Raise ``WeightError`` naming ``name`` unless ``h`` is a finite, non-negative ``[K]`` / ``[*B, K]`` for w."""
    k, batch = w.shape[-1], tuple(w.shape[:-2])
    if tuple(h.shape) not in ((k,), batch + (k,)):
        raise WeightError(f"{name}: channel weights of shape {tuple(h.shape)} do not fit a weight of shape "
                          f"{tuple(w.shape)}; expected ({k},) or {batch + (k,)}")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise WeightError(f"{name}: channel weights must be finite and >= 0 (mean squared activations)")


def channel_blocks(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h [K]`` or ``[*B, K]`` -> float32 ``[*B', 1, K/16, 16]`` broadcasting against ``to_blocks(w)``."""
    k = w.shape[-1]
    hb = h.to(torch.float32).reshape(*h.shape[:-1], 1, k // BLOCK_SIZE, BLOCK_SIZE)
    if h.ndim == 1:
        hb = hb.reshape([1] * (w.ndim - 2) + list(hb.shape))
    return hb


def weighted_block_error(blocks: torch.Tensor, scale: torch.Tensor, h_blocks: torch.Tensor) -> torch.Tensor:
    """Per-block weighted squared error ``[...]`` of ``blocks [..., 16]`` at ``scale [..., 1]`` (docstring order)."""
    deq = decode_e2m1(quantize_blocks(blocks, scale)) * scale
    diff = blocks - deq
    terms = (diff * diff) * h_blocks
    total = terms[..., 0]
    for i in range(1, BLOCK_SIZE):
        total = total + terms[..., i]
    return total


def weighted_mse_block_scales_reference(blocks: torch.Tensor, global_scale: torch.Tensor,
                                        h_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact weighted search over float32 blocks ``[..., N, K/16, 16]``; returns (scales e4m3, errors f32)."""
    gs = expand_global(global_scale, blocks)  # [*B, 1, 1, 1]
    candidates = e4m3_positive_values(blocks.device)
    best_err = torch.full(blocks.shape[:-1], float("inf"), dtype=torch.float32, device=blocks.device)
    best_idx = torch.zeros(blocks.shape[:-1], dtype=torch.long, device=blocks.device)
    for i, c in enumerate(candidates):
        scale = (c * gs).expand(*blocks.shape[:-1], 1)
        err = weighted_block_error(blocks, scale, h_blocks)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_idx = torch.where(better, torch.full_like(best_idx, i), best_idx)
    return candidates[best_idx].to(torch.float8_e4m3fn), best_err


def search_weighted_reference(w: torch.Tensor, global_scale: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Weighted-MSE block scales (float8_e4m3fn ``[..., N, K/16]``) of ``w [..., N, K]`` with channel weights h."""
    check_channel_weights(h, w, "weight")
    hb = channel_blocks(h, w)
    w, global_scale, _ = exponent_normalized(w, global_scale)
    return weighted_mse_block_scales_reference(to_blocks(w), global_scale, hb)[0]


def weighted_weight_error(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor,
                          h: torch.Tensor) -> torch.Tensor:
    """Per-block weighted squared error ``[..., N, K/16]`` of ``w`` with the given scales (exponent-normalized)."""
    hb = channel_blocks(h, w)
    w, global_scale, k = exponent_normalized(w, global_scale)
    blocks = to_blocks(w)
    scale = block_scale.to(torch.float32).unsqueeze(-1) * expand_global(global_scale, blocks)
    return restore_errors(weighted_block_error(blocks, scale, hb), k)
