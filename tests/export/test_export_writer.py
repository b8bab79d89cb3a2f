"""Writer: sharding, index, existing-directory rules, atomicity when an export is interrupted."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moequant.export import writer
from ckpt_factory import SMALL_SHARD, calibrated, read_all
from moequant.export import ExportError, TensorSpec, export
from moequant.export.writer import INDEX_NAME, plan_shards, write_checkpoint


def _spec(name, n, fill=1.0):
    return TensorSpec(name, (n,), torch.float32, lambda: torch.full((n,), fill))


def _no_extras(_tmp):
    return None


def test_shards_and_index(tmp_path):
    specs = [_spec(f"t{i}", 100, float(i)) for i in range(10)]  # 400 bytes each
    out = write_checkpoint(tmp_path / "ckpt", [specs], _no_extras, max_shard_bytes=1000)
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert index["metadata"]["total_size"] == 4000
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(name), torch.full((100,), float(name[1:])))


def test_oversized_tensor_gets_its_own_shard():
    shards = plan_shards([_spec("a", 10), _spec("big", 1000), _spec("b", 10)], max_shard_bytes=100)
    assert [[s.name for s in shard] for shard in shards] == [["a"], ["big"], ["b"]]


def test_built_tensor_must_match_its_table_entry(tmp_path):
    bad = TensorSpec("x", (3,), torch.float32, lambda: torch.zeros(4))
    with pytest.raises(ExportError, match="x: built tensor"):
        write_checkpoint(tmp_path / "ckpt", [[bad]], _no_extras)
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_rules(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    write_checkpoint(target, [[_spec("a", 4)]], _no_extras)  # empty directory: fine
    with pytest.raises(ExportError, match="overwrite=True"):
        write_checkpoint(target, [[_spec("b", 4)]], _no_extras)
    (target / "stale.txt").write_text("old")
    write_checkpoint(target, [[_spec("b", 4)]], _no_extras, overwrite=True)
    assert not (target / "stale.txt").exists()
    assert "b" in json.loads((target / INDEX_NAME).read_text())["weight_map"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing(tmp_path, error):
    def boom():
        raise error

    specs = [_spec("a", 100), _spec("b", 100), TensorSpec("c", (100,), torch.float32, boom)]
    with pytest.raises(type(error)):
        write_checkpoint(tmp_path / "ckpt", [specs], _no_extras, max_shard_bytes=400)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_previous_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    write_checkpoint(target, [[_spec("old", 4)]], _no_extras)
    before = (target / INDEX_NAME).read_text()

    def extras_fail(_tmp):
        raise OSError("tokenizer copy failed")

    with pytest.raises(OSError):
        write_checkpoint(target, [[_spec("new", 4)]], extras_fail, overwrite=True)
    assert (target / INDEX_NAME).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_export_interrupted_mid_shards_leaves_no_directory(tmp_path, monkeypatch):
    model, state = calibrated("qwen3_moe")
    calls = {"n": 0}
    real_save = writer.write_safetensors

    def save_then_fail(path, shard):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("No space left on device")
        real_save(path, shard)

    monkeypatch.setattr(writer, "write_safetensors", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        export(model, state, tmp_path / "out", max_shard_bytes=SMALL_SHARD)
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def test_export_reads_only(tmp_path):
    """The model's weights, config and parameters are untouched by an export."""
    model, state = calibrated("mixtral")
    params = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    export(model, state, tmp_path / "out", format="compressed-tensors")
    assert model.config.to_dict() == config
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    tensors = read_all(tmp_path / "out")
    assert "model.layers.0.block_sparse_moe.gate.weight" in tensors
