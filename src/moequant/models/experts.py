"""Fused-experts containers (transformers 5.x ``<Model>Experts`` modules holding 3-D parameters).

A module is an experts container when it directly owns 3-D parameters whose leading dimension (the expert
count) agrees. Its layout is then read from shapes, checked against the model's hidden size:

    standard    gate_up_proj [E, 2I, H] (gate rows first, then up), down_proj [E, H, I]
                (Qwen2/3-MoE, Qwen3-Next, Mixtral, DeepSeek-V2/V3, OLMoE, GLM4-MoE, ... : the
                ``@use_experts_implementation`` family, whose eager/grouped_mm/batched_mm kernels all use it)
    transposed  gate_up_proj [E, H, 2I], down_proj [E, I, H]  (GPT-OSS: gate/up interleaved, with biases;
                Llama4: halves). Which of the two interleavings applies is not visible in shapes, so
                transposed containers are accepted only for the classes listed in ``TRANSPOSED_LAYOUTS``.

Anything else that owns 3-D parameters is an error naming its path and class: never a guessed layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moequant.errors import MoequantError


class UnsupportedModelError(MoequantError, ValueError):
    """The model holds weights moequant does not know how to quantize safely; the message says which."""


@dataclass(frozen=True)
class ExpertsLayout:
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False       # parameters stored [E, in, out]
    interleaved: bool = False      # gate = rows 0::2, up = rows 1::2 of the canonical [E, 2I, H] view
    gate_up_bias: str | None = None
    down_bias: str | None = None


STANDARD = ExpertsLayout()
TRANSPOSED_LAYOUTS = {
    "GptOssExperts": ExpertsLayout(
        transposed=True, interleaved=True, gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias"
    ),
    "Llama4TextExperts": ExpertsLayout(transposed=True),
}


@dataclass(frozen=True)
class ExpertsContainer:
    path: str
    module: nn.Module
    layout: ExpertsLayout
    num_experts: int
    intermediate: int  # I
    hidden: int        # H

    def canonical(self, param_name: str) -> torch.Tensor:
        """The ``[E, N, K]`` view of a weight parameter (a transpose view for transposed layouts)."""
        p = getattr(self.module, param_name)
        return p.transpose(-1, -2) if self.layout.transposed else p

    def gate_up_rows(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(gate rows, up rows) of the canonical gate_up view, as (start, stop, step)."""
        n = 2 * self.intermediate
        if self.layout.interleaved:
            return (0, n, 2), (1, n, 2)
        return (0, self.intermediate, 1), (self.intermediate, n, 1)


def own_3d_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.ndim == 3}


def _shapes(params: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{n} {list(p.shape)}" for n, p in params.items())


def _layout_for(path: str, module: nn.Module, hidden: int) -> ExpertsLayout:
    cls = type(module).__name__
    params = own_3d_params(module)
    if cls in TRANSPOSED_LAYOUTS:
        return TRANSPOSED_LAYOUTS[cls]
    gu, dn = params.get(STANDARD.gate_up), params.get(STANDARD.down)
    if gu is not None and dn is not None:
        e, two_i, h = gu.shape
        if h == hidden and dn.shape == (e, hidden, two_i // 2) and two_i % 2 == 0:
            return STANDARD
    raise UnsupportedModelError(
        f"{path} ({cls}) holds 3-D expert weights ({_shapes(params)}) in a layout moequant does not know "
        f"(expected gate_up_proj [E, 2I, {hidden}] and down_proj [E, {hidden}, I]); refusing to guess. "
        "Please open an issue with the model's config.json."
    )


def find_experts(model: nn.Module, hidden: int) -> list[ExpertsContainer]:
    """Every fused-experts container of ``model``, validated (raises ``UnsupportedModelError``)."""
    found = []
    for path, module in model.named_modules():
        params = own_3d_params(module)
        if not params:
            continue
        layout = _layout_for(path, module, hidden)
        gu = getattr(module, layout.gate_up)
        dn = getattr(module, layout.down)
        e = gu.shape[0]
        gu_c = gu.transpose(-1, -2) if layout.transposed else gu
        dn_c = dn.transpose(-1, -2) if layout.transposed else dn
        ok = gu_c.shape[2] == hidden and dn_c.shape == (e, hidden, gu_c.shape[1] // 2)
        extra = set(params) - {layout.gate_up, layout.down}
        if not ok or extra:
            raise UnsupportedModelError(
                f"{path} ({type(module).__name__}): 3-D parameters {_shapes(params)} do not match the "
                f"{'transposed' if layout.transposed else 'standard'} experts layout for hidden size {hidden}"
            )
        found.append(ExpertsContainer(path, module, layout, e, gu_c.shape[1] // 2, hidden))
    return found
