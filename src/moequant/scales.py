"""Calibrated state as explicit data: scales per target, and per-on-disk-tensor records (views).

Nothing here lives in the model: a ``QuantState`` is a plain object holding tensors keyed by target key,
and ``records()`` slices them into one ``Record`` per on-disk tensor name (every expert's gate, up and down),
sharing storage with the per-target tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moequant.plan import DiskSlice, Plan, Target


@dataclass
class TensorScales:
    """Scales of one target. Leading ``[E]`` dimension for fused experts, none for a linear.

    nvfp4: ``global_scale`` = weight_scale_2 (amax / 2688, group-shared), ``block_scale`` float8 [.., N, K/16].
    fp8:   ``global_scale`` = per-tensor weight scale amax / 448 (group-shared), ``block_scale`` None.
    ``input_scale`` (float32, same leading shape) is filled by activation calibration.
    ``codes``: what the checkpoint stores for the weight, computed where the weight was searched (on the
    compute device, in the same step): nvfp4 packed E2M1 codes uint8 ``[.., N, K/2]`` (element 2j in the low
    nibble), fp8 float8_e4m3fn ``[.., N, K]``. Export writes them; it never quantizes.
    """

    key: str
    scheme: str
    method: str
    amax: torch.Tensor                 # own weight amax, before the group max
    global_scale: torch.Tensor
    block_scale: torch.Tensor | None
    sq_error: torch.Tensor             # sum of squared weight error with the chosen scales, per expert
    sq_error_max: torch.Tensor         # same with "max" block scales (the baseline MSE improves on)
    sq_norm: torch.Tensor              # sum of squared weights, per expert (for relative error)
    input_scale: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    gptq_status: torch.Tensor | None = None   # "gptq": int8 per expert (0-d: linear), formats.gptq.GPTQ or why not


@dataclass(frozen=True)
class Record:
    """The scales of one on-disk tensor (views into its target's ``TensorScales``)."""

    name: str
    target: str
    expert: int | None
    rows: tuple[int, int, int]
    role: str
    global_scale: torch.Tensor          # 0-d (or [E] for a fused tensor written whole)
    block_scale: torch.Tensor | None    # [rows, K/16] (or [E, N, K/16])
    input_scale: torch.Tensor | None
    codes: torch.Tensor | None = None   # [rows, K/2] uint8 (nvfp4) / [rows, K] float8 (fp8), a view


def _rows(t: torch.Tensor, rows: tuple[int, int, int]) -> torch.Tensor:
    start, stop, step = rows
    return t[..., start:stop:step, :]


def make_record(target: Target, s: DiskSlice, scales: TensorScales) -> Record:
    def pick(x):
        if x is None:
            return None
        return x if (s.expert is None) else x[s.expert]

    def rows(x):
        return None if x is None else _rows(x if s.expert is None else x[s.expert], s.rows)

    return Record(s.name, target.key, s.expert, s.rows, s.role, pick(scales.global_scale), rows(scales.block_scale),
                  pick(scales.input_scale), rows(scales.codes))


@dataclass(frozen=True)
class KVScales:
    """FP8 KV-cache scales of one attention module (float32 0-d tensors; 1.0 for "fp8-cast")."""

    attention_path: str          # e.g. "model.layers.3.self_attn"
    k_scale: torch.Tensor
    v_scale: torch.Tensor


def _roles_of_fused(target: Target, s: DiskSlice) -> list[tuple[str, tuple[int, int, int]]]:
    """(role, rows) of one expert inside a fused on-disk tensor: gate/up halves or interleaved, or down."""
    if s.role == "down":
        return [("down", s.rows)]
    n = target.shape[1]
    if target.interleaved:
        return [("gate", (0, n, 2)), ("up", (1, n, 2))]
    return [("gate", (0, n // 2, 1)), ("up", (n // 2, n, 1))]


@dataclass
class QuantState:
    """The calibrated state of a model: plan, per-target scales, and how they were computed."""

    plan: Plan
    tensors: dict[str, TensorScales]
    backend: str
    method: str
    kv_cache: dict[str, KVScales] = field(default_factory=dict)  # by attention path; empty: no KV quant
    kv_scheme: str | None = None                                   # None | "fp8" | "fp8-cast"
    notes: list[str] = field(default_factory=list)
    smoothing: list = field(default_factory=list)   # moequant.smoothing.Smoothing of each smoothed decoder layer

    def smoothed_tensors(self) -> dict:
        """Parameter name -> value after smoothing of every unquantized tensor the smoothing changed."""
        return {name: t for s in self.smoothing for name, t in s.changed.items()}

    def expert_records(self) -> dict[str, Record]:
        """One record per expert and projection (gate, up, down) of every fused-experts target.

        Names are the on-disk names where the checkpoint stores experts separately; where transformers keeps
        the tensor fused on disk (GPT-OSS), the view is named ``"<disk name>[<expert>].<role>"``.
        """
        out = {}
        for target in self.plan.expert_targets():
            scales = self.tensors[target.key]
            for s in target.slices:
                if s.expert is not None:
                    out[s.name] = make_record(target, s, scales)
                    continue
                for e in range(target.shape[0]):
                    for role, rows in _roles_of_fused(target, s):
                        view = DiskSlice(f"{s.name}[{e}].{role}", e, rows, role)
                        out[view.name] = make_record(target, view, scales)
        return out

    def records(self) -> dict[str, Record]:
        """One record per on-disk tensor name, in plan order."""
        out = {}
        for target in self.plan.targets:
            scales = self.tensors[target.key]
            for s in target.slices:
                out[s.name] = make_record(target, s, scales)
        return out
