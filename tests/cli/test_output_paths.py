"""-o is never the model directory, a folder inside it or one that contains it (symlinks resolved), even with
--overwrite; an -o that is a file is one line. The source model is never touched."""

from __future__ import annotations

import shutil

import pytest

from model_dirs import tree_state
from moequant.cli import main
from moequant.export.writer import ExportError, write_checkpoint
from moequant.layers.streamed import quantize_streamed

FAST = ["--samples", "2", "--seq-len", "16", "--device", "cpu", "--quiet"]


@pytest.fixture
def src(model_dir, tmp_path):
    folder = tmp_path / "models" / "src"
    shutil.copytree(model_dir("mixtral"), folder)
    return folder


def _refused(argv, tmp_path, capfd) -> str:
    before = tree_state(tmp_path)
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("moequant: error: ")
    assert tree_state(tmp_path) == before   # nothing written, the source byte for byte as it was
    return err[0]


@pytest.mark.parametrize("no_stream", [[], ["--no-stream"]], ids=["stream", "no-stream"])
def test_output_is_the_model_directory(src, tmp_path, capfd, no_stream):
    err = _refused(["quantize", str(src), "-o", str(src), "--overwrite", *FAST, *no_stream], tmp_path, capfd)
    assert f"output {src} is the model directory {src}" in err and "choose an output outside it" in err


def test_output_inside_the_model_directory(src, tmp_path, capfd):
    err = _refused(["quantize", str(src), "-o", str(src / "q"), "--overwrite", *FAST], tmp_path, capfd)
    assert f"output {src / 'q'} is inside the model directory {src}" in err


def test_output_containing_the_model_directory(src, tmp_path, capfd):
    err = _refused(["quantize", str(src), "-o", str(src.parent), "--overwrite", *FAST], tmp_path, capfd)
    assert f"output {src.parent} contains the model directory {src}" in err


def test_output_reaching_the_model_directory_through_a_symlink(src, tmp_path, capfd):
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    err = _refused(["quantize", str(src), "-o", str(link), "--overwrite", *FAST], tmp_path, capfd)
    assert f"output {link} is the model directory {src}" in err
    err = _refused(["quantize", str(link), "-o", str(src / "sub"), "--overwrite", *FAST], tmp_path, capfd)
    assert f"output {src / 'sub'} is inside the model directory {link}" in err


def test_output_is_a_file(src, tmp_path, capfd):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"not yours to replace")
    for extra in ([], ["--overwrite"]):
        err = _refused(["quantize", str(src), "-o", str(target), *FAST, *extra], tmp_path, capfd)
        assert err == f"moequant: error: output {target} exists and is not a directory; choose another output path"


def test_the_writer_refuses_the_source_for_library_callers(src):
    """export() and quantize_streamed() pass their source directory to the writer's check."""
    def no_extras(_tmp):
        raise AssertionError("nothing may be written")

    before = tree_state(src.parent)
    with pytest.raises(ExportError, match="is the model directory"):
        write_checkpoint(src, [], no_extras, overwrite=True, source_dir=src)
    with pytest.raises(ExportError, match="is inside the model directory"):
        write_checkpoint(src / "q", [], no_extras, overwrite=True, source_dir=src)
    with pytest.raises(ExportError, match="contains the model directory"):
        quantize_streamed(src, src.parent, "nvfp4", overwrite=True)
    assert tree_state(src.parent) == before
