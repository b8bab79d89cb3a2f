"""Structural discovery: every expert of every layer, on-disk names, groups from dataflow, exclusions."""

import pytest
import torch
from torch import nn

from moequant import discover
from moequant.models.experts import UnsupportedModelError, find_experts
from moequant.models.groups import find_input_groups
from tiny_models import DENSE_FAMILIES, FAMILIES, MOE_FAMILIES

PER_EXPERT_NAMES = {
    "qwen3_moe": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
    "qwen2_moe": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
    "olmoe": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
    "deepseek_v3": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
    "mixtral": ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight",
                "block_sparse_moe.experts.{e}.w2.weight"),
}


@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f != "gpt_oss"])
def test_every_expert_has_on_disk_gate_up_down(family, tiny_model_cache):
    model = tiny_model_cache(family)
    plan = discover(model)
    experts = plan.expert_targets()
    assert experts, "no experts found"
    for t in experts:
        e = t.shape[0]
        roles = [s.role for s in t.slices]
        if t.param_name == "gate_up_proj":
            assert sorted(roles) == sorted(["gate"] * e + ["up"] * e)
            assert sorted(s.expert for s in t.slices) == sorted(list(range(e)) * 2)
        else:
            assert roles == ["down"] * e
        gate_name, up_name, down_name = PER_EXPERT_NAMES[family]
        prefix = f"model.layers.{t.layer}."
        names = {s.name for s in t.slices}
        for i in range(e):
            want = (gate_name, up_name) if t.param_name == "gate_up_proj" else (down_name,)
            assert {prefix + w.format(e=i) for w in want} <= names


def test_gpt_oss_interleaved_transposed_layout(tiny_model_cache):
    plan = discover(tiny_model_cache("gpt_oss"))
    gu = [t for t in plan.expert_targets() if t.param_name == "gate_up_proj"]
    assert gu and all(t.transposed and t.interleaved for t in gu)
    # canonical [E, 2I, H] with H = hidden 64; on disk kept fused
    assert all(t.shape[2] == 64 and len(t.slices) == 1 and t.slices[0].expert is None for t in gu)


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_lm_head_not_quantized(family, tiny_model_cache):
    plan = discover(tiny_model_cache(family))
    keys = {t.module_path for t in plan.targets}
    assert "lm_head" in plan.excluded and "lm_head" not in keys
    if family in MOE_FAMILIES:
        routers = [p for p in plan.excluded if p.endswith((".gate", ".router", "shared_expert_gate"))]
        assert routers and not (set(routers) & keys)
    assert all("embed" not in k and "norm" not in k for k in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_grouped_from_dataflow(family, tiny_model_cache):
    plan = discover(tiny_model_cache(family))
    by_layer = {}
    for g in plan.groups:
        by_layer.setdefault(g[0].split(".self_attn")[0], []).append(g)
    if family == "deepseek_v3":
        want = {("q_a_proj", "kv_a_proj_with_mqa")}
    else:
        want = {("q_proj", "k_proj", "v_proj")}
    if family in DENSE_FAMILIES:
        want.add(("gate_proj", "up_proj"))
    for g in plan.groups:
        assert len({plan.target(k).group for k in g}) == 1
    found = {tuple(k.split(".")[-2] for k in g) for g in plan.groups}
    assert want <= found


def test_mla_and_shared_experts_groups(tiny_model_cache):
    plan = discover(tiny_model_cache("deepseek_v3"))
    found = {tuple(k.rsplit(".", 3)[-3:-1][-1] for k in g) for g in plan.groups}
    assert ("gate_proj", "up_proj") in found  # dense first layer and shared experts
    shared = [g for g in plan.groups if "shared_experts" in g[0]]
    assert shared and all(len(g) == 2 for g in shared)


class _OddNames(nn.Module):
    """Linears named without any q/k/v convention: grouping must come from the dataflow alone."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Linear(16, 16)
        self.beta = nn.Linear(16, 16)
        self.q_proj = nn.Linear(16, 16)  # conventional name, but reads a different tensor
        self.k_proj = nn.Linear(16, 16)

    def forward(self, x):
        a, b = self.alpha(x), self.beta(x)
        return self.q_proj(a) + self.k_proj(b)


def test_groups_come_from_inputs_not_names():
    model = _OddNames()
    groups = find_input_groups(model, ["alpha", "beta", "q_proj", "k_proj"], {"x": torch.randn(2, 16)})
    assert groups == [("alpha", "beta")]


class _BadExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.weights_a = nn.Parameter(torch.zeros(4, 48, 64))


def test_unknown_expert_layout_is_an_error_naming_the_class():
    wrapper = nn.Module()
    wrapper.block = _BadExperts()
    with pytest.raises(UnsupportedModelError, match=r"block \(_BadExperts\)"):
        find_experts(wrapper, hidden=64)


def test_discover_does_not_modify_the_model(tiny_model_cache):
    model = tiny_model_cache("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    discover(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
