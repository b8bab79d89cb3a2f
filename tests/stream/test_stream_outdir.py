"""``moequant quantize`` and its output's neighbourhood: two runs on one -o, a disk that fills up while journaling,
the modes a server running as another user needs."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from outdir_helpers import Holder

from moequant import journal
from moequant.cli import main
from moequant.export import ExportError, writer
from moequant.export.outdir import lock_path
from moequant.journal import partial_dir
from moequant.layers import streamed

FAST = ["--samples", "4", "--seq-len", "32", "--device", "cpu", "--quiet", "--kv-cache", "fp8"]
# a real `moequant quantize` that pauses after journaling its first part until the file <gate>/go exists
GATED = """
import sys, time
from pathlib import Path
from moequant import journal
from moequant.cli import main
gate, commit = Path(sys.argv[1]), journal.Journal.commit
def paused(self, part, files):
    commit(self, part, files)
    (gate / "ready").touch()
    for _ in range(3000):
        if (gate / "go").exists():
            break
        time.sleep(0.1)
journal.Journal.commit = paused
sys.exit(main(sys.argv[2:]))
"""


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    for _ in range(3000):
        if path.exists():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_a_second_run_on_the_same_output_fails_at_once_and_the_first_finishes(model_dir, tmp_path):
    src, out, gate = model_dir("qwen2_moe"), tmp_path / "out", tmp_path / "gate"
    gate.mkdir()
    args = ["quantize", str(src), "-o", str(out), *FAST]
    old = os.umask(0o022)
    try:
        first = subprocess.Popen([sys.executable, "-c", GATED, str(gate), *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    finally:
        os.umask(old)
    try:
        _wait_for(gate / "ready", first)
        second = subprocess.run([sys.executable, "-m", "moequant.cli", *args], capture_output=True, text=True,
                                timeout=300, check=False)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"moequant: error: {out} is being written"), second.stderr
        assert f"pid {first.pid} " in lines[0] and f"lock file: {lock_path(out)}" in lines[0]
    finally:
        (gate / "go").touch()
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert "verify              OK" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate", "out"]   # no lock, journal or tmp left
    # made under umask 022: a server running as another user reads it
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert {"report.html", "tokenizer.json", "config.json"} <= {p.name for p in out.iterdir()}


def test_the_in_memory_path_is_refused_before_loading_the_model(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    loaded = []
    monkeypatch.setattr("moequant.quantize_command.load_model", lambda *a: loaded.append(a))
    holder = Holder(out)
    try:
        assert main(["quantize", str(model_dir("qwen2_moe")), "-o", str(out), "--no-stream", *FAST]) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {holder.proc.pid} " in err and str(lock_path(out)) in err
    assert loaded == [] and list(tmp_path.iterdir()) == []


def test_disk_full_while_journaling_is_one_line_and_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    """The streamed path writes each finished layer into its journal: no space there is the same one line as in
    the final write, and the journal goes (an error, not a kill: nothing to resume)."""
    def full_at_layer_1(path, mode="r", *args, **kwargs):
        if "layer-00001" in str(path) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))   # ENOSPC, as open(2) on a full disk names the file
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(writer, "open", full_at_layer_1, raising=False)
    journaled = []
    write = journal.Journal.write
    monkeypatch.setattr(journal.Journal, "write", lambda self, part, *a: (journaled.append(part),
                                                                          write(self, part, *a))[1])
    out, src = tmp_path / "out", model_dir("qwen2_moe")
    capsys.readouterr()   # what building the fixture printed
    assert main(["quantize", str(src), "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"moequant: error: {out}: no space left on device while writing ")
    assert f"{partial_dir(out).name}/part-layer-00001-000.safetensors" in err and "(-o)" in err
    assert journaled == ["rest", "layer-00000", "layer-00001"]
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_put_back_under_the_lock_is_refused_before_any_layer(model_dir, tmp_path, monkeypatch):
    """A killed overwrite left the previous checkpoint as -old- and no output: the run's lock puts it back, and
    the run refuses to replace it without overwrite before computing anything."""
    out = tmp_path / "out"
    old = tmp_path / ".out.moequant-old-0a1b2c3d"
    old.mkdir()
    (old / "model-00001-of-00001.safetensors").write_bytes(b"previous")
    monkeypatch.setattr(streamed, "_stream", lambda *a, **k: pytest.fail("computed before the target was checked"))
    with pytest.raises(ExportError, match="exists and is not empty"):
        streamed.quantize_streamed(model_dir("qwen2_moe"), out, "nvfp4-w4a16")
    assert (out / "model-00001-of-00001.safetensors").read_bytes() == b"previous"
    assert not old.exists() and not partial_dir(out).exists()
