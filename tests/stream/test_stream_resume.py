"""Kill a streamed run after layer 1 (of 3), run it again: it continues, and the bytes equal an uninterrupted run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from model_dirs import save_model_dir

from moequant.calibration_data import load_tokenizer
from moequant.journal import JournalMismatch, partial_dir
from moequant.recipe import load_recipe
from moequant.layers.sinks import KILL_AFTER_LAYER_ENV
from moequant.layers.streamed import quantize_streamed

RECIPE = {"kv_cache": "fp8", "calibration": {"samples": 4, "seq_len": 32}}
CHILD = """
import sys
from moequant.calibration_data import load_tokenizer
from moequant.recipe import load_recipe
from moequant.layers.streamed import quantize_streamed
src, out, smoothing = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
rec = load_recipe("nvfp4-mse", kv_cache="fp8", calibration={"samples": 4, "seq_len": 32},
                  smoothing={"enabled": smoothing, "down": True})
quantize_streamed(src, out, rec, "modelopt", tokenizer=load_tokenizer(src), max_shard_bytes=40_000)
"""


def files_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("deepseek"), "deepseek_v3")   # 3 layers, dense + MoE


def _killed_run(src: Path, out: Path, smoothing: bool = False) -> None:
    env = {**os.environ, KILL_AFTER_LAYER_ENV: "1"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(int(smoothing))], env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert not out.exists()
    journal = (partial_dir(out) / "journal.json").read_text()
    assert '"layer-00001"' in journal and '"layer-00002"' not in journal


@pytest.mark.parametrize("smoothing", [False, True])   # smoothing: factors journaled, replay of unsmoothed layers
def test_kill_and_resume_is_byte_identical(src, tmp_path, smoothing):
    rec = load_recipe("nvfp4-mse", **RECIPE, smoothing={"enabled": smoothing, "down": True})
    _killed_run(src, tmp_path / "resumed", smoothing)
    resumed = quantize_streamed(src, tmp_path / "resumed", rec, "modelopt", tokenizer=load_tokenizer(src),
                                max_shard_bytes=40_000)
    assert any("resumed: 2 decoder layer(s)" in n for n in resumed.report.notes)
    assert not partial_dir(tmp_path / "resumed").exists()
    quantize_streamed(src, tmp_path / "fresh", rec, "modelopt", tokenizer=load_tokenizer(src), max_shard_bytes=40_000)
    fresh, again = files_bytes(tmp_path / "fresh"), files_bytes(tmp_path / "resumed")
    assert ("moequant_smoothing/factors.safetensors" in fresh) == smoothing
    assert sorted(fresh) == sorted(again)
    for name in fresh:
        assert fresh[name] == again[name], name
    assert len(resumed.report.coverage) == 2   # the coverage records of journaled layers come back too


def test_journal_of_another_recipe_is_refused(src, tmp_path):
    out = tmp_path / "out"
    _killed_run(src, out)
    other = load_recipe("nvfp4", **RECIPE)
    with pytest.raises(JournalMismatch, match=r"different recipe.*--overwrite.*delete"):
        quantize_streamed(src, out, other, "modelopt", tokenizer=load_tokenizer(src), max_shard_bytes=40_000)
    assert (partial_dir(out) / "journal.json").is_file()          # refused: left as it was
    result = quantize_streamed(src, out, other, "modelopt", tokenizer=load_tokenizer(src), overwrite=True)
    assert not any("resumed" in n for n in result.report.notes)   # started over
    assert (out / "config.json").is_file() and not partial_dir(out).exists()
