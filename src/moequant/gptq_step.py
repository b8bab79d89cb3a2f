"""The "gptq" weight method's step: the weighted exact search's scales, then GPTQ's codes under them.

``quantize.calibrate_weights(method="gptq")`` first computes exactly what "weighted_mse" does (group-shared global
scale, block scales of the weighted search with the channel weights ``E[x_k^2]``, round-to-nearest codes),
then ``gptq_scales`` replaces the codes of every expert (or linear) whose ``X^T X`` is usable by GPTQ's
(``formats.gptq``; batched over the experts of a projection by ``kernels.torch_gptq``, torch ops on the weight's
device, no Triton), and the plain squared error by the shipped weights' error. The scales are untouched: the
checkpoint holds the searched scales, and a group still shares one global scale. Experts marked as fallbacks
(too few routed tokens, singular H, a failed factorization) keep the round-to-nearest codes, i.e. exactly what
"weighted_mse" ships; ``TensorScales.gptq_status`` records which (``formats.gptq.FALLBACK_REASONS``) and the
report lists them.
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
    """What GPTQ needs of one target, from the calibration forward (``channel_stats.hessians``)."""

    h: torch.Tensor        # float64 [K, K] (linear) / [E, K, K] (experts): X^T X / T over the (routed) tokens
    status: torch.Tensor   # int8 [] / [E]: formats.gptq.GPTQ, or the fallback reason decided from token counts


def gptq_scales(target: Target, w: torch.Tensor, scales: TensorScales, inp: GptqInput) -> TensorScales:
    """``scales`` (weighted_mse's, with its round-to-nearest codes) with GPTQ's codes where ``inp`` allows."""
    use = inp.status.to(w.device) == GPTQ
    if not bool(use.any()):
        return replace(scales, gptq_status=inp.status.clone())
    codes, ok = gptq_codes(w, scales.global_scale, scales.block_scale, inp.h, use)
    status = torch.where(use.to(ok.device) & ~ok, FACTOR_FAILED, inp.status.to(ok.device)).to(torch.int8)
    sq = code_block_squared_error(w, codes, scales.global_scale, scales.block_scale)
    sq = sq.reshape(sq.shape[0], -1).sum(-1) if target.kind == "experts" else sq.sum()
    return replace(scales, codes=pack_fp4(codes), sq_error=sq, gptq_status=status)
