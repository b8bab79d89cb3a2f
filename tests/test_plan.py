"""On-disk names for error messages: the tensor a user can grep for, from a canonical index or an expert."""

import pytest

from moequant import discover
from moequant.plan import disk_name_of, disk_position
from tiny_models import build


@pytest.fixture(scope="module")
def plans():
    return {family: discover(build(family)) for family in ("qwen3_moe", "gpt_oss")}


def test_fused_gate_up_rows_map_to_gate_or_up_of_that_expert(plans):
    t = plans["qwen3_moe"].target("model.layers.1.mlp.experts.gate_up_proj")
    inter = t.shape[1] // 2
    assert disk_position(t, [2, 3, 7]) == ("model.layers.1.mlp.experts.2.gate_proj.weight", [3, 7])
    assert disk_position(t, [2, inter + 5, 9]) == ("model.layers.1.mlp.experts.2.up_proj.weight", [5, 9])
    assert disk_name_of(t, [7, 2 * inter - 1, 0]) == "model.layers.1.mlp.experts.7.up_proj.weight"
    assert disk_name_of(t, 2) == ("model.layers.1.mlp.experts.2.gate_proj.weight, "
                                  "model.layers.1.mlp.experts.2.up_proj.weight")


def test_linear_and_down_proj(plans):
    plan = plans["qwen3_moe"]
    assert disk_name_of(plan.target("model.layers.0.mlp.experts.down_proj"), [4, 10, 1]) == (
        "model.layers.0.mlp.experts.4.down_proj.weight")
    v = plan.target("model.layers.0.self_attn.v_proj.weight")
    assert disk_position(v, [3, 1]) == ("model.layers.0.self_attn.v_proj.weight", [3, 1])


def test_tensor_written_whole_names_the_expert(plans):
    """GPT-OSS keeps fused [E, H, 2I] tensors on disk: the name plus the expert number."""
    t = plans["gpt_oss"].target("model.layers.0.mlp.experts.gate_up_proj")
    assert disk_name_of(t, [5, 0, 0]) == "model.layers.0.mlp.experts.gate_up_proj (expert 5)"
    assert disk_name_of(t, 5) == "model.layers.0.mlp.experts.gate_up_proj (expert 5)"
