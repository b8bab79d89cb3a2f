"""Data-free weight calibration of every expert: coverage, validity, shared scales, MSE vs max, errors."""

import copy

import pytest
import torch

from moequant import calibrate_weights, discover
from moequant.formats.fp8 import E4M3_MIN_SUBNORMAL, fp8_tensor_scale
from moequant.formats.nvfp4 import GLOBAL_DIVISOR, WeightError, global_scale_from_amax, dequantize_nvfp4, quantize_nvfp4
from moequant.weights import canonical_weight
from tiny_models import FAMILIES, MOE_FAMILIES, build


@pytest.fixture(scope="module")
def states():
    cache = {}

    def get(family, method="mse"):
        if (family, method) not in cache:
            model = build(family)
            cache[(family, method)] = (model, calibrate_weights(model, method=method))
        return cache[(family, method)]

    return get


def _dead_router(model):
    """Bias every router so that only experts 0 and 1 can ever be chosen."""
    with torch.no_grad():
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if name.endswith((".gate", ".router")) and w is not None and w.ndim == 2:
                w.zero_()
                w[:2] = 1.0
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()
                    bias[:2] = 10.0


@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f != "gpt_oss"] + ["gpt_oss"])
def test_every_expert_record_exists_with_valid_scales(family):
    model = build(family)
    _dead_router(model)  # calibration needs no tokens: the router must not matter
    state = calibrate_weights(model)
    per_layer = {}
    for rec in state.expert_records().values():
        t = state.plan.target(rec.target)
        per_layer.setdefault(t.layer, []).append(rec)
        assert rec.global_scale.ndim == 0 and torch.isfinite(rec.global_scale) and rec.global_scale > 0
        b = rec.block_scale.to(torch.float32)
        assert torch.isfinite(b).all() and (b > 0).all()
    for layer, recs in per_layer.items():
        e = state.plan.target(recs[0].target).shape[0]
        roles = sorted(r.role for r in recs)
        assert roles.count("gate") == e and roles.count("up") == e and roles.count("down") == e, layer
        assert len(recs) == 3 * e


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_up_and_groups_share_bit_identical_global_scales(family, states):
    _, state = states(family)
    recs = state.expert_records()
    for rec in recs.values():
        if rec.role == "gate":
            up = [r for r in recs.values() if r.target == rec.target and r.expert == rec.expert and r.role == "up"]
            assert len(up) == 1 and torch.equal(up[0].global_scale, rec.global_scale)
    for group in state.plan.groups:
        scales = [state.tensors[k].global_scale for k in group]
        assert all(torch.equal(s, scales[0]) for s in scales), group
        group_amax = torch.stack([state.tensors[k].amax for k in group]).amax()
        assert torch.equal(scales[0], global_scale_from_amax(group_amax))


@pytest.mark.parametrize("family", FAMILIES)
def test_mse_never_worse_than_max_per_block_and_better_in_total(family, states):
    from moequant.formats.nvfp4 import max_block_scales, to_blocks, weight_squared_error

    model, state = states(family)
    total_mse = total_max = 0.0
    for t in state.plan.targets:
        s = state.tensors[t.key]
        w = canonical_weight(model, t)
        err_mse = weight_squared_error(w, s.global_scale, s.block_scale)
        err_max = weight_squared_error(w, s.global_scale, max_block_scales(to_blocks(w), s.global_scale))
        assert (err_mse <= err_max).all(), t.key
        total_mse += float(err_mse.sum().detach())
        total_max += float(err_max.sum().detach())
        assert torch.allclose(s.sq_error, err_mse.reshape(s.sq_error.shape[0], -1).sum(-1)
                              if t.kind == "experts" else err_mse.sum())
    assert total_mse < total_max


def test_mse_reduction_on_heavy_tailed_weights():
    model = build("qwen3_moe")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.distributions.StudentT(3.0).sample(p.shape) * 0.02)
    mse, mx = calibrate_weights(model), calibrate_weights(model, method="max")
    err_mse = sum(float(s.sq_error.sum()) for s in mse.tensors.values())
    err_max = sum(float(s.sq_error.sum()) for s in mx.tensors.values())
    assert err_mse < 0.95 * err_max


def test_all_zero_expert_gets_documented_scales_and_decodes_to_zero():
    model = build("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[3].zero_()
        experts.down_proj[3].zero_()
    state = calibrate_weights(model)
    for param in ("gate_up_proj", "down_proj"):
        s = state.tensors[f"model.layers.0.mlp.experts.{param}"]
        assert torch.equal(s.global_scale[3], torch.tensor(1.0) / GLOBAL_DIVISOR)
        assert (s.block_scale[3].to(torch.float32) == E4M3_MIN_SUBNORMAL).all()
        w = getattr(experts, param)[3]
        deq = dequantize_nvfp4(quantize_nvfp4(w, s.global_scale[3], s.block_scale[3]), s.global_scale[3],
                               s.block_scale[3])
        assert torch.equal(deq, torch.zeros_like(deq))


def test_nan_in_one_expert_names_the_on_disk_tensor():
    model = build("mixtral")
    with torch.no_grad():
        # expert 5, up half (w3) of layer 1, row 3 of up
        inter = model.model.layers[1].mlp.experts.down_proj.shape[2]
        model.model.layers[1].mlp.experts.gate_up_proj[5, inter + 3, 7] = float("nan")
    with pytest.raises(WeightError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.5\.w3\.weight"):
        calibrate_weights(model)


@pytest.mark.parametrize("scheme", ["nvfp4", "fp8"])
def test_nan_in_a_fused_gate_up_names_the_up_tensor_of_that_expert(scheme):
    """Qwen3-MoE fuses gate and up of each expert into gate_up_proj [E, 2I, H] in memory; the error names the
    on-disk tensor of expert 2 that holds the NaN, and the position within it, not the fused parameter."""
    model = build("qwen3_moe")
    inter = model.config.moe_intermediate_size
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[2, inter + 5, 9] = float("nan")
    with pytest.raises(WeightError) as info:
        calibrate_weights(model, scheme=scheme)
    message = str(info.value)
    assert message.startswith("model.layers.1.mlp.experts.2.up_proj.weight: "), message
    assert "gate_up_proj" not in message
    if scheme == "nvfp4":
        assert "first at index [5, 9]" in message, message


def test_huge_magnitude_names_the_on_disk_tensor_of_that_expert():
    model = build("qwen3_moe")
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[6, 3, 0] = 1e30   # gate rows of expert 6
        model.model.layers[1].mlp.experts.down_proj[1, 0, 0] = -1e30
    with pytest.raises(WeightError, match=r"^model\.layers\.0\.mlp\.experts\.6\.gate_proj\.weight: magnitude 1e\+30"):
        calibrate_weights(model)


@pytest.mark.parametrize("method", ["mse", "max"])
def test_tiny_tensors_get_the_scales_of_the_same_tensor_at_ordinary_magnitude(method):
    """One linear and one expert scaled by 2^-100 (~1e-30 weights): the pipeline ships the block scales of the
    unscaled model and the global scale of the original amax (exponent normalization, formats.nvfp4)."""
    model, tiny = build("qwen3_moe"), build("qwen3_moe")
    with torch.no_grad():
        tiny.model.layers[0].self_attn.o_proj.weight.mul_(2.0**-100)
        tiny.model.layers[1].mlp.experts.gate_up_proj[3].mul_(2.0**-100)
        tiny.model.layers[1].mlp.experts.down_proj[3].mul_(2.0**-100)
    ref, got = calibrate_weights(model, method=method), calibrate_weights(tiny, method=method)
    for key, s in ref.tensors.items():
        t = got.tensors[key]
        assert torch.equal(t.block_scale.view(torch.uint8), s.block_scale.view(torch.uint8)), key
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(got.tensors[o_proj].global_scale, ref.tensors[o_proj].global_scale * 2.0**-100)
    down = got.tensors["model.layers.1.mlp.experts.down_proj"].global_scale
    expected = ref.tensors["model.layers.1.mlp.experts.down_proj"].global_scale.clone()
    expected[3] *= 2.0**-100
    assert torch.equal(down, expected)


@pytest.mark.parametrize("scheme,magnitude", [("nvfp4", 1e-32), ("fp8", 1e-33)])
def test_expert_too_small_for_normal_scales_is_refused_by_name(scheme, magnitude):
    model = build("qwen3_moe")
    with torch.no_grad():
        experts = model.model.layers[0].mlp.experts
        experts.gate_up_proj[5] = torch.randn(experts.gate_up_proj.shape[1:]).clamp(-1, 1) * magnitude
    expected = (r"^model\.layers\.0\.mlp\.experts\.5\.gate_proj\.weight, model\.layers\.0\.mlp\.experts\.5\.up_proj\.weight: "
                r"largest magnitude .* is below .*exclude model\.layers\.0\.mlp\.experts in the recipe")
    with pytest.raises(WeightError, match=expected):
        calibrate_weights(model, scheme=scheme)
    if scheme == "nvfp4":  # the same expert is fine for FP8, whose scale is amax / 448, not amax / 2688
        calibrate_weights(model, scheme="fp8")


def test_inf_in_linear_names_the_tensor():
    model = build("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(WeightError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight"):
        calibrate_weights(model)


def test_deterministic_and_model_untouched():
    model = build("deepseek_v3")
    before = copy.deepcopy(model.state_dict())
    a, b = calibrate_weights(model), calibrate_weights(model)
    for key, s in a.tensors.items():
        t = b.tensors[key]
        assert torch.equal(s.global_scale, t.global_scale)
        assert torch.equal(s.block_scale.view(torch.uint8), t.block_scale.view(torch.uint8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_model_and_fp8_scheme(states):
    model = build("olmoe", dtype=torch.bfloat16)
    state = calibrate_weights(model)
    assert all(torch.isfinite(s.global_scale).all() for s in state.tensors.values())
    fp8 = calibrate_weights(model, scheme="fp8")
    for t in fp8.plan.targets:
        s = fp8.tensors[t.key]
        assert s.scheme == "fp8" and s.block_scale is None
        assert torch.equal(s.global_scale, fp8_tensor_scale(s.amax)) or t.group is not None
