"""The experts' input-scale layer floor (calibration.input_floor: layer, opt-in): every expert's gate_up input
amax is at least the layer's hidden-state amax, its down input amax at least the layer's largest expert down
amax; the report lists each raised expert; "none" gives the policies' own values."""

import re

import pytest
import torch
from biased_models import biased, calib_ids, recipe

from moequant import export, quantize, verify
from moequant.calibrate import input_scale

FAMILIES = ("qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def runs():
    cache = {}

    def get(family, floor, policy="coverage"):
        if (family, floor, policy) not in cache:
            cache[(family, floor, policy)] = quantize(biased(family), recipe("nvfp4", policy, calibration={
                "input_floor": floor}), calib_ids(), batch_size=3)
        return cache[(family, floor, policy)]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_gets_at_least_the_layer_amax(runs, family):
    floored, own, full = runs(family, "layer"), runs(family, "none"), runs(family, "none", "route_all")
    checked, raised = 0, 0
    for c in own.report.coverage:
        gate_up, down = (f"{c.path}.{p}" for p in ("gate_up_proj", "down_proj"))
        # gate_up: every expert gets the amax of all the layer's hidden states, i.e. route_all's value
        hidden = full.state.tensors[gate_up].input_scale
        assert (hidden == hidden[0]).all()
        assert torch.equal(floored.state.tensors[gate_up].input_scale, hidden)
        # down: every expert gets the layer's largest down amax (the floor is a max: no expert goes down)
        own_down = own.state.tensors[down].input_scale
        assert torch.equal(floored.state.tensors[down].input_scale, own_down.max().expand_as(own_down))
        raised += int((own_down < own_down.max()).sum())
        checked += 1
    assert checked == len(own.report.coverage) > 0 and raised > 0   # the floor did raise experts here
    for key, s in own.state.tensors.items():   # linears are not touched by the floor
        if own.state.plan.target(key).kind == "linear":
            assert torch.equal(s.input_scale, floored.state.tensors[key].input_scale), key


@pytest.mark.parametrize("family", FAMILIES)
def test_the_report_lists_every_raised_expert(runs, family):
    floored, own = runs(family, "layer"), runs(family, "none")
    for c, o in zip(floored.report.coverage, own.report.coverage):
        assert c.floor == "layer" and o.floor == "none" and o.floored == ()
        for name, param in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            before = own.state.tensors[f"{c.path}.{param}"].input_scale
            after = floored.state.tensors[f"{c.path}.{param}"].input_scale
            listed = {e: (frm, to) for n, e, frm, to in c.floored if n == name}
            assert sorted(listed) == (after > before).nonzero().flatten().tolist()
            for e, (frm, to) in listed.items():
                assert torch.equal(input_scale(torch.tensor(frm), "nvfp4"), before[e])
                assert torch.equal(input_scale(torch.tensor(to), "nvfp4"), after[e])
    text = floored.report.to_text()
    assert "input floor (layer) raised: " in text
    summary = floored.report.floor_summary()
    raised = sum(len(c.floored) for c in floored.report.coverage)
    assert summary.startswith(f"{raised} expert inputs raised") and "largest factor" in summary
    assert own.report.floor_summary() is None


@pytest.mark.parametrize("fmt", ("modelopt", "compressed-tensors"))
def test_a_floored_checkpoint_is_what_a_max_over_experts_backend_runs(runs, fmt, tmp_path):
    """vLLM's FlashInfer/CuteDSL/emulation NVFP4 MoE backends and its FP8 MoE quantize every expert's input with
    the max over experts (docs/engines.md). With the floor every expert already ships that max (gate_up: every
    token is routed to some expert, so the layer's hidden amax is the max of the experts' own), so such a
    backend computes exactly what was calibrated: the contract's spread is x1. Without it the spread is > 1."""
    spread = {}
    for floor in ("layer", "none"):
        result = runs("qwen3_moe", floor)
        out = export(biased("qwen3_moe"), result.state, tmp_path / floor, format=fmt)
        checked = verify(out, engine="vllm")
        assert checked.ok, checked.failures
        notes = [w for w in checked.warnings if w.startswith("per-expert input scales")]
        assert len(notes) == 1, checked.warnings
        spread[floor] = float(re.search(r"up to x([0-9.e+]+)", notes[0]).group(1))
    assert spread["layer"] == 1.0 and spread["none"] > 1.0, spread
