"""model -> Plan: every quantizable linear and fused-experts container, groups, on-disk names.

Structural rules (DESIGN principle 4):
  * fused experts: modules owning 3-D parameters (``models/experts.py``), two targets each (gate_up, down);
  * linears: every ``nn.Linear`` except the output embedding (lm_head) and the MoE block's own gates;
  * gates/routers: modules owning a 2-D ``weight`` that are direct children of a block holding an experts
    container (``gate``, ``shared_expert_gate``, DeepSeek's router), plus any non-Linear module with a 2-D
    weight that is not an embedding: recorded in ``Plan.excluded`` by full name, never quantized by default;
  * groups: linears reading the identical input tensor in a probe forward (``models/groups.py``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moequant.models.disk_names import disk_slices
from moequant.models.experts import ExpertsContainer, find_experts
from moequant.models.groups import find_input_groups
from moequant.plan import DiskSlice, Plan, Target


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: the longest ``nn.ModuleList`` in the model (path, module)."""
    best = ("", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best[1] is None or len(module) > len(best[1])):
            best = (path, module)
    if best[1] is None:
        raise ValueError(f"{type(model).__name__}: found no decoder-layer list (nn.ModuleList)")
    return best


def layer_of(path: str, layers_path: str) -> int | None:
    prefix = layers_path + "."
    if not path.startswith(prefix):
        return None
    return int(path[len(prefix):].split(".", 1)[0])


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _classify_linear_like(model, experts: list[ExpertsContainer]) -> tuple[list[str], list[str]]:
    """(quantizable nn.Linear paths, excluded linear-like paths), both in model order."""
    moe_blocks = {_parent(c.path) for c in experts}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantize, excluded = [], []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or isinstance(module, nn.Embedding):
            continue
        if module is out_emb or _parent(path) in moe_blocks or not isinstance(module, nn.Linear):
            excluded.append(path)
        else:
            quantize.append(path)
    return quantize, excluded


def _probe_inputs(model: nn.Module, tokens: int = 8) -> dict:
    device = next(model.parameters()).device
    vocab = int(getattr(text_config(model), "vocab_size", 32))
    ids = (torch.arange(tokens, device=device) * 7919 % max(vocab, 1)).reshape(1, tokens)
    return {"input_ids": ids, "use_cache": False}


def _expert_targets(c: ExpertsContainer, layers_path: str, names: dict) -> list[Target]:
    gate_rows, up_rows = c.gate_up_rows()
    targets = []
    for param, n in ((c.layout.gate_up, 2 * c.intermediate), (c.layout.down, c.hidden)):
        key = f"{c.path}.{param}"
        slices = []
        for name, expert, rows in names[key]:
            role = "down" if param == c.layout.down else {gate_rows: "gate", up_rows: "up"}.get(rows, "gate_up")
            slices.append(DiskSlice(name, expert, rows, role))
        k = c.hidden if param == c.layout.gate_up else c.intermediate
        interleaved = c.layout.interleaved and param == c.layout.gate_up
        targets.append(Target(key, c.path, param, "experts", (c.num_experts, n, k), c.layout.transposed,
                              interleaved, layer_of(c.path, layers_path), slices=tuple(slices)))
    return targets


def discover(model: nn.Module, probe: dict | None = None) -> Plan:
    """Build the ``Plan`` of ``model`` (a transformers 5.x causal LM). Does not modify the model."""
    hidden = int(text_config(model).hidden_size)
    experts = find_experts(model, hidden)
    linear_paths, excluded = _classify_linear_like(model, experts)
    layers_path, layers = decoder_layers(model)
    params = {f"{c.path}.{p}": (tuple(getattr(c.module, p).shape), c.layout.transposed, c.num_experts)
              for c in experts for p in (c.layout.gate_up, c.layout.down)}
    modules = dict(model.named_modules())
    params.update({f"{p}.weight": (tuple(modules[p].weight.shape), False, None) for p in linear_paths})
    names = disk_slices(model, params)
    groups = find_input_groups(model, linear_paths, probe or _probe_inputs(model)) if linear_paths else []
    group_of = {path: grp[0] + ".weight" for grp in groups for path in grp}
    targets = []
    for c in experts:
        targets.extend(_expert_targets(c, layers_path, names))
    for path in linear_paths:
        key = f"{path}.weight"
        slices = tuple(DiskSlice(n, None, rows) for n, _, rows in names[key])
        targets.append(Target(key, path, "weight", "linear", tuple(modules[path].weight.shape),
                              layer=layer_of(path, layers_path), group=group_of.get(path), slices=slices))
    targets.sort(key=lambda t: (t.layer if t.layer is not None else len(layers), t.key))
    has_attention = any("attention" in type(m).__name__.lower() for m in modules.values())
    if has_attention and not groups:
        warnings.warn(
            "moequant found attention layers but no linears sharing an input (q/k/v): engines that fuse "
            "them will see different global scales; check the model's forward", stacklevel=2)
    return Plan(tuple(targets), tuple(excluded),
                tuple(tuple(f"{p}.weight" for p in g) for g in groups), num_layers=len(layers))
