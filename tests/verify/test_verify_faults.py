"""The verifier catches each fault injected into a good checkpoint, naming the tensor and the check."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ckpt_factory import calibrated, edit_checkpoint, shard_of
from moequant.export import export
from moequant.verify import main, verify

FORMATS = ("modelopt", "compressed-tensors")
GLOBAL = {"modelopt": "weight_scale_2", "compressed-tensors": "weight_global_scale"}
INPUT = {"modelopt": "input_scale", "compressed-tensors": "input_global_scale"}
EXPERT = "model.layers.1.mlp.experts"
ATTN = "model.layers.0.self_attn"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A W4A4 + FP8-KV checkpoint of the tiny Qwen3-MoE in each format (8 experts x 2 layers)."""
    model, state = calibrated("qwen3_moe")
    root = tmp_path_factory.mktemp("good")
    return {fmt: export(model, state, root / fmt, format=fmt, max_shard_bytes=40_000) for fmt in FORMATS}


@pytest.fixture(params=FORMATS)
def ckpt(request, good, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(good[request.param], path)
    return request.param, path


def _scale(tensors, name, factor=None, value=None):
    if name in tensors:
        t = tensors[name].to(torch.float32)
        t = t * factor if factor is not None else torch.full_like(t, value)
        tensors[name] = t.to(tensors[name].dtype)


def _assert_caught(path, check, tensor_part):
    result = verify(path)
    hits = [f for f in result.failures if f.check == check and tensor_part in f.tensor]
    assert not result.ok and hits, result.summary()
    return result


def test_good_checkpoints_pass(good):
    for fmt, path in good.items():
        result = verify(path)
        assert result.ok, result.summary()
        assert result.format == fmt
        assert result.stats["moe_layers"] == 2 and result.stats["kv_scales"] == 2
        assert result.stats["quantized_modules"] == result.stats["decoded_modules"] == 56
        assert json.loads(result.to_json())["ok"] is True


def test_missing_expert(ckpt):
    fmt, path = ckpt
    edit_checkpoint(path, lambda t: [t.pop(n) for n in list(t) if n.startswith(f"{EXPERT}.3.")])
    result = _assert_caught(path, "experts_complete", EXPERT)
    assert "[3]" in result.failures[0].message


def test_missing_projection_of_one_expert(ckpt):
    fmt, path = ckpt
    edit_checkpoint(path, lambda t: [t.pop(n) for n in list(t) if n.startswith(f"{EXPERT}.6.down_proj.")])
    _assert_caught(path, "experts_complete", f"{EXPERT}.6")


def test_all_experts_of_a_layer_missing(ckpt):
    fmt, path = ckpt
    edit_checkpoint(path, lambda t: [t.pop(n) for n in list(t) if n.startswith(f"{EXPERT}.")])
    _assert_caught(path, "experts_complete", "model.layers.1.mlp.gate")


def test_gate_up_global_scale_mismatch(ckpt):
    fmt, path = ckpt
    edit_checkpoint(path, lambda t: _scale(t, f"{EXPERT}.2.up_proj.{GLOBAL[fmt]}", factor=1.25))
    _assert_caught(path, "fused_group_global_scale", f"{EXPERT}.2.up_proj")


def test_gate_up_input_scale_mismatch(ckpt):
    fmt, path = ckpt
    edit_checkpoint(path, lambda t: _scale(t, f"{EXPERT}.4.gate_proj.{INPUT[fmt]}", factor=0.5))
    _assert_caught(path, "fused_group_input_scale", f"{EXPERT}.4.up_proj")


def test_qkv_scale_mismatch(ckpt):
    fmt, path = ckpt
    edit_checkpoint(path, lambda t: _scale(t, f"{ATTN}.k_proj.{GLOBAL[fmt]}", factor=2.0))
    _assert_caught(path, "fused_group_global_scale", f"{ATTN}.k_proj")


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["block", "global", "input"])
def test_zero_nan_inf_scales(ckpt, bad, which):
    fmt, path = ckpt
    module = f"{EXPERT}.5.down_proj"
    if which == "block":
        def edit(t):
            name = f"{module}.weight_scale"
            if name in t:
                s = t[name].to(torch.float32)
                s[3, 1] = bad if bad == bad and bad != float("inf") else float("nan")  # e4m3fn has no inf
                t[name] = s.to(torch.float8_e4m3fn)
        name = f"{module}.weight_scale"
    else:
        name = f"{module}.{GLOBAL[fmt] if which == 'global' else INPUT[fmt]}"

        def edit(t):
            _scale(t, name, value=bad)
    edit_checkpoint(path, edit)
    _assert_caught(path, "scale_positive", name)


def test_zero_kv_scale(ckpt):
    fmt, path = ckpt
    name = f"{ATTN}.k_proj.k_scale" if fmt == "modelopt" else f"{ATTN}.k_scale"
    edit_checkpoint(path, lambda t: _scale(t, name, value=0.0))
    _assert_caught(path, "scale_positive", name)


def test_kv_scales_for_some_layers_only(ckpt):
    fmt, path = ckpt
    edit_checkpoint(path, lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.1.self_attn.")
                                     and n.endswith(("k_scale", "v_scale"))])
    _assert_caught(path, "kv_scales", "model.layers.1.self_attn")


def test_truncated_shard(ckpt):
    fmt, path = ckpt
    shard = path / shard_of(path, f"{EXPERT}.7.up_proj.weight_scale")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    result = _assert_caught(path, "files", shard.name)
    assert "truncated" in result.failures[0].message


def test_shard_missing_from_disk(ckpt):
    fmt, path = ckpt
    (path / shard_of(path, "model.embed_tokens.weight")).unlink()
    _assert_caught(path, "files", ".safetensors")


@pytest.mark.parametrize("entry", ["../elsewhere/shard.safetensors", "ABSOLUTE", "link.safetensors"])
def test_index_entry_outside_the_checkpoint(ckpt, good, tmp_path, entry):
    """A shard name leaving the directory (as written, or through a symlink) is refused, not read."""
    fmt, path = ckpt
    name = f"{EXPERT}.7.up_proj.weight_scale"
    outside = tmp_path / "elsewhere" / "shard.safetensors"
    outside.parent.mkdir()
    shutil.copy(path / shard_of(path, name), outside)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    if entry == "link.safetensors":
        (path / entry).symlink_to(outside)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][name] = entry
    index_path.write_text(json.dumps(index))
    result = _assert_caught(path, "files", str(path))
    assert f"tensor {name} is mapped to {entry!r}, outside" in result.failures[0].message
    as_reference = verify(good[fmt], reference=path)  # a reference directory is refused alike
    assert [(f.check, f.tensor) for f in as_reference.failures] == [("reference", str(path))]
    assert "outside" in as_reference.failures[0].message


@pytest.mark.parametrize("suffix,dtype", [("global", torch.bfloat16), ("block", torch.float16),
                                          ("data", torch.int8)])
def test_wrong_dtype(ckpt, suffix, dtype):
    fmt, path = ckpt
    module = f"{EXPERT}.1.gate_proj"
    names = {"global": GLOBAL[fmt], "block": "weight_scale",
             "data": "weight" if fmt == "modelopt" else "weight_packed"}
    name = f"{module}.{names[suffix]}"

    def edit(t):
        if name in t:
            t[name] = t[name].view(torch.int8) if dtype == torch.int8 else t[name].to(torch.float32).to(dtype)

    edit_checkpoint(path, edit)
    _assert_caught(path, "dtype", name)


def test_router_missing_from_exclude_list(ckpt):
    fmt, path = ckpt
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"].remove("model.layers.1.mlp.gate")
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "modelopt":
        hf = json.loads((path / "hf_quant_config.json").read_text())
        hf["quantization"]["exclude_modules"].remove("model.layers.1.mlp.gate")
        (path / "hf_quant_config.json").write_text(json.dumps(hf))
    _assert_caught(path, "exclude_list", "model.layers.1.mlp.gate")


def test_quantized_module_in_exclude_list(ckpt):
    fmt, path = ckpt
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"].append(f"{ATTN}.o_proj")
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "modelopt":
        hf = json.loads((path / "hf_quant_config.json").read_text())
        hf["quantization"]["exclude_modules"].append(f"{ATTN}.o_proj")
        (path / "hf_quant_config.json").write_text(json.dumps(hf))
    _assert_caught(path, "exclude_list", f"{ATTN}.o_proj")


def test_missing_required_config_key(ckpt):
    fmt, path = ckpt
    if fmt == "modelopt":
        hf = json.loads((path / "hf_quant_config.json").read_text())
        del hf["quantization"]["kv_cache_quant_algo"]
        (path / "hf_quant_config.json").write_text(json.dumps(hf))
        _assert_caught(path, "config_keys", "hf_quant_config.json")
    else:
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"]["quantization_status"] = "frozen"
        (path / "config.json").write_text(json.dumps(config))
        _assert_caught(path, "config_keys", "config.json")


def test_partially_quantized_fused_group(ckpt):
    fmt, path = ckpt
    module = f"{ATTN}.v_proj"
    data = "weight" if fmt == "modelopt" else "weight_packed"

    def edit(t):
        t[f"{module}.weight"] = torch.zeros(32, 64)
        for n in [n for n in t if n.startswith(module + ".") and not n.endswith(".weight")]:
            t.pop(n)
        if data != "weight":
            t.pop(f"{module}.{data}", None)

    edit_checkpoint(path, edit)
    _assert_caught(path, "fused_group_partial", ATTN)


def test_nan_in_decoded_fp8_weight(tmp_path):
    model, state = calibrated("olmoe", scheme="fp8")
    path = export(model, state, tmp_path / "fp8")
    name = f"{EXPERT}.0.up_proj.weight"

    def edit(t):
        if name not in t:   # another shard
            return
        w = t[name].view(torch.uint8).clone()
        w[0, 0] = 0x7F  # the E4M3FN NaN encoding
        t[name] = w.view(torch.float8_e4m3fn)

    edit_checkpoint(path, edit)
    _assert_caught(path, "decoded_finite", f"{EXPERT}.0.up_proj")


def test_decoded_overflow_in_nvfp4(ckpt):
    """Finite, positive scales whose product overflows: the scale-based proof fails, the decode finds the infs."""
    fmt, path = ckpt
    module = f"{EXPERT}.2.gate_proj"
    name = f"{module}.{GLOBAL[fmt]}"
    huge = 3e37 if fmt == "modelopt" else 1e-37  # ct divides by its global scale
    edit_checkpoint(path, lambda t: _scale(t, name, value=huge))
    result = _assert_caught(path, "decoded_finite", module)
    assert result.stats["decoded_modules"] == result.stats["quantized_modules"] - 1


def test_large_but_finite_scales_pass(ckpt):
    """The bound is not a threshold on the scale: a large global scale whose decode stays finite passes."""
    fmt, path = ckpt
    module = f"{EXPERT}.2.gate_proj"
    names = [f"{module}.{GLOBAL[fmt]}", f"{EXPERT}.2.up_proj.{GLOBAL[fmt]}"]  # a fused pair keeps one value
    value = 1e32 if fmt == "modelopt" else 1e-32
    edit_checkpoint(path, lambda t: [_scale(t, n, value=value) for n in names])
    result = verify(path)
    assert result.ok, result.summary()


def test_cli_exit_status(good, tmp_path, capsys):
    assert main([str(good["modelopt"])]) == 0
    assert "OK" in capsys.readouterr().out
    path = tmp_path / "bad"
    shutil.copytree(good["modelopt"], path)
    edit_checkpoint(path, lambda t: _scale(t, f"{ATTN}.q_proj.weight_scale_2", value=0.0))
    assert main([str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert {"check": "scale_positive", "tensor": f"{ATTN}.q_proj.weight_scale_2"} in [
        {k: f[k] for k in ("check", "tensor")} for f in report["failures"]]


def test_broken_config_json_is_a_failure_not_an_exception(ckpt):
    fmt, path = ckpt
    (path / "config.json").write_text("{not json")
    _assert_caught(path, "config_keys", str(path))


def test_not_a_checkpoint(tmp_path):
    result = verify(tmp_path)
    assert not result.ok and result.failures[0].check == "files"
