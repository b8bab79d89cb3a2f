"""The smoothing factors of a checkpoint, for the verifier: ``moequant_smoothing/factors.safetensors``.

A smoothed checkpoint (recipe key ``smoothing``, ``moequant.smoothing``) holds weights that differ from the source
model's by per-channel factors folded in on purpose (a norm's weight / s, its readers' columns * s; an up
projection's rows / s, the down projection's columns * s). The file lets anyone undo them and compare with the
source (``moequant verify --reference``). It sits in a subdirectory, where no engine's weight loader looks (they
read the top level's ``*.safetensors``).

    tensors      ``f<n>``: float32 [K] (one factor per channel) or [E, K] (per expert), n = site number
    metadata     "format": "moequant-smoothing-1"
                 "sites": JSON list of [tensor key, producer module path, kind ("norm" | "down")]
                 "entries": JSON {on-disk tensor name: [[tensor key, axis, divide, expert, offset], ...]}

An entry says: along dimension ``axis`` of the on-disk tensor (quantized weights: of the decoded [out, in]
weight), element ``r`` was divided (``divide`` true: the producer) or multiplied (a reader) by
``factor[expert][offset + r]`` (``expert`` null: a [K] factor). Undo: multiply where it divided, divide where it
multiplied; the quantized weights then match the source within their quantization error, the unquantized ones
within one rounding of their dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from moequant.export.writer import ExportError, TensorSpec, write_safetensors
from moequant.plan import Plan

SMOOTHING_DIR = "moequant_smoothing"
SMOOTHING_FILE = f"{SMOOTHING_DIR}/factors.safetensors"
FORMAT = "moequant-smoothing-1"


def _disk_name(model: nn.Module, param: str, tensor: torch.Tensor) -> str:
    from moequant.models.disk_names import revert_weight_conversion

    names = list(revert_weight_conversion(model, {param: tensor}))
    if len(names) != 1:
        raise ExportError(f"{param}: saved as {len(names)} tensors; smoothing of it cannot be recorded")
    return names[0]


def _quantized_entries(target, scaled, k: int, key: str) -> list[tuple[str, list]]:
    """Entries of a quantized target's on-disk tensors for one ``Scaled`` whose factor has ``k`` channels
    (canonical axes: rows = N, cols = K)."""
    rows_axis = 2 if target.transposed else 1   # stored dimension of N (fused experts); a linear: 0
    out = []
    for sl in target.slices:
        if target.kind == "experts" and sl.expert is None:
            raise ExportError(f"{sl.name}: experts stored fused on disk; smoothing them cannot be recorded "
                              "(turn smoothing off for this model)")
        expert = sl.expert if scaled.per_expert else None
        along_rows = scaled.axis == (rows_axis if target.kind == "experts" else 0)
        if not along_rows:
            out.append((sl.name, [key, 1, scaled.divide, expert, 0]))
            continue
        start, stop, step = sl.rows
        if stop <= scaled.start or start >= scaled.start + k:
            continue   # e.g. the gate rows of a gate_up whose up rows take the factor
        if step != 1 or start < scaled.start or stop > scaled.start + k:
            raise ExportError(f"{sl.name}: rows {sl.rows} cut across a smoothed row range; exporter bug")
        out.append((sl.name, [key, 0, scaled.divide, expert, start - scaled.start]))
    return out


def smoothing_file(model: nn.Module, plan: Plan, records: list) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the factors file for ``records`` (``moequant.smoothing.Smoothing``, every layer)."""
    targets = {t.key: t for t in plan.targets}
    tensors, sites, entries = {}, [], {}
    for record in records:
        for site in record.sites:
            key = f"f{len(sites)}"
            tensors[key] = site.factor.float().contiguous()
            sites.append([key, site.producer, site.kind])
            for scaled in site.scaled:
                if scaled.param in targets:
                    found = _quantized_entries(targets[scaled.param], scaled, site.factor.shape[-1], key)
                else:
                    value = record.changed[scaled.param]
                    found = [(_disk_name(model, scaled.param, value),
                              [key, scaled.axis, scaled.divide, None, -scaled.start])]
                for name, entry in found:
                    entries.setdefault(name, []).append(entry)
    metadata = {"format": FORMAT, "sites": json.dumps(sites), "entries": json.dumps(entries, sort_keys=True)}
    return tensors, metadata


def write_smoothing_file(model: nn.Module, plan: Plan, records: list, out_dir: Path) -> None:
    if not any(r.sites for r in records):
        return
    tensors, metadata = smoothing_file(model, plan, records)
    (out_dir / SMOOTHING_DIR).mkdir()
    specs = [TensorSpec(k, tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in tensors.items()]
    write_safetensors(out_dir / SMOOTHING_FILE, specs, metadata)
