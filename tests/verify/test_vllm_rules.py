"""vLLM 0.26.0's exclude / ignore matching, restated in moequant.verify.vllm_match, on hand-made cases."""

from __future__ import annotations

import pytest

from moequant.verify.vllm_kv import vllm_kv_name
from moequant.verify.vllm_match import CtRules, MatchError, ModelOptRules, expand_star

PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
EXPERTS = "model.layers.1.mlp.experts"


def test_star_expansion_keeps_dot_star():
    assert expand_star(["a.b*", "a.c.*", "*", "lm_head"]) == ["a.b", "a.b.*", "a.c.*", "*", "lm_head"]


@pytest.mark.parametrize("entries, prefix, rule", [
    (["model.layers.0.self_attn.qkv_proj"], "model.layers.0.self_attn.qkv_proj", "exact/fused"),
    ([f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")],
     "model.layers.0.self_attn.qkv_proj", "exact/fused"),
    ([f"{EXPERTS}.3.down_proj"], EXPERTS, "experts substring"),   # one expert excludes the FusedMoE layer
    (["model.layers.1.mlp"], EXPERTS, "substring"),
    (["model.layers.1"], "model.layers.10.mlp.experts", "substring"),  # '.1' is also a prefix of '.10'
    (["*.mlp.experts"], EXPERTS, "fnmatch"),
    (["*self_attn*"], "model.layers.7.self_attn.o_proj", "fnmatch"),
])
def test_modelopt_excludes(entries, prefix, rule):
    assert rule in ModelOptRules(entries, PACKED).excluded_by(prefix)


@pytest.mark.parametrize("entries, prefix", [
    (["*.mlp.experts.*"], EXPERTS),                    # fnmatch needs the trailing '.<something>'
    (["lm_head.*"], "lm_head"),
    (["model.layers.0.mlp.gate.weight"], "model.layers.0.mlp.gate"),   # a tensor name, not a module
    (["model.layers.10.mlp.experts"], EXPERTS),
    ([], EXPERTS),
])
def test_modelopt_does_not_exclude(entries, prefix):
    assert ModelOptRules(entries, PACKED).excluded_by(prefix) is None


def test_modelopt_partial_fused_shards_raise():
    with pytest.raises(MatchError, match="some but not all shards"):
        ModelOptRules(["model.layers.0.self_attn.k_proj"], PACKED).excluded_by("model.layers.0.self_attn.qkv_proj")


def test_ct_ignore_is_exact_or_anchored_regex():
    rules = CtRules(["lm_head", r"re:.*mlp\.gate$", "model.layers.0.mlp"], ["Linear"], PACKED)
    assert rules.target("model.layers.3.mlp.gate", "ReplicatedLinear") is None
    assert rules.target("model.layers.0.mlp.down_proj", "RowParallelLinear") == "Linear"  # no substring rule
    assert rules.target("lm_head", "ParallelLMHead") is None
    assert CtRules([], ["Linear"], PACKED).target("lm_head", "ParallelLMHead") is None  # class has no 'linear'


def test_ct_experts_probe_gate_proj_names_only():
    """vLLM decides a FusedMoE by '<prefix>.0.gate_proj/up_proj/down_proj', even for Mixtral's w1/w2/w3."""
    prefix = "model.layers.0.block_sparse_moe.experts"
    by_disk_name = CtRules([f"{prefix}.0.{p}" for p in ("w1", "w2", "w3")], ["Linear"], {})
    assert by_disk_name.experts_target(prefix) == "RoutedExperts"
    by_probe = CtRules([f"{prefix}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")], ["Linear"], {})
    assert by_probe.experts_target(prefix) is None
    with pytest.raises(MatchError, match="same quantization scheme"):
        CtRules([f"{prefix}.0.down_proj"], ["Linear"], {}).experts_target(prefix)


@pytest.mark.parametrize("disk, vllm", [
    ("model.layers.0.self_attn.k_proj.k_scale", "model.layers.0.self_attn.attn.k_scale"),   # ModelOpt
    ("model.layers.0.self_attn.v_scale", "model.layers.0.self_attn.attn.v_scale"),          # compressed-tensors
    ("model.layers.0.self_attn.kv_scale", "model.layers.0.self_attn.attn.k_scale"),         # deprecated fused
    ("model.layers.0.self_attn.attn.k_scale", "model.layers.0.self_attn.attn.k_scale"),     # already vLLM's
])
def test_kv_scale_renaming(disk, vllm):
    assert vllm_kv_name(disk) == vllm
