"""What the files say: names per expert, unquantized dtypes, configs, KV scales, generation config, copies."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig

from ckpt_factory import calibrated, read_all
from moequant import calibrate_weights
from moequant.export import ExportError, export
from tiny_models import build


def test_modelopt_w4a4_names_configs_and_kv(tmp_path):
    model, state = calibrated("mixtral")
    out = export(model, state, tmp_path / "out", recipe={"name": "test-recipe"})
    t = read_all(out)
    m = "model.layers.1.block_sparse_moe.experts.5"
    for proj in ("w1", "w2", "w3"):
        assert t[f"{m}.{proj}.weight"].dtype == torch.uint8
        assert t[f"{m}.{proj}.weight_scale"].dtype == torch.float8_e4m3fn
        assert t[f"{m}.{proj}.weight_scale_2"].shape == ()
        assert t[f"{m}.{proj}.input_scale"].shape == ()
    assert t[f"{m}.w1.weight"].shape == (32, 32) and t[f"{m}.w2.weight_scale"].shape == (64, 2)
    assert torch.equal(t[f"{m}.w1.weight_scale_2"], t[f"{m}.w3.weight_scale_2"])
    assert torch.equal(t[f"{m}.w1.input_scale"], t[f"{m}.w3.input_scale"])
    assert t["model.layers.0.self_attn.k_proj.k_scale"].shape == ()
    assert not any(".mlp." in n for n in t)  # hub names, not transformers' in-memory names
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["quantization"] == {
        "quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
        "exclude_modules": ["lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]}
    assert hf["producer"]["name"] == "moequant"
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4"
    assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert qc["ignore"] == hf["quantization"]["exclude_modules"]
    assert config["moequant"]["recipe"] == {"name": "test-recipe"}
    assert config["moequant"]["backend"] == "torch" and config["moequant"]["version"]
    assert config["architectures"] == ["MixtralForCausalLM"]


def test_compressed_tensors_scales_are_inverses(tmp_path):
    model, state = calibrated("qwen3_moe")
    out = export(model, state, tmp_path / "out", format="compressed-tensors")
    t = read_all(out)
    rec = state.records()["model.layers.0.mlp.experts.2.up_proj.weight"]
    m = "model.layers.0.mlp.experts.2.up_proj"
    assert t[f"{m}.weight_global_scale"].shape == (1,)
    assert torch.equal(t[f"{m}.weight_global_scale"], torch.reciprocal(rec.global_scale).reshape(1))
    assert torch.equal(t[f"{m}.input_global_scale"], torch.reciprocal(rec.input_scale).reshape(1))
    assert t["model.layers.1.self_attn.k_scale"].shape == (1,)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    assert qc["kv_cache_scheme"]["strategy"] == "tensor"
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_unquantized_tensors_keep_dtype_and_values(tmp_path):
    model, state = calibrated("qwen2_moe", dtype=torch.bfloat16)
    t = read_all(export(model, state, tmp_path / "out"))
    sd = model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                 "model.layers.0.mlp.gate.weight", "model.norm.weight", "model.layers.1.self_attn.q_proj.bias"):
        assert t[name].dtype == torch.bfloat16 and torch.equal(t[name], sd[name]), name


def test_weight_only_and_fp8_rules(tmp_path):
    model = build("qwen3_moe")
    state = calibrate_weights(model, method="max")
    export(model, state, tmp_path / "w4a16")
    hf = json.loads((tmp_path / "w4a16" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "W4A16_NVFP4"
    assert not any(n.endswith("input_scale") for n in read_all(tmp_path / "w4a16"))
    fp8 = calibrate_weights(model, scheme="fp8")
    with pytest.raises(ExportError, match="input scales"):
        export(model, fp8, tmp_path / "fp8")
    export(model, fp8, tmp_path / "w8a16", format="compressed-tensors")  # CT W8A16 needs no input scales
    state.tensors["model.layers.0.self_attn.q_proj.weight"].input_scale = torch.tensor(0.001)
    with pytest.raises(ExportError, match="no input_scale while other targets have one"):
        export(model, state, tmp_path / "mixed")


def test_bad_scale_is_refused_naming_the_tensor(tmp_path):
    model, state = calibrated("olmoe")
    state.tensors["model.layers.1.mlp.experts.down_proj"].input_scale[3] = 0.0
    with pytest.raises(ExportError, match=r"experts\.3\.down_proj\.weight: input scale"):
        export(model, state, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", [0x00, 0x7F, 0x80, 0xB8], ids=["zero", "nan", "minus-zero", "negative"])
def test_bad_block_scale_is_refused_naming_the_expert(tmp_path, bits):
    """The whole-tensor check (fp8 bytes 0x01..0x7E) finds one bad block among all experts' and names it."""
    model, state = calibrated("olmoe")
    block = state.tensors["model.layers.1.mlp.experts.gate_up_proj"].block_scale
    block.view(torch.uint8)[5, -1, -1] = bits   # expert 5, its last row: the up half
    with pytest.raises(ExportError, match=r"experts\.5\.up_proj\.weight: block scale"):
        export(model, state, tmp_path / "out")
    assert not (tmp_path / "out").exists()


STRICT_INVALID = dict(top_k=20, top_p=0.95, do_sample=False)


def _strict_invalid_model():
    model, state = calibrated("qwen3_moe", activations=False)
    model.generation_config = GenerationConfig(**STRICT_INVALID)
    return model, state


def test_generation_config_that_fails_strict_validation_exports(tmp_path):
    model, state = _strict_invalid_model()
    before = model.generation_config.to_dict()
    with pytest.raises(ValueError):  # what users hit: transformers refuses to save_pretrained this config
        model.save_pretrained(tmp_path / "plain")
    out = export(model, state, tmp_path / "out")
    saved = json.loads((out / "generation_config.json").read_text())
    assert {k: saved[k] for k in STRICT_INVALID} == STRICT_INVALID
    loaded = GenerationConfig.from_pretrained(out)
    assert (loaded.top_k, loaded.top_p, loaded.do_sample) == (20, 0.95, False)
    assert model.generation_config.do_sample is False and model.generation_config.to_dict() == before


def test_generation_config_copied_byte_for_byte_with_tokenizer_files(tmp_path):
    model, state = _strict_invalid_model()
    source = tmp_path / "source"
    source.mkdir()
    gen_bytes = b'{\n  "do_sample": false,\n  "top_k": 20,\n  "top_p": 0.95\n}\n'
    (source / "generation_config.json").write_bytes(gen_bytes)
    (source / "tokenizer.json").write_text('{"model": {}}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "model.safetensors").write_bytes(b"not copied")
    (source / "pytorch_model.bin.index.json").write_text("{}")
    out = export(model, state, tmp_path / "out", format="compressed-tensors", source_dir=source)
    assert (out / "generation_config.json").read_bytes() == gen_bytes
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    assert (out / "chat_template.jinja").exists()
    assert not (out / "model.safetensors").exists() and not (out / "pytorch_model.bin.index.json").exists()


def test_model_unchanged_when_saving_raises(tmp_path, monkeypatch):
    from moequant.export import hf_files

    model, state = _strict_invalid_model()
    before = model.generation_config.to_dict()

    def fail(*_args, **_kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(hf_files, "write_generation_config", fail)
    with pytest.raises(OSError):
        export(model, state, tmp_path / "out")
    assert model.generation_config.to_dict() == before and model.generation_config.do_sample is False
    assert not (tmp_path / "out").exists()


def test_kv_scales_written_for_every_attention_layer(tmp_path):
    model, state = calibrated("deepseek_v3")
    t = read_all(export(model, state, tmp_path / "out"))
    kv = sorted(n for n in t if n.endswith(("k_scale", "v_scale")))
    assert len(kv) == 2 * model.config.num_hidden_layers


def _without_experts(family, layer=None):
    """(model, state) with the routed experts (of ``layer``, or all) left unquantized, as a recipe would."""
    from ckpt_factory import fill_fake_activations
    from moequant import discover

    model = build(family)
    plan = discover(model)
    drop = [t for t in plan.targets if t.kind == "experts" and layer in (None, t.layer)]
    keep = tuple(t for t in plan.targets if t not in drop)
    plan = plan.with_targets(keep, plan.excluded + tuple(sorted({t.module_path for t in drop})))
    state = calibrate_weights(model, plan, method="max")
    return model, fill_fake_activations(model, state)


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_unquantized_experts_are_excluded_by_their_hub_names(tmp_path, fmt):
    from moequant.verify import verify

    model, state = _without_experts("mixtral", layer=0)
    ref = tmp_path / "ref"
    model.save_pretrained(ref)
    out = export(model, state, tmp_path / "out", format=fmt)
    result = verify(out, reference=ref)
    assert result.ok, result.summary()
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    if fmt == "modelopt":
        assert "model.layers.0.block_sparse_moe.experts*" in ignore
    else:
        # 3 routers, 24 per-expert modules, 3 names vLLM probes for the FusedMoE (export/compressed_tensors.py)
        assert "model.layers.0.block_sparse_moe.experts.7.w3" in ignore and len(ignore) == 3 + 24 + 3
    t = read_all(out)
    assert t["model.layers.0.block_sparse_moe.experts.7.w3.weight"].dtype == torch.float32


def test_gpt_oss_attention_only_exports(tmp_path):
    """The GPT-OSS refusal's own advice works: experts left out, attention quantized, fused experts as on disk."""
    from moequant.verify import verify

    model, state = _without_experts("gpt_oss")
    ref = tmp_path / "ref"
    model.save_pretrained(ref)
    out = export(model, state, tmp_path / "out")
    result = verify(out, reference=ref)
    assert result.ok, result.summary()
    t = read_all(out)
    assert t["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert t["model.layers.1.self_attn.q_proj.weight"].dtype == torch.uint8


def test_tied_embeddings(tmp_path):
    from moequant.verify import verify
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tiny_models import COMMON

    config = Qwen3MoeConfig(**{**COMMON, "tie_word_embeddings": True}, intermediate_size=96, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 3:
                p.normal_(0, 0.05)
    state = calibrate_weights(model, method="max")
    out = export(model, state, tmp_path / "out")
    assert "lm_head.weight" not in read_all(out)
    result = verify(out)
    assert result.ok, result.summary()
    # the exclude list names the tied lm_head, which is never stored: expected, so no warning to act on
    assert not result.warnings, result.warnings
    # the same entry in a checkpoint whose config says untied names a tensor that should be there: warned
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    assert any("'lm_head' names no tensor" in w for w in verify(out).warnings)


def test_fp8_scale_check_accepts_exactly_the_finite_positive_codes():
    """check_exportable's block-scale test (one aminmax over the bytes) against every E4M3 byte, alone and among
    good ones: 0x01..0x7E pass; 0 (zero), 0x7F (NaN) and 0x80.. (negative, -0, -NaN) fail."""
    from moequant.export.common import _all_finite_positive

    good = torch.full((7,), 0x38, dtype=torch.uint8)
    for b in range(256):
        one = torch.tensor([b], dtype=torch.uint8)
        want = 1 <= b <= 0x7E
        assert _all_finite_positive(one.view(torch.float8_e4m3fn)) == want, b
        assert _all_finite_positive(torch.cat([good, one]).view(torch.float8_e4m3fn)) == want, b
    assert _all_finite_positive(torch.empty(0, dtype=torch.float8_e4m3fn))
