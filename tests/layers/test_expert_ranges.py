"""Expert ranges (how torchrun ranks split a MoE layer): every range searched on its own and concatenated gives
the whole target's scales and codes, bit for bit, and errors inside a range name the right on-disk tensor."""

import pytest
import torch
from tiny_models import build

from moequant import calibrate_weights, discover
from moequant.formats.nvfp4 import WeightError
from moequant.layers.step import merge_pieces


@pytest.fixture(scope="module")
def model():
    return build("qwen3_moe", seed=3)


def _by_ranges(model, plan, bounds, method):
    pieces = []
    for t in plan.expert_targets():
        for lo, hi in zip(bounds, bounds[1:]):
            part = t.expert_range(lo, hi)
            state = calibrate_weights(model, plan.with_targets((part,), plan.excluded), method=method, backend="torch")
            pieces.append((lo, state.tensors[t.key]))
    return merge_pieces(pieces)


@pytest.mark.parametrize("method", ["mse", "max"])
def test_ranges_concatenated_equal_the_whole_target(model, method):
    plan = discover(model)
    experts = plan.with_targets(plan.expert_targets(), plan.excluded)
    whole = calibrate_weights(model, experts, method=method, backend="torch").tensors
    n = plan.expert_targets()[0].shape[0]
    for bounds in ([0, 1, n], [0, n // 2, n], list(range(n + 1))):
        merged = _by_ranges(model, plan, bounds, method)
        assert sorted(merged) == sorted(whole)
        for key, s in whole.items():
            m = merged[key]
            for name in ("amax", "global_scale", "sq_error", "sq_error_max", "sq_norm"):
                assert torch.equal(getattr(s, name), getattr(m, name)), (bounds, key, name)
            assert torch.equal(s.block_scale.view(torch.uint8), m.block_scale.view(torch.uint8)), (bounds, key)
            assert torch.equal(s.codes, m.codes), (bounds, key)


def test_a_bad_value_inside_a_range_names_its_own_expert(model):
    plan = discover(model)
    t = plan.expert_targets()[0]
    w = model.get_submodule(t.module_path).get_parameter(t.param_name)
    n = t.shape[0]
    with torch.no_grad():
        saved = w[n - 1].clone()
        w[n - 1, 0, 0] = float("nan")
    try:
        part = t.expert_range(n // 2, n)
        with pytest.raises(WeightError, match=rf"experts\.{n - 1}\."):
            calibrate_weights(model, plan.with_targets((part,), plan.excluded), backend="torch")
    finally:
        with torch.no_grad():
            w[n - 1] = saved


def test_expert_range_refuses_what_is_not_a_range(model):
    plan = discover(model)
    t = plan.expert_targets()[0]
    linear = next(x for x in plan.targets if x.kind == "linear")
    for bad in (lambda: t.expert_range(2, 2), lambda: t.expert_range(0, t.shape[0] + 1),
                lambda: t.expert_range(1, 2).expert_range(0, 1), lambda: linear.expert_range(0, 1)):
        with pytest.raises(ValueError, match="no expert range"):
            bad()
