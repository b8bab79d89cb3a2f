"""quantize(): full expert coverage under every policy, shared group scales, layer-by-layer equals
all-at-once, the user's model left as it was, clear errors, and the report."""

import copy

import pytest
import torch
from biased_models import BIASED_FAMILIES, MIN_TOKENS, biased, calib_ids, recipe
from tiny_models import _configs, build

from moequant import quantize
from moequant.calibrate import POLICIES
from moequant.calibration_data import CalibrationDataError
from moequant.models.experts import UnsupportedModelError
from moequant.recipe import RecipeError


@pytest.fixture(scope="module")
def runs():
    cache = {}

    def get(family, policy="coverage", kv="fp8", name="nvfp4", sequential=True, floor="none"):
        key = (family, policy, kv, name, sequential, floor)
        if key not in cache:
            if family not in cache:
                cache[family] = biased(family)
            cache[key] = quantize(cache[family], recipe(name, policy, kv, calibration={"input_floor": floor}),
                                  calib_ids(), batch_size=3, sequential=sequential)
        return cache[key]

    return get


def _experts_scales(result):
    return {k: s.input_scale for k, s in result.state.tensors.items() if result.state.plan.target(k).kind == "experts"}


@pytest.mark.parametrize("family", BIASED_FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_expert_gets_a_finite_positive_input_scale(runs, family, policy):
    result = runs(family, policy)
    for key, s in result.state.tensors.items():
        t = result.state.plan.target(key)
        assert s.input_scale is not None and s.input_scale.dtype == torch.float32, key
        assert s.input_scale.shape == ((t.shape[0],) if t.kind == "experts" else ()), key
        assert torch.isfinite(s.input_scale).all() and (s.input_scale > 0).all(), key
    report = result.report
    assert report.coverage and all(c.policy == policy for c in report.coverage)
    dead = 0
    for c in report.coverage:
        expected = [e for e, n in enumerate(c.tokens) if n < MIN_TOKENS]
        assert [e for e, _, _ in c.under_covered] == expected
        assert all(got.startswith(policy) for _, _, got in c.under_covered)
        dead += sum(n == 0 for n in c.tokens)
        assert sum(c.tokens) == 2 * c.total_tokens   # top-2 routing
    assert dead > 0 and report.under_covered()
    text = report.to_text()
    assert all(f"expert {e}:" in text for experts in report.under_covered().values() for e in experts)


@pytest.mark.parametrize("family", BIASED_FAMILIES)
def test_coverage_equals_route_all_for_under_covered_experts_at_lower_cost(runs, family):
    """The policies alone (without the layer floor, tests/test_input_floor.py)."""
    cov, full, routed = (runs(family, policy, floor="none") for policy in ("coverage", "route_all", "routed"))
    cov_scales, full_scales, routed_scales = _experts_scales(cov), _experts_scales(full), _experts_scales(routed)
    for c in cov.report.coverage:
        under = [e for e, _, _ in c.under_covered]
        for param in ("gate_up_proj", "down_proj"):
            key = f"{c.path}.{param}"
            assert torch.equal(cov_scales[key][under], full_scales[key][under]), key
            well = [e for e in range(len(c.tokens)) if e not in under]
            assert torch.equal(cov_scales[key][well], routed_scales[key][well]), key   # own routed tokens
            dead = [e for e, n in enumerate(c.tokens) if n == 0]
            assert (routed_scales[key][dead] == routed_scales[key][[e for e, n in enumerate(c.tokens) if n]]
                    .max()).all(), key
    cov_main, cov_extra = cov.report.observation_cost()
    full_main, full_extra = full.report.observation_cost()
    assert cov_extra > 0 and full_extra == 0
    assert cov_main + cov_extra <= full_main, (cov_main, cov_extra, full_main)   # equal when all but top_k are


@pytest.mark.parametrize("family", BIASED_FAMILIES)
def test_group_members_have_identical_input_scales(runs, family):
    result = runs(family)
    state = result.state
    assert state.plan.groups
    for group in state.plan.groups:
        first = state.tensors[group[0]].input_scale
        assert all(torch.equal(state.tensors[k].input_scale, first) for k in group), group
    by_expert = {}
    for rec in state.expert_records().values():
        if rec.role in ("gate", "up"):
            by_expert.setdefault((rec.target, rec.expert), []).append(rec.input_scale)
    assert by_expert and all(len(v) == 2 and torch.equal(v[0], v[1]) for v in by_expert.values())


@pytest.mark.parametrize("family", BIASED_FAMILIES)
def test_layer_by_layer_equals_all_at_once(runs, family):
    a, b = runs(family, sequential=True), runs(family, sequential=False)
    assert a.report.sequential and not b.report.sequential
    assert list(a.state.tensors) == list(b.state.tensors)
    for key, s in a.state.tensors.items():
        o = b.state.tensors[key]
        for name in ("amax", "global_scale", "sq_error", "sq_error_max", "sq_norm", "input_scale"):
            assert torch.equal(getattr(s, name), getattr(o, name)), (key, name)
        assert torch.equal(s.block_scale.view(torch.uint8), o.block_scale.view(torch.uint8)), key
    assert a.state.kv_cache.keys() == b.state.kv_cache.keys()
    for path, kv in a.state.kv_cache.items():
        assert torch.equal(kv.k_scale, b.state.kv_cache[path].k_scale)
        assert torch.equal(kv.v_scale, b.state.kv_cache[path].v_scale)
    assert a.report.coverage == [] or [c.tokens for c in a.report.coverage] == [c.tokens for c in b.report.coverage]


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [id(p) for p in model.parameters()],
            model.config.to_dict(), model.generation_config.to_dict(),
            {n: (m.training, str(next(m.parameters(), torch.zeros(0)).device)) for n, m in model.named_modules()})


def test_the_users_model_is_left_unchanged():
    model = biased("deepseek_v3")
    model.train()
    model.model.layers[1].mlp.eval()           # a mixed mode must come back exactly
    model.generation_config.top_k = 7           # invalid for strict validation with do_sample=False: untouched
    before = _snapshot(model)
    result = quantize(model, recipe("nvfp4-mse", "coverage", "fp8"), calib_ids(), batch_size=2)
    after = _snapshot(model)
    assert result.state.tensors
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    assert model.training and not model.model.layers[1].mlp.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_weight_only_and_fp8_cast_need_no_data():
    model = build("qwen3_moe")
    result = quantize(model, recipe("nvfp4-w4a16", kv="fp8-cast"))     # no calib, no tokenizer
    assert all(s.input_scale is None for s in result.state.tensors.values())
    assert result.state.kv_scheme == "fp8-cast" and len(result.state.kv_cache) == 2
    assert all(float(kv.k_scale) == 1.0 == float(kv.v_scale) for kv in result.state.kv_cache.values())
    assert "probe" in result.report.calibration and result.report.coverage == []


def test_fp8_input_scales_are_amax_over_448(runs):
    nv, f8 = runs("mixtral", kv="none"), runs("mixtral", kv="none", name="fp8")
    for key, s in f8.state.tensors.items():
        assert s.scheme == "fp8" and s.block_scale is None
        torch.testing.assert_close(s.input_scale * 448, nv.state.tensors[key].input_scale * 2688, rtol=1e-6, atol=0)
    assert nv.state.kv_cache == {} and nv.state.kv_scheme is None


def test_experts_only_recipe_calibrates_only_experts(runs):
    result = runs("deepseek_v3", name="nvfp4-experts-only-mse", kv="none")
    kinds = {result.state.plan.target(k).kind for k in result.state.tensors}
    assert kinds == {"experts"} and result.state.method == "mse"
    shipped, baseline = result.report.weight_error_totals()
    assert 0 < shipped < baseline


def test_report_has_stages_and_memory(runs):
    report = runs("qwen3_moe").report
    assert {"discover", "data", "capture", "weights", "observe", "coverage", "finalize"} <= set(report.stage_seconds)
    m = report.memory
    assert m.device == "cpu" and m.device_peak is None and 0 < m.largest_layer_bytes < m.model_bytes
    assert m.activation_bytes > 0 and m.process_peak_rss > 0
    assert report.tokens == 4 * 32 and len(report.groups) == 2


def test_fail_fast_with_clear_messages(tmp_path):
    model = build("olmoe")
    model.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(CalibrationDataError, match="has no tokenizer"):
        quantize(model, recipe(), ["some text"], tokenizer=tmp_path / "no_tokenizer")
    with pytest.raises(RecipeError, match="calibration.seq_len must be >= 1, got 0"):
        quantize(model, recipe(calibration={"seq_len": 0}), calib_ids())
    with pytest.raises(CalibrationDataError, match="vocabulary has 128 entries"):
        quantize(model, recipe(), calib_ids() + 1000)
    with pytest.raises(CalibrationDataError, match="needs a tokenizer"):
        quantize(model, recipe(), ["some text"])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        quantize(model, recipe(), calib_ids(), batch_size=0)


def test_layers_with_different_arguments_need_all_at_once():
    cls, config = _configs()["gpt_oss"]
    config = copy.deepcopy(config)
    config.layer_types, config.sliding_window = ["sliding_attention", "full_attention"], 8
    torch.manual_seed(0)
    model = cls(config).eval()
    with pytest.raises(UnsupportedModelError, match="model.layers.1 receives a different 'attention_mask'"):
        quantize(model, recipe(), calib_ids())
    result = quantize(model, recipe(), calib_ids(), sequential=False)
    assert all(torch.isfinite(s.input_scale).all() for s in result.state.tensors.values())


@pytest.mark.gpu
def test_peak_device_memory_does_not_grow_with_the_number_of_layers():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cls, config = _configs()["qwen3_moe"]
    peaks = {}
    for layers in (4, 16):
        config = copy.deepcopy(config)
        config.num_hidden_layers, config.hidden_size, config.moe_intermediate_size = layers, 512, 256
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 4, 64
        torch.manual_seed(0)
        model = cls(config).eval()
        result = quantize(model, recipe(), calib_ids(), device="cuda")
        m = peaks[layers] = result.report.memory
        assert next(model.parameters()).device.type == "cpu"
    assert peaks[16].model_bytes > 3.5 * peaks[4].model_bytes
    assert peaks[16].device_peak <= 1.05 * peaks[4].device_peak, peaks
    assert peaks[16].device_peak < peaks[16].model_bytes / 2, peaks
    assert m.largest_layer_bytes < m.device_peak < 8 * m.largest_layer_bytes + 4 * m.activation_bytes, m
