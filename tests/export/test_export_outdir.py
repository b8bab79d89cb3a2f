"""Next to the output: permissions under the umask, one run per output (the lock), leftovers of killed runs, and
OS errors (disk full, ...) as one line with nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading

import pytest
import torch

from outdir_helpers import FullDisk, Holder

from moequant.export import ExportError, TensorSpec, hf_files, outdir, writer
from moequant.export.outdir import OutputLocked, lock_path, output_lock
from moequant.export.writer import INDEX_NAME, write_checkpoint

def _specs(n_tensors=4, n=100):
    return [TensorSpec(f"t{i}", (n,), torch.float32, lambda i=i: torch.full((n,), float(i)))
            for i in range(n_tensors)]


def _no_extras(_tmp):
    return None


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_gets_the_modes_mkdir_and_open_give_under_the_umask(tmp_path, umask):
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    os.chmod(source / "tokenizer.json", 0o600)   # copied files take the umask's mode too, not their source's
    old = os.umask(umask)
    try:
        out = write_checkpoint(tmp_path / "parent" / "ckpt", [_specs()], lambda tmp: hf_files.copy_source_files(
            source, tmp), max_shard_bytes=800)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = sorted(p.name for p in out.iterdir())
    assert "tokenizer.json" in files and INDEX_NAME in files and len(files) == 4
    for name in files:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


def test_the_lock_is_held_while_writing_and_removed_after(tmp_path):
    out = tmp_path / "ckpt"
    seen = {}

    def extras(_tmp):
        seen.update(json.loads(lock_path(out).read_text()))

    write_checkpoint(out, [_specs()], extras)
    assert seen["pid"] == os.getpid() and seen["host"] and seen["command"] and seen["started"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_the_lock_file_goes_on_error_and_ctrl_c(tmp_path, error):
    with pytest.raises(type(error)):
        with output_lock(tmp_path / "ckpt"):
            assert lock_path(tmp_path / "ckpt").is_file()
            raise error
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_is_refused_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "ckpt"
    holder = Holder(out)
    try:
        with pytest.raises(OutputLocked) as refused:
            write_checkpoint(out, [_specs()], _no_extras)
        message = str(refused.value)
        assert "\n" not in message and f"pid {holder.proc.pid} " in message and str(lock_path(out)) in message
        assert sorted(p.name for p in tmp_path.iterdir()) == [lock_path(out).name]   # nothing written
    finally:
        holder.release()
    assert list(tmp_path.iterdir()) == []
    write_checkpoint(out, [_specs()], _no_extras)   # released: the next run goes ahead


def test_a_killed_holders_lock_does_not_block(tmp_path):
    out = tmp_path / "ckpt"
    Holder(out).kill()
    assert lock_path(out).is_file()                      # the file stays, the kernel dropped the flock
    write_checkpoint(out, [_specs()], _no_extras)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_same_thread_nests_another_thread_is_refused(tmp_path):
    out = tmp_path / "ckpt"
    errors = []

    def other_thread():
        try:
            with output_lock(out):
                pass
        except OutputLocked as err:
            errors.append(str(err))

    with output_lock(out):
        write_checkpoint(out, [_specs()], _no_extras)      # nested: the streamed path's final write
        assert lock_path(out).is_file()                  # still held by the outer block
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another thread of this process" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_forked_child_does_not_inherit_the_lock(tmp_path):
    out = tmp_path / "ckpt"
    with output_lock(out):
        pid = os.fork()
        if pid == 0:   # the child: refused, naming its parent
            code = 1
            try:
                with output_lock(out):
                    code = 3
            except OutputLocked as err:
                code = 0 if f"pid {os.getppid()} " in str(err) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_this_output_are_removed_others_are_not(tmp_path):
    out = tmp_path / "ckpt"
    leftover = tmp_path / ".ckpt.moequant-tmp-0a1b2c3d"   # a run killed during its final assembly
    others = [tmp_path / ".ckpt2.moequant-tmp-0a1b2c3d", tmp_path / ".other.moequant-tmp-0a1b2c3d",
              tmp_path / ".ckpt.moequant-partial"]        # another output's; this output's journal (resume)
    for folder in [leftover, *others]:
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"half")
    write_checkpoint(out, [_specs()], _no_extras)
    assert not leftover.exists()
    assert all((f / "model-00001-of-00002.safetensors").read_bytes() == b"half" for f in others)


def test_a_killed_overwrites_old_checkpoint_is_removed_or_put_back(tmp_path):
    out = tmp_path / "ckpt"
    old = tmp_path / ".ckpt.moequant-old-0a1b2c3d"   # killed while removing the checkpoint it replaced
    other = tmp_path / ".ckpt2.moequant-old-0a1b2c3d"
    for folder in (out, old, other):
        folder.mkdir()
        (folder / "model-00001-of-00001.safetensors").write_bytes(b"previous")
    write_checkpoint(out, [_specs()], _no_extras, overwrite=True)
    assert not old.exists() and (other / "model-00001-of-00001.safetensors").read_bytes() == b"previous"
    assert (out / INDEX_NAME).is_file()

    # killed between the two renames: the output is gone and -old- holds the user's previous checkpoint
    previous = tmp_path / ".gone.moequant-old-0a1b2c3d"
    previous.mkdir()
    (previous / "model-00001-of-00001.safetensors").write_bytes(b"previous")
    with pytest.raises(ExportError, match="exists and is not empty"):
        write_checkpoint(tmp_path / "gone", [_specs()], _no_extras)   # put back first, so not overwritten
    assert (tmp_path / "gone" / "model-00001-of-00001.safetensors").read_bytes() == b"previous"
    assert not previous.exists()


def test_a_live_runs_temporary_directory_is_not_touched(tmp_path):
    out = tmp_path / "ckpt"
    holder = Holder(out, "assembling")
    try:
        (live,) = tmp_path.glob(".ckpt.moequant-tmp-*")
        with pytest.raises(OutputLocked):
            write_checkpoint(out, [_specs()], _no_extras)
        assert (live / "model-00001-of-00002.safetensors").read_bytes() == b"half"
    finally:
        holder.release()   # exits without cleaning up, as a killed assembly would
    write_checkpoint(out, [_specs()], _no_extras)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EDQUOT, "disk quota exceeded"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_an_os_error_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, code, cause):
    monkeypatch.setattr(writer, "open", FullDisk(1000, code), raising=False)
    out = tmp_path / "ckpt"
    with pytest.raises(ExportError) as failed:
        write_checkpoint(out, [_specs()], _no_extras, max_shard_bytes=800)   # 2 shards of 800 bytes + headers
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"{out}: {cause} while writing ")
    assert "model-00002-of-00002.safetensors" in message and "(-o)" in message
    if code == errno.ENOSPC:
        assert "free there, the checkpoint needs 1.6 kB" in message
    assert isinstance(failed.value.__cause__, OSError) and failed.value.__cause__.errno == code
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_are_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "open", FullDisk(1000, errno.EIO), raising=False)
    with pytest.raises(OSError) as failed:
        write_checkpoint(tmp_path / "ckpt", [_specs()], _no_extras, max_shard_bytes=800)
    assert failed.value.errno == errno.EIO and not isinstance(failed.value, ExportError)
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    usage = outdir.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    out = tmp_path / "ckpt"
    with pytest.raises(ExportError, match=r"needs 1\.6 kB but only 1\.0 kB are free .*choose another output"):
        write_checkpoint(out, [_specs()], _no_extras)
    assert list(tmp_path.iterdir()) == []
