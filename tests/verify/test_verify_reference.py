"""Comparison with the original model: error per tensor / layer / expert, outliers, unchanged tensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ckpt_factory import calibrated, edit_checkpoint, fill_fake_activations
from moequant import calibrate_weights
from moequant.export import export
from moequant.verify import main, verify
from moequant.verify.reference import WRONG_ERROR
from tiny_models import build

EXPERT = "model.layers.0.mlp.experts"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model, state = calibrated("olmoe")
    root = tmp_path_factory.mktemp("ref")
    model.save_pretrained(root / "ref")
    return root / "ref", export(model, state, root / "out", format="modelopt")


def test_error_report_shape(pair):
    ref, out = pair
    result = verify(out, reference=ref)
    assert result.ok, result.summary()
    errors = result.errors
    assert len(errors.per_tensor) == result.stats["quantized_modules"] == 56
    assert sorted(errors.per_layer) == ["model.layers.0", "model.layers.1"]
    assert len(errors.per_expert) == 16 and f"{EXPERT}.7" in errors.per_expert
    assert all(0.08 < v < 0.11 for v in errors.per_tensor.values())
    assert errors.outliers == []
    data = json.loads(result.to_json())
    assert data["errors"]["summary"]["tensors"] == 56


def _scale_expert_globals(path, factor: float) -> None:
    def edit(t):  # same scale on gate and up (passes the group checks) but too large: wrong weights
        for proj in ("gate_proj", "up_proj"):
            name = f"{EXPERT}.6.{proj}.weight_scale_2"
            if name in t:
                t[name] = t[name] * factor

    edit_checkpoint(path, edit)


def test_mis_scaled_expert_is_an_outlier(pair, tmp_path):
    """1.3x too large: relative error ~0.3, three times the median: a warning, still below a failure."""
    ref, out = pair
    path = tmp_path / "ckpt"
    shutil.copytree(out, path)
    _scale_expert_globals(path, 1.3)
    result = verify(path, reference=ref)
    assert result.ok, result.summary()  # structurally fine: only the comparison with the reference can see it
    assert result.errors.outliers == [f"{EXPERT}.6.gate_proj", f"{EXPERT}.6.up_proj"]
    assert 0.25 < result.errors.per_expert[f"{EXPERT}.6"] < WRONG_ERROR
    assert any("outlier" in w for w in result.warnings)


def test_wrong_global_scale_fails_naming_the_on_disk_tensors(pair, tmp_path):
    """1.6x too large: relative error ~0.6 >= 0.5: the decoded weights are not these tensors."""
    ref, out = pair
    path = tmp_path / "ckpt"
    shutil.copytree(out, path)
    _scale_expert_globals(path, 1.6)
    result = verify(path, reference=ref)
    wrong = [f.tensor for f in result.failures if f.check == "relative_error"]
    assert not result.ok and wrong == [f"{EXPERT}.6.gate_proj.weight", f"{EXPERT}.6.up_proj.weight"], result.summary()


@pytest.mark.parametrize("bits,what", [(0x7E, "all 448"), (0x01, "all 2^-9, as a tiny tensor's underflowed search gave")])
def test_corrupted_block_scales_fail_naming_the_on_disk_tensor(pair, tmp_path, capsys, bits, what):
    ref, out = pair
    path = tmp_path / "ckpt"
    shutil.copytree(out, path)
    name = f"{EXPERT}.3.down_proj"

    def edit(t):
        if f"{name}.weight_scale" not in t:   # another shard
            return
        t[f"{name}.weight_scale"] = torch.full_like(t[f"{name}.weight_scale"].view(torch.uint8), bits).view(
            torch.float8_e4m3fn)

    edit_checkpoint(path, edit)
    result = verify(path, reference=ref)
    failures = [f for f in result.failures if f.check == "relative_error"]
    assert [f.tensor for f in failures] == [f"{name}.weight"], (what, result.summary())
    assert main([str(path), "--reference", str(ref)]) == 1
    assert f"[relative_error] {name}.weight: relative error" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_tiny_tensors_pass_with_the_error_of_the_same_tensors_at_ordinary_magnitude(tmp_path, fmt):
    """A linear and an expert of ~1e-30 (2^-100 times the weights of another model): the checkpoint passes
    and their relative errors equal, bit for bit, those of the ordinary model's checkpoint."""
    scaled = {"model.layers.0.self_attn.o_proj", "model.layers.1.mlp.experts.3.gate_proj",
              "model.layers.1.mlp.experts.3.up_proj", "model.layers.1.mlp.experts.3.down_proj"}
    results = []
    for factor in (1.0, 2.0**-100):
        model = build("qwen3_moe")
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.mul_(factor)
            model.model.layers[1].mlp.experts.gate_up_proj[3].mul_(factor)
            model.model.layers[1].mlp.experts.down_proj[3].mul_(factor)
        state = fill_fake_activations(model, calibrate_weights(model, method="mse", backend="torch"))
        root = tmp_path / f"{fmt}-{factor}"
        model.save_pretrained(root / "ref")
        result = verify(export(model, state, root / "out", format=fmt), reference=root / "ref")
        assert result.ok, result.summary()
        results.append(result.errors.per_tensor)
    assert results[0] == results[1]
    assert all(results[1][m] < 0.15 for m in scaled)


def test_changed_unquantized_and_missing_tensors(pair, tmp_path):
    ref, out = pair
    path = tmp_path / "ckpt"
    shutil.copytree(out, path)

    def edit(t):
        if "model.norm.weight" in t:
            t["model.norm.weight"] = t["model.norm.weight"] + 1.0
        if "model.layers.1.mlp.gate.weight" in t:
            t["model.layers.1.mlp.gate.weight"] = t["model.layers.1.mlp.gate.weight"].to(torch.bfloat16)
        t.pop("model.layers.0.input_layernorm.weight", None)

    edit_checkpoint(path, edit)
    result = verify(path, reference=ref)
    got = {(f.check, f.tensor) for f in result.failures}
    assert ("unquantized_changed", "model.norm.weight") in got
    assert ("dtype", "model.layers.1.mlp.gate.weight") in got
    assert ("missing_tensor", "model.layers.0.input_layernorm.weight") in got


def test_unreadable_reference_is_a_failure(pair, tmp_path):
    _, out = pair
    result = verify(out, reference=tmp_path)
    assert [f.check for f in result.failures] == ["reference"]
