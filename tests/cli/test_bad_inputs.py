"""The corpus of bad inputs: each ends in exactly one line on stderr naming the file (or id) and the fix, an exit
code != 0, no traceback, and nothing written, removed or changed anywhere under the test's folder (no output,
no ``.moequant-partial`` / ``-tmp`` directory, the source model byte for byte as it was).

Each row: (name, how to build the bad input in tmp_path, argv, substrings the one line must hold). ``{tmp}``,
``{src}`` (a fresh copy of a tiny Mixtral model) and ``{out}`` are filled in; quantize gets the fast options.
Every row runs with an offline, empty Hugging Face cache: a reference that looks like a hub id never
reaches the network.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from model_dirs import custom_code_model, tree_state
from moequant.cli import main

FAST = ("--samples", "2", "--seq-len", "16", "--device", "cpu", "--quiet")


def _nothing(tmp: Path, src: Path) -> None:
    pass


def _write(name: str, data: str | bytes) -> Callable[[Path, Path], None]:
    """Write ``data`` to ``name`` (relative to tmp; ``src/...`` lands in the model copy)."""
    def build(tmp: Path, src: Path) -> None:
        path = tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return build


def _remove_config(tmp: Path, src: Path) -> None:
    (src / "config.json").unlink()


def _model_type(tmp: Path, src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))


def _truncate_shard(tmp: Path, src: Path) -> None:
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _custom_code(tmp: Path, src: Path) -> None:
    plain = src.rename(tmp / "plain")
    custom_code_model(src, plain, tmp / "code-ran.txt")
    shutil.rmtree(plain)


@dataclass(frozen=True)
class Row:
    name: str
    build: Callable[[Path, Path], None]
    argv: tuple[str, ...]
    expect: tuple[str, ...]


Q = ("quantize", "{src}", "-o", "{out}")
ROWS = [
    Row("missing model dir", _nothing, ("quantize", "{tmp}/absent", "-o", "{out}"),
        ("{tmp}/absent is not a directory",)),
    Row("dir without config.json", _remove_config, Q, ("{src} has no config.json",)),
    Row("unknown model_type", _model_type, Q, ("{src}: architecture model_type='no_such_arch' is unknown",)),
    Row("truncated safetensors shard", _truncate_shard, Q, ("{src}/model.safetensors", "re-download")),
    Row("config.json that is not JSON", _write("src/config.json", '{"model_type": "mixtral",'), Q,
        ("{src}/config.json is not valid JSON", "line 1")),
    Row("config.json that is not JSON (inspect)", _write("src/config.json", "model_type: mixtral"),
        ("inspect", "{src}"), ("{src}/config.json is not valid JSON",)),
    Row("auto_map without the flag", _custom_code, Q,
        ("{src}: config.json's auto_map loads custom code (custom_moe.py)", "pass --trust-remote-code")),
    Row("-o is the model dir (with --overwrite)", _nothing, ("quantize", "{src}", "-o", "{src}", "--overwrite"),
        ("output {src} is the model directory {src}",)),
    Row("-o contains the model dir (with --overwrite)", _nothing, ("quantize", "{src}", "-o", "{tmp}", "--overwrite"),
        ("output {tmp} contains the model directory {src}",)),
    Row("-o is a file", _write("out.txt", "keep me"), ("quantize", "{src}", "-o", "{tmp}/out.txt"),
        ("output {tmp}/out.txt exists and is not a directory",)),
    Row("-o under a file", _write("out.txt", "keep me"), ("quantize", "{src}", "-o", "{tmp}/out.txt/q"),
        ("{tmp}/out.txt is a file, not a directory",)),
    Row("bad recipe key", _write("r.yaml", "weights:\n  methd: mse\n"), (*Q, "--recipe", "{tmp}/r.yaml"),
        ("{tmp}/r.yaml", "unknown key 'weights.methd'")),
    Row("recipe file missing", _nothing, (*Q, "--recipe", "{tmp}/absent.yaml"),
        ("recipe file {tmp}/absent.yaml does not exist",)),
    Row("calibration file missing", _nothing, (*Q, "--calib", "{tmp}/absent.txt"),
        ("calibration text file {tmp}/absent.txt does not exist",)),
    Row("calibration file empty", _write("empty.txt", " \n"), (*Q, "--calib", "{tmp}/empty.txt"),
        ("calibration text file {tmp}/empty.txt is empty",)),
    Row("hub id not in the cache, offline", _nothing, ("quantize", "nobody/absent-model", "-o", "{out}"),
        ("nobody/absent-model: no local directory", "download it", "unset HF_HUB_OFFLINE")),
    Row("--revision with a local dir", _nothing, (*Q, "--revision", "v2"),
        ("--revision v2 applies to hub ids, but {src} is a local directory",)),
    Row("verify --reference hub id not in the cache", _nothing,
        ("verify", "{src}", "--reference", "nobody/absent-model"), ("nobody/absent-model: no local directory",)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row: Row, model_dir, tmp_path, offline_hub, capfd):
    src = tmp_path / "src"
    shutil.copytree(model_dir("mixtral"), src)
    row.build(tmp_path, src)
    fill = {"tmp": tmp_path, "src": src, "out": tmp_path / "out"}
    argv = [a.format(**fill) for a in row.argv] + (list(FAST) if row.argv[0] == "quantize" else [])
    before = tree_state(tmp_path)
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moequant: error: "), err
    assert "Traceback" not in err
    for want in row.expect:
        assert want.format(**fill) in lines[0]
    assert tree_state(tmp_path) == before   # no output, no partial/tmp directory, the inputs as they were
    assert not (tmp_path / "code-ran.txt").exists()
