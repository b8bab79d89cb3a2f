"""A corrupt or missing shard fails naming the file and the tensor, and leaves nothing behind."""

import json
import shutil
import struct
from pathlib import Path

import pytest

from moequant.formats.nvfp4 import WeightError
from moequant.recipe import load_recipe
from moequant.safetensors_source import ShardError, read_header
from moequant.layers.streamed import quantize_streamed

RECIPE = load_recipe("nvfp4-w4a16")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A tiny Mixtral saved in several shards (an index file)."""
    from tiny_models import build

    folder = tmp_path_factory.mktemp("mixtral-sharded")
    build("mixtral").save_pretrained(folder, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_left(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _layer_shard(src: Path, layer: int) -> tuple[Path, str]:
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in sorted(index) if n.startswith(f"model.layers.{layer}.") and "experts.3.w1" in n)
    return src / index[name], name


def test_missing_shard_names_file_and_tensor(sharded, tmp_path):
    src = _copy(sharded, tmp_path / "src")
    shard, _ = _layer_shard(src, 1)
    shard.unlink()
    with pytest.raises(ShardError, match=rf"{shard.name}: shard file is missing \(it holds tensor model\.\S+"):
        quantize_streamed(src, tmp_path / "out", RECIPE)
    _assert_nothing_left(tmp_path)


def test_truncated_shard_names_file_and_tensor_after_a_finished_layer(sharded, tmp_path):
    src = _copy(sharded, tmp_path / "src")
    shard, _ = _layer_shard(src, 1)
    header, start = read_header(shard)
    last = max(header, key=lambda n: header[n]["data_offsets"][1])
    shard.write_bytes(shard.read_bytes()[: start + header[last]["data_offsets"][0] + 4])
    with pytest.raises(ShardError, match=rf"{shard.name}: tensor {last.replace('.', '[.]')} is cut short"):
        quantize_streamed(src, tmp_path / "out", RECIPE)
    _assert_nothing_left(tmp_path)   # layer 0 had finished: its journal is removed too (an error, not a kill)


def test_corrupt_header_names_file(sharded, tmp_path):
    src = _copy(sharded, tmp_path / "src")
    shard, _ = _layer_shard(src, 0)
    data = bytearray(shard.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8:8 + length] = b"{" * length
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{shard.name}: corrupt safetensors header"):
        quantize_streamed(src, tmp_path / "out", RECIPE)
    _assert_nothing_left(tmp_path)


def test_index_pointing_outside_the_model_is_refused_before_reading(sharded, tmp_path):
    """A shard name climbing out of the model directory: refused naming the index, the tensor and the entry;
    the file outside is never opened (it is not even a safetensors file) and nothing is left behind."""
    src = _copy(sharded, tmp_path / "src")
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    _, name = _layer_shard(src, 1)
    index["weight_map"][name] = "../secret.txt"
    index_path.write_text(json.dumps(index))
    secret = tmp_path / "secret.txt"
    secret.write_text("not for moequant")
    pattern = rf"{index_path.name}: tensor {name.replace('.', '[.]')} is mapped to shard '\.\./secret\.txt', outside"
    with pytest.raises(ShardError, match=pattern):
        quantize_streamed(src, tmp_path / "out", RECIPE)
    secret.unlink()
    _assert_nothing_left(tmp_path)


def test_nan_in_a_shard_names_the_on_disk_expert_tensor(model_dir, tmp_path):
    """The streamed path fuses gate/up of each expert in memory; the refusal names the tensor of the shard."""
    from safetensors.torch import load_file, save_file

    src = _copy(model_dir("qwen3_moe"), tmp_path / "src")
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    shard = src / "model.safetensors"
    tensors = load_file(str(shard))
    tensors[name][5, 9] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(WeightError, match=rf"^{name.replace('.', '[.]')}: 1 non-finite value.*at index \[5, 9\]"):
        quantize_streamed(src, tmp_path / "out", RECIPE)
    _assert_nothing_left(tmp_path)
