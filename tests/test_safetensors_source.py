"""A model directory's index and shard headers are checked before any tensor is read: one ShardError line each,
naming the file (and the tensor and the bad entry); nothing outside the model directory is opened."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moequant.safetensors_source import INDEX_NAME, SafetensorsSource, ShardError

A = torch.arange(32, dtype=torch.float32).reshape(2, 16)
B = torch.ones(4, dtype=torch.bfloat16)
C = torch.full((3,), 7, dtype=torch.int32)


def _write_model(folder: Path) -> Path:
    """Two shards: a.w + b.w in model-1, c.w in model-2, and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a.w": A, "b.w": B}, str(folder / "model-1.safetensors"))
    save_file({"c.w": C}, str(folder / "model-2.safetensors"))
    _set_index(folder, {"a.w": "model-1.safetensors", "b.w": "model-1.safetensors", "c.w": "model-2.safetensors"})
    return folder


def _set_index(folder: Path, weight_map) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _remap(folder: Path, tensor: str, file: str) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"][tensor] = file
    (folder / INDEX_NAME).write_text(json.dumps(index))


@pytest.fixture
def model(tmp_path) -> Path:
    return _write_model(tmp_path / "model")


@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid shard outside the model directory holding c.w (what a hostile index would point at)."""
    path = tmp_path / "elsewhere" / "x.safetensors"
    path.parent.mkdir()
    save_file({"c.w": C}, str(path))
    return path


def _refused(folder: Path, *parts: str) -> str:
    with pytest.raises(ShardError) as info:
        SafetensorsSource(folder)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


def test_a_good_directory_reads_every_tensor(model):
    source = SafetensorsSource(model)
    assert torch.equal(source.get("a.w"), A) and torch.equal(source.get("b.w"), B)
    assert torch.equal(source.get("c.w"), C)


def test_parent_directory_entry_is_refused(model, outside):
    _remap(model, "c.w", "../elsewhere/x.safetensors")
    _refused(model, f"{model / INDEX_NAME}: tensor c.w", "'../elsewhere/x.safetensors'", "outside the model")


def test_absolute_entry_is_refused(model, outside):
    _remap(model, "c.w", str(outside))
    _refused(model, f"{model / INDEX_NAME}: tensor c.w", repr(str(outside)), "an absolute path")


def test_separators_that_climb_out_are_refused(model, outside):
    (model / "sub").mkdir()
    _remap(model, "c.w", "sub/../../elsewhere/x.safetensors")
    _refused(model, "tensor c.w", "'sub/../../elsewhere/x.safetensors'", "'..'")


def test_symlinked_shard_resolving_outside_is_refused(model, outside):
    (model / "model-2.safetensors").unlink()
    os.symlink(outside, model / "model-2.safetensors")
    _refused(model, f"{model / INDEX_NAME}: tensor c.w", "'model-2.safetensors'", f"a link resolving to {outside}")


def test_symlinked_directory_resolving_outside_is_refused(model, outside):
    os.symlink(outside.parent, model / "sub")
    _remap(model, "c.w", "sub/x.safetensors")
    _refused(model, "tensor c.w", "'sub/x.safetensors'", f"a link resolving to {outside}")


def test_single_file_symlinked_outside_is_refused(tmp_path, outside):
    folder = tmp_path / "single"
    folder.mkdir()
    os.symlink(outside, folder / "model.safetensors")
    _refused(folder, f"{folder / 'model.safetensors'}: outside the model directory")


def test_subdirectories_and_the_hub_cache_layout_are_accepted(tmp_path):
    """Shards in a subfolder of the model, and the Hugging Face cache (snapshots/<rev>/f -> ../../blobs/<hash>)."""
    model = _write_model(tmp_path / "model")
    (model / "shards").mkdir()
    (model / "model-2.safetensors").rename(model / "shards" / "model-2.safetensors")
    _remap(model, "c.w", "shards/model-2.safetensors")
    assert torch.equal(SafetensorsSource(model).get("c.w"), C)

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(["model-1.safetensors", "model-2.safetensors", INDEX_NAME]):
        blob = blobs / f"hash{i}"
        (model / file if file != "model-2.safetensors" else model / "shards" / file).rename(blob)
        os.symlink(Path("..") / ".." / "blobs" / blob.name, snapshot / file)
    _set_index(blobs.parent / "snapshots" / "0123abcd", {"a.w": "model-1.safetensors", "b.w": "model-1.safetensors",
                                                         "c.w": "model-2.safetensors"})
    source = SafetensorsSource(snapshot)
    assert torch.equal(source.get("a.w"), A) and torch.equal(source.get("c.w"), C)


@pytest.mark.parametrize("text,expected", [
    ("{not json", "invalid JSON"),
    (json.dumps({"metadata": {}}), "weight_map is missing"),
    (json.dumps({"weight_map": ["model-1.safetensors"]}), "weight_map is a list"),
    (json.dumps([1, 2]), "weight_map is missing"),
    (json.dumps({"weight_map": {"a.w": 3}}), "tensor a.w maps to 3, not a shard file name"),
    ('{"weight_map": {"a.w": "model-1.safetensors", "a.w": "model-2.safetensors"}}',
     "tensor a.w is listed twice (in 'model-1.safetensors' and 'model-2.safetensors')"),
], ids=["not-json", "no-weight-map", "weight-map-list", "not-an-object", "entry-not-a-name", "listed-twice"])
def test_malformed_index(model, text, expected):
    (model / INDEX_NAME).write_text(text)
    _refused(model, f"{model / INDEX_NAME}: ", expected)


def test_listed_shard_missing(model):
    (model / "model-2.safetensors").unlink()
    _refused(model, f"{model / 'model-2.safetensors'}: shard file is missing (it holds tensor c.w")


def test_tensor_listed_but_absent_from_its_shard(model):
    _remap(model, "z.w", "model-2.safetensors")
    _refused(model, f"{model / 'model-2.safetensors'}: tensor z.w is listed in {INDEX_NAME} but not in this shard")


def test_same_tensor_in_two_shards(model):
    save_file({"c.w": C, "a.w": A}, str(model / "model-2.safetensors"))
    _refused(model, f"{model / 'model-2.safetensors'}: holds tensor a.w", "'model-1.safetensors'", "two shards")


def _rewrite_header(path: Path, header: bytes, length: int | None = None) -> None:
    data = path.read_bytes()
    (old,) = struct.unpack("<Q", data[:8])
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data[8 + old:])


@pytest.mark.parametrize("edit,expected", [
    (lambda p: p.write_bytes(b"\x01\x02"), "truncated safetensors file (no header)"),
    (lambda p: p.write_bytes(p.read_bytes()[:20]), "truncated safetensors file (header of"),
    (lambda p: _rewrite_header(p, b"{" * 40), "corrupt safetensors header (Expecting"),
    (lambda p: _rewrite_header(p, b"[1, 2]"), "corrupt safetensors header (not a JSON object)"),
    (lambda p: _rewrite_header(p, b"", length=2**40), "corrupt safetensors header (claims"),
    (lambda p: _rewrite_header(p, json.dumps({"c.w": 5}).encode()), "corrupt safetensors header (tensor c.w: 5"),
    (lambda p: _rewrite_header(p, json.dumps({"c.w": {"dtype": "I32", "shape": [3],
                                                      "data_offsets": [8, 4]}}).encode()),
     "corrupt safetensors header (tensor c.w"),
], ids=["no-header", "cut-in-header", "garbage", "not-an-object", "huge-length", "entry-not-object",
        "offsets-backwards"])
def test_bad_shard_header(model, edit, expected):
    shard = model / "model-2.safetensors"
    edit(shard)
    _refused(model, f"{shard}: {expected}")
