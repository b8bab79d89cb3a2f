"""The "gptq" weight method through quantize(): weighted_mse's scales, GPTQ's codes, every expert (dead ones
fall back and are listed), X^T X kept per layer only, export + verify."""

import pytest
import torch
from biased_models import biased, calib_ids, prepared, recipe

from moequant import calibrate_weights, export, quantize, verify
from moequant.calibrate import ActivationStats, observing
from moequant.channel_stats import ChannelStats, hessians
from moequant.formats import gptq
from moequant.formats.fp4 import unpack_fp4
from moequant.formats.nvfp4 import dequantize_nvfp4
from moequant.weights import canonical_weight
from moequant.recipe import RecipeError, load_recipe

SAMPLES = 8   # 8 x 32 tokens: the busy experts get more tokens than their input channels, the biased ones few
MIN_TOKENS = 4   # so that layer 1's expert with 7 routed tokens is covered, but its H is singular (7 < K)


def _recipe(name):
    if name == "natural-order":
        return recipe("nvfp4-gptq", samples=SAMPLES, calibration={"min_tokens": MIN_TOKENS},
                      weights={"act_order": False})
    return recipe(name, samples=SAMPLES, calibration={"min_tokens": MIN_TOKENS})


@pytest.fixture(scope="module")
def model():
    return biased("qwen3_moe")


@pytest.fixture(scope="module")
def runs(model):
    ids = calib_ids(SAMPLES)
    return {name: quantize(model, _recipe(name), ids, batch_size=2)
            for name in ("nvfp4-best", "nvfp4-gptq", "natural-order")}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def test_recipe():
    r = load_recipe("nvfp4-gptq")
    assert r.weights.method == "gptq" and r.weights.act_order and r.needs_channel_stats and r.needs_hessians and r.input_scheme == "nvfp4"
    with pytest.raises(RecipeError, match="gptq applies to NVFP4"):
        load_recipe("fp8", weights={"method": "gptq"})
    with pytest.raises(RecipeError, match="act_order .* goes with method: gptq, not weighted_mse"):
        load_recipe("nvfp4-best", weights={"act_order": True})


def test_act_order_changes_only_codes_and_fallbacks_stay(runs):
    """weights.act_order reaches the layer step: nvfp4-gptq (act order) and the natural column order have the same
    scales and fallbacks, other codes."""
    ordered, plain = runs["nvfp4-gptq"].state.tensors, runs["natural-order"].state.tensors
    assert any(not torch.equal(ordered[k].codes, s.codes) for k, s in plain.items())
    for key, s in plain.items():
        o = ordered[key]
        assert torch.equal(_bits(o.block_scale), _bits(s.block_scale)) and torch.equal(o.global_scale, s.global_scale)
        assert torch.equal(o.gptq_status, s.gptq_status), key
        rtn = (o.gptq_status != gptq.GPTQ).reshape(-1)
        assert torch.equal(o.codes.reshape(rtn.numel(), -1)[rtn], s.codes.reshape(rtn.numel(), -1)[rtn]), key


def test_scales_are_weighted_mse_s_and_only_codes_differ(runs):
    best, ours = runs["nvfp4-best"].state.tensors, runs["nvfp4-gptq"].state.tensors
    changed = 0
    for key, s in ours.items():
        b = best[key]
        assert s.method == "gptq" and b.gptq_status is None
        assert torch.equal(_bits(s.block_scale), _bits(b.block_scale)), key
        assert torch.equal(s.global_scale, b.global_scale) and torch.equal(s.input_scale, b.input_scale), key
        rtn = (s.gptq_status != gptq.GPTQ).reshape(-1)
        codes, other = s.codes.reshape(rtn.numel(), -1), b.codes.reshape(rtn.numel(), -1)
        assert torch.equal(codes[rtn], other[rtn]), key   # fallbacks ship weighted_mse's codes exactly
        changed += int((codes[~rtn] != other[~rtn]).any())
    assert changed == len(ours)   # every target has an expert / a linear GPTQ rounded differently


def test_every_expert_gets_finite_codes_and_fallbacks_are_listed(runs):
    result = runs["nvfp4-gptq"]
    plan, tensors = result.state.plan, result.state.tensors
    for t in plan.targets:
        s = tensors[t.key]
        deq = dequantize_nvfp4(unpack_fp4(s.codes), s.global_scale, s.block_scale)
        assert deq.shape == t.shape and bool(torch.isfinite(deq).all()), t.key
        assert bool((s.block_scale.to(torch.float32) > 0).all()) and bool(torch.isfinite(s.global_scale).all())
        assert s.gptq_status.shape == (t.shape[0],) if t.kind == "experts" else s.gptq_status.shape == ()
    listed = result.report.gptq_fallback()
    for c in result.report.coverage:
        dead = [e for e, n in enumerate(c.tokens) if n < MIN_TOKENS]
        assert dead, "the biased model has dead experts"
        for proj in ("gate_up_proj", "down_proj"):
            t = plan.target(f"{c.path}.{proj}")
            expected = [gptq.FEW_TOKENS if n < MIN_TOKENS else gptq.RANK_DEFICIENT if n < t.shape[-1] else gptq.GPTQ
                        for n in c.tokens]
            assert tensors[t.key].gptq_status.tolist() == expected, t.key
            assert [e for e, _ in listed[t.key]] == [e for e, r in enumerate(expected) if r], t.key
    assert gptq.RANK_DEFICIENT in [r for s in tensors.values() for r in s.gptq_status.reshape(-1).tolist()]
    text = result.report.to_text()
    assert "gptq fallback to round-to-nearest" in text and "fewer routed tokens than calibration.min_tokens" in text
    assert "fewer calibration tokens than input channels" in text


def test_gptq_lowers_the_output_error_on_the_calibration_inputs(model, runs):
    """Against weighted_mse's codes, under the X^T X of a forward over the same tokens, summed over the experts
    (and linears) that GPTQ rounded: lower, by a margin."""
    _, plan, containers = prepared("qwen3_moe")
    stats = ActivationStats(channels=ChannelStats(hessians=True))
    with torch.no_grad(), observing(model, "", plan, containers, stats, policy="coverage", activations=True):
        for batch in calib_ids(SAMPLES).split(2):
            model(input_ids=batch, use_cache=False)
    h = hessians(plan, stats.channels, containers, [t.key for t in plan.targets], MIN_TOKENS)
    totals = {"nvfp4-best": 0.0, "nvfp4-gptq": 0.0, "natural-order": 0.0}
    for t in plan.targets:
        w, used = canonical_weight(model, t).detach(), runs["nvfp4-gptq"].state.tensors[t.key].gptq_status == gptq.GPTQ
        for name in totals:
            s = runs[name].state.tensors[t.key]
            err = gptq.output_error(w, dequantize_nvfp4(unpack_fp4(s.codes), s.global_scale, s.block_scale), h[t.key].h)
            totals[name] += float(err[used].sum()) if t.kind == "experts" else float(err) * bool(used)
    assert totals["nvfp4-gptq"] < 0.9 * totals["nvfp4-best"], totals
    assert totals["natural-order"] < 0.9 * totals["nvfp4-best"], totals


def test_sequential_equals_all_at_once_and_hessians_live_one_layer(model, runs, monkeypatch):
    seen = []
    drop = ChannelStats.drop_hessians

    def checked(self, prefix):   # the step's statistics hold one decoder layer's sums, dropped before its search
        keys = [k for kind in ("linear_h", "gate_up_h", "down_h") for k in getattr(self, kind)]
        seen.append(sorted({k.split(".")[2] for k in keys if k.startswith(prefix)}))
        assert keys and all(k.startswith(prefix) for k in keys), (prefix, keys)
        drop(self, prefix)
        assert not any(getattr(self, kind) for kind in ("linear_h", "gate_up_h", "down_h"))

    monkeypatch.setattr(ChannelStats, "drop_hessians", checked)
    again = quantize(model, _recipe("nvfp4-gptq"), calib_ids(SAMPLES), batch_size=2)
    assert seen == [["0"], ["1"]]
    at_once = quantize(model, _recipe("nvfp4-gptq"), calib_ids(SAMPLES), batch_size=2, sequential=False)
    for key, s in runs["nvfp4-gptq"].state.tensors.items():
        for other in (again, at_once):
            assert torch.equal(s.codes, other.state.tensors[key].codes), key
            assert torch.equal(s.gptq_status, other.state.tensors[key].gptq_status), key


def test_calibrate_weights_needs_the_hessians(model):
    _, plan, _ = prepared("qwen3_moe")
    weights = {t.key: torch.ones(t.shape[0], t.shape[-1]) if t.kind == "experts" else torch.ones(t.shape[-1])
               for t in plan.targets}
    with pytest.raises(ValueError, match="gptq needs its inputs' X\\^T X"):
        calibrate_weights(model, plan, method="gptq", channel_weights=weights)


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_export_and_verify_round_trip(model, runs, tmp_path, fmt):
    result = runs["nvfp4-gptq"]
    out = export(model, result.state, tmp_path / "ckpt", format=fmt, recipe=result.recipe)
    checked = verify(out)
    assert checked.ok, checked


def test_x_t_x_memory_is_checked_before_the_forward(model, monkeypatch):
    """The X^T X sums of a layer (float64, 8 E K^2 per experts projection) are known from the shapes: a device
    with less free memory is refused before any forward, naming the layer, the largest sum and the way out."""
    from moequant.layers import job as job_module

    free = []
    monkeypatch.setattr(job_module, "_free_bytes", lambda device: free.append(device) or 1 << 10)
    ids = calib_ids(SAMPLES)
    forwards = []   # calibration forwards reach layer 0 with batches of 2 calibration sequences (discovery's
    hook = model.model.layers[0].register_forward_pre_hook(   # probe is one short sequence)
        lambda _m, args: forwards.append(tuple(args[0].shape[:2])) if args[0].shape[:2] == (2, ids.shape[1]) else None)
    try:
        with pytest.raises(job_module.CalibrationError, match=r"X\^T X sums of model\.layers\.\d+ need .* GiB free: "
                                                              r"use nvfp4-best"):
            quantize(model, _recipe("nvfp4-gptq"), ids, batch_size=2)
        with pytest.raises(job_module.CalibrationError, match="all decoder layers"):
            quantize(model, _recipe("nvfp4-gptq"), ids, batch_size=2, sequential=False)
    finally:
        hook.remove()
    assert not forwards and free == [torch.device("cpu")] * 2
    quantize(model, _recipe("nvfp4-best"), ids, batch_size=2)   # no X^T X: not checked
    assert len(free) == 2
    job, _ = job_module.start_job(model, _recipe("nvfp4-gptq"), None, "torch", True)
    with pytest.raises(job_module.CalibrationError, match="x 18 copies on this host under torchrun"):
        job_module.check_hessian_memory(job, 4, copies=18)    # torchrun: the caller counts the copies
