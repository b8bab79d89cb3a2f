"""Helpers shared by the export and verify tests: calibrated tiny models, fake activation scales, shard surgery.

Activation calibration is another module's job; these tests fill input scales and KV scales with deterministic
values from a fake amax (members of a weight group, and an expert's gate/up, get identical values), which is
all the exporter and verifier need.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moequant import calibrate_weights
from moequant.scales import KVScales, QuantState
from tiny_models import build

EXPORTABLE_MOE = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe")
EXPORTABLE = EXPORTABLE_MOE + ("llama", "qwen3")
SMALL_SHARD = 40_000  # bytes: several shards even for the tiny models


def fake_amax(key: str) -> float:
    return 0.5 + (zlib.crc32(key.encode()) % 1000) / 1000.0


def fill_fake_activations(model, state: QuantState, kv: bool = True) -> QuantState:
    """Input scales (act_amax / 2688, or / 448 for fp8) shared by group, per expert for experts; KV scales."""
    divisor = 2688.0 if next(iter(state.tensors.values())).scheme == "nvfp4" else 448.0
    for target in state.plan.targets:
        amax = fake_amax(target.group or target.key)
        if target.kind == "experts":
            per_expert = amax * (1.0 + 0.01 * torch.arange(target.num_experts, dtype=torch.float32))
            state.tensors[target.key].input_scale = per_expert / divisor
        else:
            state.tensors[target.key].input_scale = torch.tensor(amax / divisor, dtype=torch.float32)
    if kv:
        paths = [p for p, _ in model.named_modules() if p.endswith("self_attn")]
        state.kv_cache = {p: KVScales(p, torch.tensor(0.01 + 0.001 * i), torch.tensor(0.02 + 0.001 * i))
                          for i, p in enumerate(paths)}
        state.kv_scheme = "fp8"
    return state


def calibrated(family: str, method: str = "max", scheme: str | None = None, activations: bool = True,
               dtype: torch.dtype = torch.float32):
    """(model, state) for a tiny model of ``family``."""
    model = build(family, dtype=dtype)
    state = calibrate_weights(model, scheme=scheme, method=method, backend="torch")
    if activations:
        fill_fake_activations(model, state)
    return model, state


def read_all(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(str(path / file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def edit_checkpoint(path: Path, edit) -> None:
    """Apply ``edit(tensors: dict) -> None`` (in place) to every shard; removed names leave the index too."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / file), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        before = set(tensors)
        edit(tensors)
        for name in before - set(tensors):
            del index["weight_map"][name]
        for name in set(tensors) - before:
            index["weight_map"][name] = file
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def shard_of(path: Path, name: str) -> str:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
