"""The read plans of decoder layers, worked out once per layer structure, equal the plans worked out per layer."""

import pytest
import torch
from model_dirs import save_model_dir

from moequant.discover import decoder_layers
from moequant.layers.meta_model import LayerPlans, meta_model, read_plan
from moequant.safetensors_source import SafetensorsSource


def _same(a: dict, b: dict) -> bool:
    if list(a) != list(b):
        return False
    for key in a:
        (meta_a, parts_a), (meta_b, parts_b) = a[key], b[key]
        if meta_a.shape != meta_b.shape or [n for n, _ in parts_a] != [n for n, _ in parts_b]:
            return False
        if not all(torch.equal(ra, rb) for (_, ra), (_, rb) in zip(parts_a, parts_b)):
            return False
    return True


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss", "llama"])
def test_cached_plans_equal_fresh_ones(tmp_path, family, monkeypatch):
    from moequant.layers import meta_model as mm

    src = save_model_dir(tmp_path, family)   # deepseek_v3: a dense first layer, then MoE layers
    shards = SafetensorsSource(src)
    model = meta_model(src, shards)
    layers_path, layers = decoder_layers(model)
    plans, worked_out, fresh = LayerPlans(model, layers_path, shards), [], mm.disk_sources
    monkeypatch.setattr(mm, "disk_sources", lambda *a: worked_out.append(1) or fresh(*a))
    cached = [plans.plan(i) for i in range(len(layers))]
    assert len(worked_out) == (2 if family == "deepseek_v3" else 1)   # once per layer structure
    for i in range(len(layers)):
        assert _same(cached[i], read_plan(model, f"{layers_path}.{i}.")), f"layer {i}"
