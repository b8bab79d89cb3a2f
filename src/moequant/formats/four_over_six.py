"""Four-over-six block scales, reference: per block, the block max maps to 6 (standard "max") or to 4.

E2M1 has no value between 4 and 6, so a block whose values cluster near 5/6 of its max loses much when the max
maps to 6; mapping it to 4 (scale ``amax / 4``) trades the top for a finer grid below (Cook et al., "Four
Over Six", 2025; ModelOpt's "four_over_six"). Per block, both candidates are computed with the ops of
``nvfp4.max_block_scales`` (``divisor`` 6 or 4):

    candidate_d = e4m3(max(block_amax / d / global, 2^-9))     IEEE divisions, saturating at 448
    error_d     = nvfp4.block_squared_error at candidate_d     (or, with channel weights h, the weighted
                                                                error of ``formats.weighted_mse``)

and the 4-candidate replaces the 6-candidate only if its error is strictly lower (a tie keeps "max").

How it combines with the other options (decided here, enforced by the recipe):
  * with "mse" / "weighted_mse" it is redundant: both candidates are among the 126 candidates that the exact
    search already scans, so the exact search's error is never above four-over-six's. The recipe therefore
    accepts ``four_over_six`` only with ``method: max``.
  * with the global-scale search (``formats.global_search``) it composes: each global candidate runs the
    four-over-six choice; with the standard global scale a block near the tensor max cannot map to 4
    (its 4-scale would be 672 > 448 and saturates), a larger global scale lets it.
  * with channel weights (activation statistics available) the choice uses the weighted error.
"""

from __future__ import annotations

import torch

from moequant.formats.fp8 import E4M3_MIN_SUBNORMAL, round_to_e4m3
from moequant.formats.nvfp4 import block_amax, block_squared_error, expand_global
from moequant.formats.weighted_mse import weighted_block_error

FOUR = 4.0
SIX = 6.0


def divisor_block_scales(blocks: torch.Tensor, global_scale: torch.Tensor, divisor: float) -> torch.Tensor:
    """``e4m3(max(block_amax / divisor / global, 2^-9))`` -> float8_e4m3fn ``[..., N, K/16]``."""
    gs = expand_global(global_scale, blocks)[..., 0]
    d = torch.tensor(divisor, dtype=torch.float32, device=blocks.device)  # tensor divisor: IEEE on CUDA too
    raw = block_amax(blocks) / d / gs
    return round_to_e4m3(raw.clamp_min(E4M3_MIN_SUBNORMAL))


def _errors(blocks, scale_e4m3, gs, h_blocks):
    scale = scale_e4m3.to(torch.float32).unsqueeze(-1) * gs
    if h_blocks is None:
        return block_squared_error(blocks, scale)
    return weighted_block_error(blocks, scale, h_blocks)


def four_over_six_block_scales(blocks: torch.Tensor, global_scale: torch.Tensor,
                               h_blocks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block choice between the 6- and 4-candidates of float32 ``blocks [..., N, K/16, 16]``.

    Returns (float8_e4m3fn scales ``[..., N, K/16]``, their fp32 (weighted) errors).
    """
    gs = expand_global(global_scale, blocks)  # [*B, 1, 1, 1]
    six = divisor_block_scales(blocks, global_scale, SIX)
    four = divisor_block_scales(blocks, global_scale, FOUR)
    err6, err4 = _errors(blocks, six, gs, h_blocks), _errors(blocks, four, gs, h_blocks)
    better = err4 < err6
    scales = torch.where(better, four.view(torch.uint8), six.view(torch.uint8)).view(torch.float8_e4m3fn)
    return scales, torch.where(better, err4, err6)
