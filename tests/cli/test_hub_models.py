"""`moequant quantize ORG/NAME`: a hub id is read from huggingface_hub's cache, offline, like a directory."""

from __future__ import annotations

import json
import shutil

from moequant.cli import main

FAST = ["--samples", "2", "--seq-len", "16", "--device", "cpu", "--quiet"]


def test_quantize_a_hub_id_reads_the_cached_snapshot(model_dir, tmp_path, offline_hub, monkeypatch, capsys):
    """The checkpoint is made from the snapshot (its own generation config is copied byte for byte), is named
    after the repository by default, and `verify --reference` takes the same hub id."""
    repo = tmp_path / "repo"
    shutil.copytree(model_dir("mixtral"), repo)
    generation = json.loads((repo / "generation_config.json").read_text())
    (repo / "generation_config.json").write_text(json.dumps({**generation, "max_length": 4321}))
    snapshot = offline_hub("tiny-org/tiny-moe", repo)
    shutil.rmtree(repo)   # the snapshot is the only copy left
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "tiny-org/tiny-moe", *FAST]) == 0
    out = tmp_path / "tiny-moe-nvfp4-mse"
    assert f"output              {out}" in capsys.readouterr().out
    assert (out / "generation_config.json").read_bytes() == (snapshot / "generation_config.json").read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["max_length"] == 4321
    assert main(["verify", str(out), "--reference", "tiny-org/tiny-moe", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["errors"]["per_tensor"]   # the weights were compared with the snapshot's


def test_inspect_and_eval_take_a_hub_id(model_dir, tmp_path, offline_hub, heldout, capsys):
    offline_hub("tiny-org/tiny-moe", model_dir("mixtral"))
    assert main(["inspect", "tiny-org/tiny-moe"]) == 0
    assert "MixtralForCausalLM" in capsys.readouterr().out
    assert main(["eval", "tiny-org/tiny-moe", "--data", str(heldout), "--windows", "1", "--seq-len", "16",
                 "--device", "cpu", "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
