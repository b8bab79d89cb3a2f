"""Batched twin of ``formats.gptq``: every expert of a projection at once, with torch ops on any device.

``gptq_codes(w [*B, N, K], global_scale, block_scale, h [*B, K, K], use [*B])`` runs the reference's steps for
all batch indices together: one batched factorization (``formats.gptq.inverse_factor`` on ``[E, K, K]``), one
launch per op per column for all experts (``backend="triton"``: one launch per 16-column NVFP4 block,
``kernels.triton_gptq``, the same values bit for bit), and batched matmuls per column block
(``[E, N, 16] @ [E, 16, rest of the block]`` per NVFP4 block, ``[E, N, 128] @ [E, 128, K - end]`` per block of
``COLUMN_BLOCK = 128``), where the reference updates all the remaining columns after each 16-column block: the
same arithmetic, summed in another order, so the float64 working
weights differ in the last bits and a code can differ where a value falls within rounding noise of an E2M1
decision boundary (tests: equal codes on well-conditioned random problems, objective within a stated tolerance
otherwise). Batch indices with ``use`` False (fallbacks) get ``U = I``, i.e. round to nearest. ``act_order``: each
chunk's H, weights and element scales are permuted per expert (``formats.gptq.column_order``) before the sweep,
which then runs unchanged (its 16-column blocks mix NVFP4 blocks, each column carrying its own scale), and the
codes are put back in place.

Memory, beyond the caller's ``h`` (which may be the unnormalized ``X^T X`` sums, divided by ``tokens`` here, per
chunk): the experts are cut into chunks of ``e`` so that one float64 ``[e, K, K]`` array stays under
``CHUNK_BYTES``; a chunk holds at most 2 such arrays at once (the chunk's H, damped in place, then its flipped
copy, its Cholesky factor, that factor's inverse and ``U`` in turn, ``inverse_factor(owned=True)``) besides the
linear-algebra library's
workspace; besides, weight-sized arrays: the projection's fp32 element scales and uint8 codes (``5 E N K``
bytes) and the chunk's float64 working weights (``8 e N K``). The ``[E, K, K]`` part is thus ``2 * CHUNK_BYTES``
at most, whatever the number of experts. Each chunk is an independent problem computed with the same ops (an
elementwise division, per-expert factorizations, batched matmuls whose rows are the chunk's experts), so the
codes do not depend on the chunking (tested bit for bit); the chunking depends only on the shapes, so a rerun
gives the same bytes.
"""

from __future__ import annotations

import torch

from moequant.formats.gptq import (
    DAMP, column_order, column_scales, inverse_factor, permute_columns, round_column, unpermute_columns)
from moequant.formats.nvfp4 import BLOCK_SIZE

COLUMN_BLOCK = 128
CHUNK_BYTES = 1 << 30


def _sweep_torch(block, scale, rows, codes, errors) -> None:
    """One 16-column NVFP4 block, column by column (``kernels.triton_gptq.sweep_block``'s contract; ``block`` is
    updated in place, which nothing reads afterwards)."""
    end = block.shape[-1]
    for j in range(end):
        codes[:, :, j], q = round_column(block[:, :, j], scale[:, :, j])
        err = (block[:, :, j] - q) / rows[:, j, j, None]    # [E, N]
        block[:, :, j:end] -= err[:, :, None] * rows[:, None, j, j:end]
        errors[:, :, j] = err


def _gptq_batch(w: torch.Tensor, scale: torch.Tensor, upper: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Codes uint8 ``[E, N, K]`` of float32 ``w [E, N, K]`` at fp32 element scales ``scale [E, N, K]`` for upper
    factors ``upper [E, K, K]`` (step 4 of ``formats.gptq``): two levels of lazy updates, the column's error
    within its 16-column NVFP4 block elementwise (``_sweep_torch``, or its one-launch Triton twin), the rest of
    the ``COLUMN_BLOCK`` and then the rest of the weight by batched matmuls."""
    e, n, k = w.shape
    if backend == "triton":
        from moequant.kernels.triton_gptq import sweep_block
    else:
        sweep_block = _sweep_torch
    work = w.to(torch.float64)
    codes = torch.empty((e, n, k), dtype=torch.uint8, device=w.device)
    for start in range(0, k, COLUMN_BLOCK):
        stop = min(start + COLUMN_BLOCK, k)
        block = work[:, :, start:stop].clone()                  # [E, N, b]
        rows = upper[:, start:stop, start:stop]                 # [E, b, b]
        errors = torch.empty_like(block)
        for inner in range(0, stop - start, BLOCK_SIZE):
            end = min(inner + BLOCK_SIZE, stop - start)
            sweep_block(block[:, :, inner:end], scale[:, :, start + inner:start + end],
                        rows[:, inner:end, inner:end], codes[:, :, start + inner:start + end],
                        errors[:, :, inner:end])
            if end < stop - start:
                block[:, :, end:] -= errors[:, :, inner:end] @ rows[:, inner:end, end:]
        if stop < k:
            work[:, :, stop:] -= errors @ upper[:, start:stop, stop:]
    return codes


def _chunk_h(h3, count, use1, device) -> torch.Tensor:
    """The chunk's float64 ``H`` from its ``h3`` (divided by ``count`` per expert unless None): a new array,
    never the caller's, handed to ``inverse_factor`` as its only reference, so that it is freed as soon as it is
    factored; unused experts get ``H = I``."""
    hh = h3.to(device=device, dtype=torch.float64, copy=count is None)
    hh = hh / count[:, None, None] if count is not None else hh
    hh.masked_fill_(~use1[:, None, None], 0.0)
    hh.diagonal(dim1=-2, dim2=-1).masked_fill_(~use1[:, None], 1.0)
    return hh


def gptq_codes(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor, h: torch.Tensor,
               use: torch.Tensor, damp: float = DAMP, tokens: torch.Tensor | None = None,
               chunk_bytes: int | None = None, backend: str = "torch",
               act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes uint8 ``[*B, N, K]`` and factorization success ``[*B]`` (False where ``use`` is False) of ``w [*B, N, K]``
    under its scales (``global_scale`` ``[*B]`` or one for all, ``block_scale`` ``[*B, N, K/16]``), for
    ``h = X^T X / T [*B, K, K]`` on any device (moved to ``w``'s), or with ``tokens [*B]`` (float64) ``h = X^T X``
    summed, divided by ``tokens`` per chunk. ``B`` is 0 or 1 dimension. ``chunk_bytes``: default ``CHUNK_BYTES``.
    ``backend``: "torch", or "triton" (CUDA: each 16-column block in one launch, ``kernels.triton_gptq``; the same
    codes). ``act_order``: each expert's columns in the order of ``formats.gptq.column_order`` (the scales are
    fixed, so any order keeps them; the codes come back in the weight's own column order)."""
    lead = tuple(w.shape[:-2])
    n, k = w.shape[-2:]
    if len(lead) > 1 or tuple(h.shape) != lead + (k, k) or tuple(use.shape) != lead:
        raise ValueError(f"gptq_codes: w {tuple(w.shape)}, h {tuple(h.shape)}, use {tuple(use.shape)} do not fit "
                         "[E, N, K] / [E, K, K] / [E] (or [N, K] / [K, K] / [])")
    w3, h3 = w.detach().reshape(-1, n, k), h.reshape(-1, k, k)
    scale = column_scales(global_scale.to(w.device), block_scale, k).reshape(-1, n, k).contiguous()
    use1 = use.reshape(-1).to(w.device)
    codes = torch.empty(w3.shape, dtype=torch.uint8, device=w.device)
    ok = torch.zeros(use1.shape, dtype=torch.bool, device=w.device)
    count = tokens.reshape(-1).to(device=w.device, dtype=torch.float64) if tokens is not None else None
    per = max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (k * k * 8))
    for a in range(0, w3.shape[0], per):
        b = min(a + per, w3.shape[0])
        chunk_count = count[a:b] if count is not None else None
        hh = [_chunk_h(h3[a:b], chunk_count, use1[a:b], w.device)]   # popped: each callee holds the only reference
        wc, sc = w3[a:b].to(torch.float32), scale[a:b]
        if act_order:
            order = column_order(hh[0])                                          # [e, K]
            hh.append(permute_columns(hh.pop(), order, square=True))
            wc, sc = permute_columns(wc, order), permute_columns(sc, order)
        upper, good = inverse_factor(hh.pop(), damp, owned=True)
        chunk_codes = _gptq_batch(wc, sc, upper, backend)
        codes[a:b] = unpermute_columns(chunk_codes, order) if act_order else chunk_codes
        ok[a:b] = good & use1[a:b]
    return codes.reshape(w.shape), ok.reshape(lead)
