"""A model's own Python code (``auto_map``) runs only with --trust-remote-code; never a prompt on stdin.

The model directory's .py writes a marker file when imported: the marker is the proof that its code ran.
"""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from model_dirs import custom_code_model
from moequant.cli import main
from moequant.calibration_data import CalibrationDataError, load_tokenizer

FAST = ["--samples", "2", "--seq-len", "16", "--device", "cpu", "--quiet"]


class _ClosedStdin(io.StringIO):
    def __init__(self):
        super().__init__()
        self.close()


@pytest.mark.parametrize("stdin", [lambda: io.StringIO("y\ny\ny\n"), _ClosedStdin], ids=["yes-on-stdin", "closed"])
@pytest.mark.parametrize("command", ["quantize", "eval", "inspect"])
def test_custom_code_without_the_flag_is_one_line_and_never_runs(command, stdin, model_dir, heldout, tmp_path,
                                                                 capfd, monkeypatch):
    marker = tmp_path / "ran.txt"
    src = custom_code_model(tmp_path / "src", model_dir("mixtral"), marker)
    monkeypatch.setattr(sys, "stdin", stdin())
    argv = {"quantize": ["quantize", str(src), "-o", str(tmp_path / "out"), *FAST],
            "eval": ["eval", str(src), "--data", str(heldout), "--windows", "1", "--seq-len", "16", "--device", "cpu"],
            "inspect": ["inspect", str(src)]}[command]
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"moequant: error: {src}: config.json's auto_map loads custom code "
                                               "(custom_moe.py)")
    assert err[0].endswith("pass --trust-remote-code (trust_remote_code=True) if you trust that code")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies trusted code into its modules cache and imports it from there: keep it in tmp_path."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def test_with_the_flag_the_code_runs(model_dir, tmp_path, modules_cache, capsys):
    """The positive control: the same directory with --trust-remote-code imports custom_moe.py."""
    marker = tmp_path / "ran.txt"
    src = custom_code_model(tmp_path / "src", model_dir("mixtral"), marker)
    assert main(["inspect", str(src), "--trust-remote-code"]) == 0
    assert marker.exists()
    assert "(CustomForCausalLM)" in capsys.readouterr().out


def test_a_model_type_transformers_knows_loads_its_own_class_and_no_code(model_dir, tmp_path, capsys):
    """An auto_map next to a model_type transformers implements (DeepSeek-V3's official config has one):
    transformers' class is used, the directory's code never runs, no flag needed."""
    marker = tmp_path / "ran.txt"
    src = custom_code_model(tmp_path / "src", model_dir("mixtral"), marker, model_type="mixtral")
    assert main(["inspect", str(src)]) == 0
    assert "(MixtralForCausalLM)" in capsys.readouterr().out
    assert not marker.exists()


def test_a_tokenizer_with_custom_code_never_runs_it_without_the_flag(model_dir, tmp_path):
    """tokenizer_config.json's auto_map: with a tokenizer.json transformers' own backend reads it and the code
    never runs; without one, only the code could load it: one error saying to pass the flag."""
    marker = tmp_path / "ran.txt"
    src = tmp_path / "src"
    shutil.copytree(model_dir("mixtral"), src)
    (src / "custom_tok.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": ["custom_tok.CustomTokenizer", None]})
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    assert type(load_tokenizer(src)).__name__ == "TokenizersBackend"
    (src / "tokenizer.json").unlink()
    with pytest.raises(CalibrationDataError) as err:
        load_tokenizer(src)
    assert str(err.value) == (f"{src}: the tokenizer needs custom code from the model directory "
                              "(tokenizer_config.json auto_map); pass --trust-remote-code (trust_remote_code=True) "
                              "if you trust that code")
    assert not marker.exists()
