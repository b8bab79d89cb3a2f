"""Each user error: one line on stderr saying what is wrong and what to do, exit 2, no output directory."""

import json
import shutil

import pytest
import torch

from moequant.cli import main

FAST = ["--samples", "2", "--seq-len", "16", "--device", "cpu", "--quiet"]


def _run_error(argv, capsys, out=None) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: fixtures' own progress output
    assert code == 2
    assert err.startswith("moequant: error:") and "Traceback" not in err
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*"))  # no temp leftovers either
    return err


def test_missing_directory(tmp_path, capsys):
    err = _run_error(["quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), *FAST], capsys, tmp_path / "out")
    assert "not a directory" in err


def test_not_a_hf_directory(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    err = _run_error(["quantize", str(tmp_path / "src"), "-o", str(tmp_path / "out"), *FAST], capsys, tmp_path / "out")
    assert "no config.json" in err


def test_unsupported_architecture(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "architectures": ["NoSuch"]}))
    err = _run_error(["quantize", str(src), "-o", str(tmp_path / "out"), *FAST], capsys, tmp_path / "out")
    assert "architecture" in err


def test_recipe_typo(model_dir, tmp_path, capsys):
    err = _run_error(["quantize", str(model_dir("mixtral")), "-o", str(tmp_path / "out"), "--recipe", "nvfp4-mes",
                      *FAST], capsys, tmp_path / "out")
    assert "nvfp4-mes" in err and "nvfp4-mse" in err


def test_output_exists(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    err = _run_error(["quantize", str(model_dir("mixtral")), "-o", str(out), *FAST], capsys)
    assert "--overwrite" in err and (out / "keep.txt").read_text() == "user data"


def test_truncated_safetensors(model_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(model_dir("mixtral"), src)
    shard = next(src.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = _run_error(["quantize", str(src), "-o", str(tmp_path / "out"), *FAST], capsys, tmp_path / "out")
    assert "safetensors" in err


def test_nan_weight(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(model_dir("mixtral"), src)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("self_attn.o_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    err = _run_error(["quantize", str(src), "-o", str(tmp_path / "out"), *FAST], capsys, tmp_path / "out")
    assert name in err and "NaN" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(model_dir, tmp_path, capsys):
    argv = ["quantize", str(model_dir("mixtral")), "-o", str(tmp_path / "out"), "--samples", "2", "--seq-len", "16",
            "--device", "cuda", "--quiet"]
    err = _run_error(argv, capsys, tmp_path / "out")
    assert "CUDA" in err and "--device cpu" in err


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception, match="not a directory"):
        main(["--debug", "quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
