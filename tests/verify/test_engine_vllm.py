"""The vLLM 0.26.0 loader contract: moequant's own exports pass it, and each fault a user meets in vLLM fails it,
naming the tensor or config entry (``moequant verify --engine vllm``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ckpt_factory import calibrated, edit_checkpoint
from moequant.cli import main
from moequant.export import export
from moequant.verify import verify

FORMATS = ("modelopt", "compressed-tensors")
FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "llama")
GLOBAL = {"modelopt": "weight_scale_2", "compressed-tensors": "weight_global_scale"}
INPUT = {"modelopt": "input_scale", "compressed-tensors": "input_global_scale"}
EXPERTS = {"qwen3_moe": ("model.layers.1.mlp.experts", "gate_proj", "up_proj", "down_proj"),
           "mixtral": ("model.layers.1.block_sparse_moe.experts", "w1", "w3", "w2")}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """W4A4 + FP8-KV exports of each tiny family in each format (moequant's own exporter)."""
    root, out = tmp_path_factory.mktemp("vllm"), {}
    for family in FAMILIES:
        model, state = calibrated(family)
        for fmt in FORMATS:
            out[family, fmt] = export(model, state, root / family / fmt, format=fmt, max_shard_bytes=40_000)
    return out


@pytest.fixture
def copy_of(exports, tmp_path):
    def get(family, fmt):
        path = tmp_path / f"{family}-{fmt}"
        shutil.copytree(exports[family, fmt], path)
        return path
    return get


def _vllm_failures(path, check):
    result = verify(path, engine="vllm")
    return result, [f for f in result.failures if f.check == check]


def _set_ignore(path, fmt, change):
    """Edit the exclude/ignore list vLLM reads (config.json quantization_config; hf_quant_config.json alike)."""
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"] = change(config["quantization_config"]["ignore"])
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "modelopt":
        hf = json.loads((path / "hf_quant_config.json").read_text())
        hf["quantization"]["exclude_modules"] = config["quantization_config"]["ignore"]
        (path / "hf_quant_config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_own_exports_pass(exports, family, fmt):
    result = verify(exports[family, fmt], engine="vllm")
    assert result.ok, result.summary()
    assert result.stats["vllm_modules"] > 0
    assert any("vLLM 0.26.0 contract" in w for w in result.warnings)  # the contract ran, not skipped


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_one_expert_input_scale_removed(copy_of, family, fmt):
    prefix, _, _, down = EXPERTS[family]
    path, name = copy_of(family, fmt), f"{prefix}.3.{down}.{INPUT[fmt]}"
    edit_checkpoint(path, lambda t: t.pop(name, None))
    result, hits = _vllm_failures(path, "vllm_input_scale")
    assert [f.tensor for f in hits] == [name], result.summary()
    assert "uninitialised" in hits[0].message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0])
def test_expert_input_scale_not_finite_positive(copy_of, fmt, bad):
    path, name = copy_of("qwen3_moe", fmt), f"model.layers.1.mlp.experts.5.down_proj.{INPUT[fmt]}"
    edit_checkpoint(path, lambda t: t.update({name: torch.full_like(t[name], bad)}) if name in t else None)
    result, hits = _vllm_failures(path, "vllm_input_scale")
    assert [f.tensor for f in hits] == [name], result.summary()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_w1_w3_global_scale_differ(copy_of, family, fmt):
    prefix, gate, up, _ = EXPERTS[family]
    path, name = copy_of(family, fmt), f"{prefix}.2.{up}.{GLOBAL[fmt]}"
    edit_checkpoint(path, lambda t: t.update({name: t[name] * 1.25}) if name in t else None)
    result, hits = _vllm_failures(path, "vllm_w13_scale")
    assert [f.tensor for f in hits] == [name], result.summary()
    assert f"{prefix}.2.{gate}.{GLOBAL[fmt]}" in hits[0].message and "gate's" in hits[0].message
    # the factor the up weights are off by: 1.25 (ModelOpt stores the multiplier, compressed-tensors its inverse)
    assert ("x0.8" if fmt == "modelopt" else "x1.25") in hits[0].message


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_entry_matches_quantized_experts(copy_of, fmt):
    """ModelOpt matches entries as substrings: 'model.layers.1.mlp' excludes the quantized experts of layer 1;
    compressed-tensors needs a regex for the same effect (re.match, anchored at the start)."""
    path = copy_of("qwen3_moe", fmt)
    entry = "model.layers.1.mlp" if fmt == "modelopt" else r"re:model\.layers\.1\.mlp\..*"
    _set_ignore(path, fmt, lambda ignore: ignore + [entry])
    result, hits = _vllm_failures(path, "vllm_exclude")
    assert [f.tensor for f in hits] == ["model.layers.1.mlp.experts"], result.summary()
    assert repr(entry) in hits[0].message and "24 expert projection(s) quantized on disk" in hits[0].message
    if fmt == "modelopt":
        assert "(substring)" in hits[0].message


def test_one_expert_entry_excludes_the_whole_modelopt_layer(copy_of):
    """vLLM's 'experts' rule: a prefix containing 'experts' is excluded when it is a substring of any entry."""
    path = copy_of("qwen3_moe", "modelopt")
    _set_ignore(path, "modelopt", lambda ignore: ignore + ["model.layers.1.mlp.experts.3.down_proj"])
    result, hits = _vllm_failures(path, "vllm_exclude")
    assert [f.tensor for f in hits] == ["model.layers.1.mlp.experts"], result.summary()
    assert "experts substring" in hits[0].message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("change", ["drop_router", "tensor_name_entry"])
def test_unquantized_module_left_unmatched(copy_of, fmt, change):
    """Qwen3-MoE's router is built with the quantization config: without an entry that matches it, vLLM expects
    NVFP4 tensors there. An entry naming the router's tensor ('<module>.weight') matches under no rule."""
    path, module = copy_of("qwen3_moe", fmt), "model.layers.0.mlp.gate"
    keep = (lambda e: []) if change == "drop_router" else (lambda e: [e + ".weight"])
    _set_ignore(path, fmt, lambda ignore: [x for e in ignore for x in (keep(e) if e == module else [e])])
    result, hits = _vllm_failures(path, "vllm_exclude")
    assert [f.tensor for f in hits] == [module], result.summary()
    assert "unquantized on disk" in hits[0].message and "nvfp4" in hits[0].message


def test_modelopt_pattern_misses_lm_head(copy_of):
    """'lm_head.*' matches lm_head's children only (fnmatch), so vLLM builds lm_head quantized."""
    path = copy_of("qwen3_moe", "modelopt")
    _set_ignore(path, "modelopt", lambda ignore: [e if e != "lm_head" else "lm_head.*" for e in ignore])
    result, hits = _vllm_failures(path, "vllm_exclude")
    assert [f.tensor for f in hits] == ["lm_head"], result.summary()


def test_compressed_tensors_linear_target_leaves_lm_head_alone(copy_of):
    """Target 'Linear' matches vLLM class names containing 'linear'; ParallelLMHead is not one of them."""
    path = copy_of("qwen3_moe", "compressed-tensors")
    _set_ignore(path, "compressed-tensors", lambda ignore: [e for e in ignore if e != "lm_head"])
    result, hits = _vllm_failures(path, "vllm_exclude")
    assert hits == [], result.summary()


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_dtype_and_shape(copy_of, fmt):
    path = copy_of("mixtral", fmt)
    block = "model.layers.0.block_sparse_moe.experts.1.w2.weight_scale"
    packed = f"model.layers.0.self_attn.o_proj.{'weight' if fmt == 'modelopt' else 'weight_packed'}"

    def edit(t):
        if block in t:
            t[block] = t[block].to(torch.float32)
        if packed in t:
            t[packed] = t[packed][:-1].clone()
    edit_checkpoint(path, edit)
    result, hits = _vllm_failures(path, "vllm_tensor")
    messages = {f.tensor: f.message for f in hits}
    assert set(messages) == {block, packed}, result.summary()
    assert "dtype torch.float32" in messages[block] and "[63, 32]" in messages[packed]


@pytest.mark.parametrize("fmt", FORMATS)
def test_kv_scales(copy_of, fmt):
    """A KV scale that vLLM's renaming does not land on an attention layer, and a v_scale without its k_scale."""
    path = copy_of("llama", fmt)
    kv = "model.layers.{}.self_attn.k_proj.k_scale" if fmt == "modelopt" else "model.layers.{}.self_attn.k_scale"

    def edit(t):
        if kv.format(0) in t:
            t["model.layers.0.mlp.k_scale"] = t.pop(kv.format(0))
        t.pop(kv.format(1), None)
    edit_checkpoint(path, edit)
    result, hits = _vllm_failures(path, "vllm_kv")
    messages = {f.tensor: f.message for f in hits}
    assert "model.layers.0.mlp.attn.k_scale" in messages["model.layers.0.mlp.k_scale"], result.summary()
    assert any("v_scale without k_scale" in m for m in messages.values()), result.summary()


def test_unknown_architecture_is_not_a_pass(tmp_path):
    model, state = calibrated("olmoe")
    path = export(model, state, tmp_path / "olmoe", format="modelopt")
    result, hits = _vllm_failures(path, "vllm_model")
    assert len(hits) == 1 and "OlmoeForCausalLM" in hits[0].message


def test_cli_engine_flag(exports, copy_of, capsys):
    assert main(["verify", str(exports["mixtral", "modelopt"]), "--engine", "vllm"]) == 0
    path = copy_of("mixtral", "modelopt")
    name = "model.layers.1.block_sparse_moe.experts.4.w3.weight_scale_2"
    edit_checkpoint(path, lambda t: t.update({name: t[name] * 2}) if name in t else None)
    capsys.readouterr()
    assert main(["verify", str(path), "--engine", "vllm"]) == 1
    assert f"[vllm_w13_scale] {name}:" in capsys.readouterr().out


def test_mixtral_ct_excluded_experts_carry_vllm_probe_names(tmp_path):
    """A Mixtral (on-disk w1/w2/w3) whose layer-0 experts stay float: the compressed-tensors ignore list also
    names what vLLM probes for that FusedMoE (``<experts>.0.gate_proj/up_proj/down_proj``), so vLLM builds it
    unquantized; without those three entries the contract fails on exactly that layer."""
    from test_export_content import _without_experts

    model, state = _without_experts("mixtral", layer=0)
    path = export(model, state, tmp_path / "ct", format="compressed-tensors")
    result = verify(path, engine="vllm")
    assert result.ok, result.summary()
    ignore = json.loads((path / "config.json").read_text())["quantization_config"]["ignore"]
    probes = [f"model.layers.0.block_sparse_moe.experts.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert set(probes) <= set(ignore) and "model.layers.0.block_sparse_moe.experts.7.w3" in ignore
    assert not [e for e in ignore if e.startswith("model.layers.1.block_sparse_moe.experts")]

    _set_ignore(path, "compressed-tensors", lambda entries: [e for e in entries if e not in probes])
    result, failures = _vllm_failures(path, "vllm_exclude")
    assert any("model.layers.0.block_sparse_moe.experts" in f.message for f in failures), result.summary()
