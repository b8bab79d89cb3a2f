"""The accuracy options wired through quantize(): weighted_mse (channel statistics from the calibration
forward, per expert with the layer fallback), global_search (group-shared), four_over_six, nvfp4-best."""

import pytest
import torch
from biased_models import biased, calib_ids, recipe

from moequant import quantize
from moequant.channel_stats import FLOOR
from moequant.recipe import RecipeError, load_recipe


@pytest.fixture(scope="module")
def model():
    return biased("qwen3_moe")


def _run(model, name="nvfp4", policy="coverage", sequential=True, **weights):
    extra = {"weights": weights} if weights else {}
    return quantize(model, recipe(name, policy, **extra), calib_ids(), batch_size=2, sequential=sequential)


def _rel_error(result) -> float:
    s = result.state.tensors.values()
    return sum(float(x.sq_error.sum()) for x in s) / sum(float(x.sq_norm.sum()) for x in s)


def test_recipes_and_validation():
    best = load_recipe("nvfp4-best")
    assert best.weights.method == "weighted_mse" and best.needs_channel_stats
    assert load_recipe("nvfp4").weights == load_recipe("nvfp4", weights={"global_search": False}).weights
    with pytest.raises(RecipeError, match="four_over_six"):
        load_recipe("nvfp4-mse", weights={"four_over_six": True})
    with pytest.raises(RecipeError, match="true or false"):
        load_recipe("nvfp4", weights={"global_search": "yes"})
    with pytest.raises(RecipeError):
        load_recipe("fp8", weights={"global_search": True})


def test_weighted_sequential_equals_all_at_once_and_every_expert_gets_weights(model):
    a = _run(model, "nvfp4-best", global_search=True)
    b = _run(model, "nvfp4-best", sequential=False, global_search=True)
    for key, s in a.state.tensors.items():
        assert torch.equal(s.block_scale.view(torch.uint8), b.state.tensors[key].block_scale.view(torch.uint8)), key
        assert torch.equal(s.global_scale, b.state.tensors[key].global_scale), key
        assert s.method == "weighted_mse+global"
        assert bool(torch.isfinite(s.input_scale).all())
    assert all(u for c in a.report.coverage for u in [c.under_covered]), "the biased model has dead experts"


def test_group_members_share_the_searched_global_scale(model):
    result = _run(model, "nvfp4-mse", global_search=True)
    plan = result.state.plan
    for group in plan.groups:
        members = [t.key for t in plan.targets if t.group == group]
        scales = [result.state.tensors[k].global_scale for k in members]
        assert all(torch.equal(scales[0], s) for s in scales), group


def test_options_lower_the_weight_error(model):
    mse = _rel_error(_run(model, "nvfp4-mse"))
    assert _rel_error(_run(model, "nvfp4-mse", global_search=True)) <= mse
    plain_max = _rel_error(_run(model, "nvfp4"))
    assert _rel_error(_run(model, "nvfp4", four_over_six=True)) < plain_max


def test_weight_only_weighted_observes_but_has_no_input_scales(model):
    result = quantize(model, recipe("nvfp4-best", activations="none"), calib_ids(), batch_size=2)
    assert all(s.input_scale is None for s in result.state.tensors.values())
    assert all(s.method == "weighted_mse" for s in result.state.tensors.values())


def test_channel_weights_floor_and_fallback(model):
    from moequant.channel_stats import ChannelStats, channel_weights
    from moequant.layers.job import start_job

    job, _ = start_job(model, recipe("nvfp4-best"), None, "torch", True)
    assert job.recipe.needs_channel_stats and FLOOR > 0
    with pytest.raises(KeyError):
        channel_weights(job.plan, ChannelStats(), job.containers, [job.plan.targets[0].key], 16)


def test_searched_global_scales_export_and_verify(model, tmp_path):
    from moequant import export, verify

    rec = recipe("nvfp4-best", weights={"global_search": True})
    result = quantize(model, rec, calib_ids(), batch_size=2)
    out = export(model, result.state, tmp_path / "ckpt", format="modelopt", recipe=rec)
    checked = verify(out)
    assert checked.ok


def test_in_memory_weighted_search_ignores_a_process_group(model, monkeypatch):
    """quantize() never folds ranks' statistics (only the streamed path does), so a torch.distributed group
    that happens to be up (e.g. a user's torchrun script) must not change what it observes."""
    alone = _run(model, "nvfp4-best")
    import moequant.layers.ranks as distributed

    monkeypatch.setattr(distributed.Ranks, "current", classmethod(lambda cls: object()))
    inside = _run(model, "nvfp4-best")
    for key, s in alone.state.tensors.items():
        assert torch.equal(s.block_scale.view(torch.uint8), inside.state.tensors[key].block_scale.view(torch.uint8)), key
