"""Model references as users type them (local directory or hub id, offline cache) and config.json checks."""

from __future__ import annotations

import json

import pytest

from hub_cache import SNAPSHOT_SHA
from moequant.model_ref import ModelDirError, check_model_dir, code_files, model_name, resolve_model


def _repo_files(folder, shards=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
    """The files of a sharded hub repository (contents are not read by the resolution)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    weight_map = {f"t{i}": name for i, name in enumerate(shards)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in shards:
        (folder / name).write_bytes(b"x")
    return folder


def test_an_existing_directory_is_returned_as_it_is(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(tmp_path, offline_hub):
    snapshot = offline_hub("tiny-org/tiny-moe", _repo_files(tmp_path / "repo"))
    assert resolve_model("tiny-org/tiny-moe") == snapshot
    assert resolve_model("tiny-org/tiny-moe", SNAPSHOT_SHA) == snapshot   # a commit needs no ref


def test_a_revision_resolves_through_its_ref(tmp_path, offline_hub):
    offline_hub("tiny-org/tiny-moe", _repo_files(tmp_path / "main"))
    other = "f" * 40
    snapshot = offline_hub("tiny-org/tiny-moe", _repo_files(tmp_path / "v2"), revision="v2", sha=other)
    assert resolve_model("tiny-org/tiny-moe", "v2") == snapshot
    with pytest.raises(ModelDirError, match=r"tiny-org/tiny-moe \(revision v3\).*HF_HUB_OFFLINE"):
        resolve_model("tiny-org/tiny-moe", "v3")


def test_a_hub_id_missing_from_the_offline_cache_is_one_clear_error(offline_hub):
    with pytest.raises(ModelDirError) as err:
        resolve_model("Qwen/Qwen3-30B-A3B")
    text = str(err.value)
    assert text.startswith("Qwen/Qwen3-30B-A3B: ") and "\n" not in text
    assert "download it" in text and "unset HF_HUB_OFFLINE" in text


def test_a_cached_snapshot_missing_a_shard_is_named(tmp_path, offline_hub):
    snapshot = offline_hub("tiny-org/tiny-moe", _repo_files(tmp_path / "repo"))
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelDirError, match="lacks model-00002-of-00002.safetensors"):
        resolve_model("tiny-org/tiny-moe")


@pytest.mark.parametrize("ref", ["no/such/dir", "./missing", "bad--name/x", "/abs/missing"])
def test_neither_a_directory_nor_a_hub_id(ref, offline_hub):
    with pytest.raises(ModelDirError, match="is not a directory: give a local Hugging Face model directory or a hub"):
        resolve_model(ref)


def test_a_revision_with_a_local_directory_is_refused(tmp_path):
    with pytest.raises(ModelDirError, match="--revision v1 applies to hub ids"):
        resolve_model(tmp_path, "v1")


def test_output_names_come_from_the_reference():
    assert model_name("Qwen/Qwen3-30B-A3B") == "Qwen3-30B-A3B"
    assert model_name("/models/Mixtral-8x7B/") == "Mixtral-8x7B"


@pytest.mark.parametrize("text, what", [("{not json", "is not valid JSON (Expecting property name enclosed in "
                                                      "double quotes at line 1, column 2)"),
                                        ("[1, 2]", "is not a JSON object"),
                                        (b"\xff\xfe\x00garbage", "is not UTF-8 text")])
def test_a_config_that_is_not_a_json_object(tmp_path, text, what):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelDirError) as err:
        check_model_dir(tmp_path)
    assert str(err.value).startswith(f"{path} {what}")


def test_custom_code_for_an_unknown_model_type_is_refused_without_the_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "custom_moe", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                 "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    with pytest.raises(ModelDirError) as err:
        check_model_dir(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: config.json's auto_map loads custom code (configuration_custom.py, modeling_custom.py) for "
        "model_type 'custom_moe', which transformers does not know; pass --trust-remote-code "
        "(trust_remote_code=True) if you trust that code")


def test_code_files_of_an_auto_map():
    assert code_files({"AutoTokenizer": ["tok.SlowTok", None], "AutoConfig": "org/repo--conf.C"}) == [
        "org/repo--conf.py", "tok.py"]
