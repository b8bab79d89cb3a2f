"""Comparison with the original model: error per tensor / layer / expert, outliers, unchanged tensors."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_factory import calibrated, edit_checkpoint
from moequant.export import export
from moequant.verify import verify

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


def test_corrupted_expert_is_an_outlier(pair, tmp_path):
    ref, out = pair
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(out, path)

    def edit(t):  # same scale on gate and up (passes the group checks) but 1.6x too large: wrong weights
        for proj in ("gate_proj", "up_proj"):
            name = f"{EXPERT}.6.{proj}.weight_scale_2"
            if name in t:
                t[name] = t[name] * 1.6

    edit_checkpoint(path, edit)
    result = verify(path, reference=ref)
    assert result.ok  # structurally fine: only the comparison with the reference can see it
    assert result.errors.outliers == [f"{EXPERT}.6.gate_proj", f"{EXPERT}.6.up_proj"]
    assert result.errors.per_expert[f"{EXPERT}.6"] > 0.4
    assert any("outlier" in w for w in result.warnings)


def test_changed_unquantized_and_missing_tensors(pair, tmp_path):
    ref, out = pair
    import shutil

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
