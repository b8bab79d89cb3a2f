"""The "gptq" weight method's step: the weighted exact search's scales, then GPTQ's codes under them.

``quantize.calibrate_weights(method="gptq")`` first computes exactly what "weighted_mse" does (group-shared global
scale, block scales of the weighted search with the channel weights ``E[x_k^2]``, round-to-nearest codes),
then ``gptq_scales`` replaces the codes of every expert (or linear) whose ``X^T X`` is usable by GPTQ's
(``formats.gptq``; batched over the experts of a projection by ``kernels.torch_gptq``, torch ops on the weight's
device; on CUDA each 16-column block's sweep is one Triton launch, ``kernels.triton_gptq``, with the same
codes), and the plain squared error by the shipped weights' error. The scales are untouched: the checkpoint
holds the searched scales, and a group still shares one global scale. Experts marked as fallbacks
(too few routed tokens, singular H, a failed factorization) keep the round-to-nearest codes, i.e. exactly what
"weighted_mse" ships; ``TensorScales.gptq_status`` records which (``formats.gptq.FALLBACK_REASONS``) and the
report lists them.

Linears that read one input (a weight group: q/k/v, a dense MLP's gate/up) have the same ``X^T X`` (the
observer adds one computation to each, ``channel_stats``); ``gptq_group`` stacks their rows into one call: one
factorization and one column sweep serve them all. GPTQ treats rows independently (each row's error feedback
uses only that row and ``U``), so the codes are those of separate calls (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moequant.formats.fp4 import pack_fp4
from moequant.formats.gptq import FACTOR_FAILED, GPTQ, code_block_squared_error
from moequant.kernels.torch_gptq import gptq_codes
from moequant.plan import Target
from moequant.scales import TensorScales


@dataclass(frozen=True)
class GptqInput:
    """What GPTQ needs of one target, from the calibration forward (``channel_stats.hessians``). ``H = xtx /
    tokens`` is formed per chunk of experts inside the kernel (no second ``[E, K, K]`` array)."""

    xtx: torch.Tensor      # float64 [K, K] (linear) / [E, K, K] (experts): X^T X summed over the (routed) tokens
    tokens: torch.Tensor   # float64 [] / [E]: tokens summed (at least 1)
    status: torch.Tensor   # int8 [] / [E]: formats.gptq.GPTQ, or the fallback reason decided from token counts

    @property
    def h(self) -> torch.Tensor:
        """``X^T X / T`` (a new array; the kernel never materializes it whole)."""
        return self.xtx / self.tokens[..., None, None]


def gptq_scales(target: Target, w: torch.Tensor, scales: TensorScales, inp: GptqInput,
                backend: str = "torch", act_order: bool = False) -> TensorScales:
    """``scales`` (weighted_mse's, with its round-to-nearest codes) with GPTQ's codes where ``inp`` allows;
    ``backend``: "torch" or "triton", ``act_order``: columns by decreasing input energy
    (``kernels.torch_gptq.gptq_codes``)."""
    use = inp.status.to(w.device) == GPTQ
    if not bool(use.any()):
        return replace(scales, gptq_status=inp.status.clone())
    codes, ok = gptq_codes(w, scales.global_scale, scales.block_scale, inp.xtx, use, tokens=inp.tokens,
                           backend=backend, act_order=act_order)
    return _with_codes(target, w, scales, inp, use, codes, ok)


def _with_codes(target: Target, w, scales: TensorScales, inp: GptqInput, use, codes, ok) -> TensorScales:
    status = torch.where(use.to(ok.device) & ~ok, FACTOR_FAILED, inp.status.to(ok.device)).to(torch.int8)
    sq = code_block_squared_error(w, codes, scales.global_scale, scales.block_scale)
    sq = sq.reshape(sq.shape[0], -1).sum(-1) if target.kind == "experts" else sq.sum()
    return replace(scales, codes=pack_fp4(codes), sq_error=sq, gptq_status=status)


def _stackable(targets: list[Target], scales: list[TensorScales], inps: list[GptqInput]) -> bool:
    """Linears with one input: equal X^T X, token counts and global scale (a group's), so one call serves all."""
    first, s0 = inps[0], scales[0]
    return all(t.kind == "linear" for t in targets) and all(
        torch.equal(i.xtx, first.xtx) and torch.equal(i.tokens, first.tokens) and torch.equal(i.status, first.status)
        and torch.equal(s.global_scale, s0.global_scale) for i, s in zip(inps[1:], scales[1:]))


def gptq_group(targets: list[Target], ws: list[torch.Tensor], scales: list[TensorScales],
               inps: list[GptqInput], backend: str = "torch", act_order: bool = False) -> list[TensorScales]:
    """``gptq_scales`` of each target; linears reading one input (see ``_stackable``) run as one call with their
    rows stacked ``[sum N, K]``, giving the codes separate calls give."""
    if len(targets) < 2 or not _stackable(targets, scales, inps):
        return [gptq_scales(t, w, s, i, backend, act_order) for t, w, s, i in zip(targets, ws, scales, inps)]
    inp = inps[0]
    use = inp.status.to(ws[0].device) == GPTQ
    if not bool(use):
        return [replace(s, gptq_status=inp.status.clone()) for s in scales]
    w = torch.cat([x.detach() for x in ws])                                         # [sum N, K]
    block = torch.cat([s.block_scale for s in scales])                               # [sum N, K/16]
    codes, ok = gptq_codes(w, scales[0].global_scale, block, inp.xtx, use, tokens=inp.tokens, backend=backend,
                           act_order=act_order)
    parts = codes.split([x.shape[0] for x in ws])
    return [_with_codes(t, x, s, inp, use, c, ok) for t, x, s, c in zip(targets, ws, scales, parts)]
