"""Helpers for the tests of what lies next to an output: another process holding its lock, a disk that fills up."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

HOLDER = """
import sys
from pathlib import Path
from moequant.export.outdir import output_lock, sibling_dir
out = Path(sys.argv[1])
with output_lock(out):
    if sys.argv[2:] == ["assembling"]:   # a live run in its final assembly
        (sibling_dir(out, "tmp") / "model-00001-of-00002.safetensors").write_bytes(b"half")
    print("locked", flush=True)
    sys.stdin.readline()
"""


class Holder:
    """Another process holding the lock of ``out`` until ``release()`` (or killed)."""

    def __init__(self, out: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line == "locked\n", self.proc.stderr.read()

    def release(self) -> None:
        self.proc.communicate("\n", timeout=60)
        assert self.proc.returncode == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=60)


class FullDisk:
    """``open`` for the writer whose files accept ``budget`` bytes in all, then fail as the OS does."""

    def __init__(self, budget: int, code: int = errno.ENOSPC):
        self.budget, self.code = budget, code

    def __call__(self, path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)
        disk = self

        class File:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

            def write(self, data):
                size = memoryview(data).nbytes
                if size > disk.budget:
                    raise OSError(disk.code, os.strerror(disk.code))   # write(2) names no file
                disk.budget -= size
                return real.write(data)

        return File()
