"""The streamed run writes the very bytes of the in-memory pipeline (load -> quantize -> export)."""

from pathlib import Path

import pytest

from moequant.calibration_data import load_tokenizer
from moequant.export import export
from moequant.layers.in_memory import quantize
from moequant.recipe import load_recipe
from moequant.quantize_command import load_model
from moequant.layers.streamed import quantize_streamed

CALIB = {"calibration": {"samples": 4, "seq_len": 32}}


def files_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), subdirectories (smoothing factors) included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def in_memory(src: Path, out: Path, recipe, fmt: str, max_shard_bytes: int = 5 * 10**9) -> None:
    model = load_model(src)
    result = quantize(model, recipe, None, tokenizer=load_tokenizer(src), device="cpu")
    export(model, result.state, out, format=fmt, source_dir=src, recipe=recipe, max_shard_bytes=max_shard_bytes)


@pytest.mark.parametrize("family,recipe,fmt", [
    ("qwen3_moe", "nvfp4-mse", "modelopt"),
    ("qwen3_moe", "nvfp4-best", "compressed-tensors"),   # channel statistics observed before each layer's search
    ("mixtral", "nvfp4", "compressed-tensors"),
    ("deepseek_v3", "nvfp4-experts-only", "modelopt"),
    ("llama", "fp8", "modelopt"),
])
def test_streamed_equals_in_memory(model_dir, tmp_path, family, recipe, fmt):
    src = model_dir(family)
    rec = load_recipe(recipe, kv_cache="fp8", **CALIB)
    in_memory(src, tmp_path / "mem", rec, fmt, max_shard_bytes=40_000)
    result = quantize_streamed(src, tmp_path / "stream", rec, fmt, tokenizer=load_tokenizer(src),
                               max_shard_bytes=40_000)
    mem, streamed = files_bytes(tmp_path / "mem"), files_bytes(tmp_path / "stream")
    assert sorted(mem) == sorted(streamed)
    assert len([n for n in mem if n.endswith(".safetensors")]) > 1   # several shards
    for name in mem:
        assert mem[name] == streamed[name], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem", "stream"]   # journal removed
    assert all(s.block_scale is None for s in result.state.tensors.values())   # block scales live on disk


def test_streamed_weighted_search_with_dead_experts_equals_in_memory(model_dir, tmp_path):
    """nvfp4-best streamed: under-covered experts take the layer's channel statistics, as in memory."""
    src = model_dir("qwen3_moe", dead_experts=True)
    rec = load_recipe("nvfp4-best", **CALIB)
    in_memory(src, tmp_path / "mem", rec, "modelopt")
    result = quantize_streamed(src, tmp_path / "stream", rec, "modelopt", tokenizer=load_tokenizer(src))
    assert result.report.under_covered, "the model should have under-covered experts"
    mem, streamed = files_bytes(tmp_path / "mem"), files_bytes(tmp_path / "stream")
    assert sorted(mem) == sorted(streamed)
    for name in mem:
        assert mem[name] == streamed[name], name


def test_streamed_smoothing_equals_in_memory(model_dir, tmp_path):
    """Smoothing streamed (factors from each layer's inputs, folded, quantized, the layer restored; the smoothed
    norms and routers written from the result): the same shards and the same factors file as in memory."""
    src = model_dir("qwen3_moe", dead_experts=True)
    rec = load_recipe("nvfp4-best", kv_cache="fp8", smoothing={"enabled": True, "down": True}, **CALIB)
    in_memory(src, tmp_path / "mem", rec, "modelopt", max_shard_bytes=40_000)
    quantize_streamed(src, tmp_path / "stream", rec, "modelopt", tokenizer=load_tokenizer(src), max_shard_bytes=40_000)
    mem, streamed = files_bytes(tmp_path / "mem"), files_bytes(tmp_path / "stream")
    assert "moequant_smoothing/factors.safetensors" in mem
    assert sorted(mem) == sorted(streamed)
    for name in mem:
        assert mem[name] == streamed[name], name


def test_streamed_gptq_equals_in_memory(model_dir, tmp_path):
    """nvfp4-gptq streamed: X^T X observed before each layer's weights, GPTQ codes for the experts and linears
    with enough tokens, round to nearest (listed) for the others -- the same bytes as in memory."""
    src = model_dir("qwen3_moe", dead_experts=True)
    rec = load_recipe("nvfp4-gptq", kv_cache="fp8", calibration={"samples": 8, "seq_len": 32})
    in_memory(src, tmp_path / "mem", rec, "modelopt", max_shard_bytes=40_000)
    result = quantize_streamed(src, tmp_path / "stream", rec, "modelopt", tokenizer=load_tokenizer(src),
                               max_shard_bytes=40_000)
    status = [r for s in result.state.tensors.values() for r in s.gptq_status.reshape(-1).tolist()]
    assert 0 in status and any(status), "some experts use GPTQ, the dead ones fall back"
    assert result.report.gptq_fallback()
    mem, streamed = files_bytes(tmp_path / "mem"), files_bytes(tmp_path / "stream")
    assert sorted(mem) == sorted(streamed)
    for name in mem:
        assert mem[name] == streamed[name], name
