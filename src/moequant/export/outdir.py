"""Everything moequant keeps next to an output directory ``<parent>/<name>`` (same file system: moves are renames).

    .<name>.moequant-lock           held with flock(2) while a run writes <name>; JSON: pid, host, start, command
    .<name>.moequant-tmp-XXXXXXXX   the checkpoint being assembled (``writer.write_checkpoint``)
    .<name>.moequant-old-XXXXXXXX   the replaced checkpoint, for the instant of an overwrite
    .<name>.moequant-partial        the journal of a streamed run (``journal.py``)

One run per output (``output_lock``): a second run on the same output fails at once with one line naming the
lock file and the pid that holds it. The kernel drops an flock when its holder dies, so the file of a killed
run (SIGKILL, power loss) never blocks: the next run locks it again. A run releases the lock and removes the
file on exit, on error and on Ctrl-C. Taking the lock again in the same thread nests (the streamed path holds it
from its journal to the final write); another thread of the same process is refused like another process.
Whoever takes the lock first removes the ``-tmp-`` directories of that output: every run that makes one holds
the lock while it lives, so under the lock they are leftovers of killed runs. An ``-old-`` directory is a killed
overwrite's too: next to the output it is the replaced checkpoint (killed while removing it, which takes seconds
for hundreds of GB) and is removed; with no output beside it the run died between its two renames, so it is the
user's previous checkpoint and is renamed back. Other outputs' are never touched.

Permissions: temporary directories are made with ``mkdir(0o777)``, so the moved checkpoint has the mode ``mkdir``
gives under the user's umask (``tempfile.mkdtemp`` would give 0700: a server running as another user could not
read it). Files inside are created with ``open``, which applies the umask too.

OS errors while writing (``reported_os_errors``): no space, quota, read-only file system, permission denied
become one ``ExportError`` line naming the output, the file, the cause and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from moequant.export.errors import ExportError


class OutputLocked(ExportError):
    """Another run holds the output's lock."""


def lock_path(out_dir: Path) -> Path:
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.moequant-lock"


def sibling_name(out_dir: Path, kind: str) -> Path:
    """``.<name>.moequant-<kind>-XXXXXXXX`` next to ``out_dir`` (8 random hex digits; not created)."""
    return out_dir.parent / f".{out_dir.name}.moequant-{kind}-{secrets.token_hex(4)}"


def sibling_dir(out_dir: Path, kind: str) -> Path:
    """A new empty sibling directory with the mode ``mkdir`` gives under the umask."""
    while True:
        path = sibling_name(out_dir, kind)
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:   # 2^32 names: another try finds a free one
            continue


_HELD: dict[Path, list] = {}     # lock files this process holds: path -> [(pid, thread), depth]
_GUARD = threading.Lock()


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike):
    """Hold the lock of ``out_dir`` for the ``with`` block (see the module docstring); raises ``OutputLocked``."""
    out_dir = Path(out_dir).absolute()
    path, me = lock_path(out_dir), (os.getpid(), threading.get_ident())
    with _GUARD:
        held = _HELD.get(path)
        if held is not None and held[0][0] != me[0]:
            held = None   # inherited through fork(): the parent's lock; flock below refuses the child
        if held is not None and held[0] != me:
            raise OutputLocked(f"{out_dir} is being written by another thread of this process (pid {me[0]}); "
                               f"wait for it or choose another output directory (-o); lock file: {path}")
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield path
        finally:
            with _GUARD:
                held[1] -= 1
        return
    with reported_os_errors(out_dir):
        fd = _acquire(path, out_dir)
    try:
        with _GUARD:
            _HELD[path] = [me, 1]
        with reported_os_errors(out_dir):
            _remove_leftovers(out_dir)
        yield path
    finally:
        with _GUARD:
            _HELD.pop(path, None)
        _release(path, fd)


def _acquire(path: Path, out_dir: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        locked = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise OutputLocked(_locked_line(out_dir, path, _holder(fd))) from None
        finally:
            if not locked:
                os.close(fd)
        if _is_current(path, fd):
            break
        os.close(fd)   # its holder removed the file between our open and our flock: lock the new one
    command = " ".join(sys.argv)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command if len(command) <= 200 else command[:197] + "..."}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
    return fd


def _release(path: Path, fd: int) -> None:
    try:
        if _is_current(path, fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)       # while still locked: a run that opened this file sees it is stale
    finally:
        os.close(fd)


def _is_current(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:   # its holder is writing it right now
        return {}
    return info if isinstance(info, dict) else {}


def _locked_line(out_dir: Path, path: Path, holder: dict) -> str:
    if "pid" not in holder:
        who = "a run that is starting (pid not written yet)"
    else:
        who = (f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('started', '?')}: "
               f"{holder.get('command', '?')}")
    return (f"{out_dir} is being written by another moequant run ({who}); wait for it to finish or choose "
            f"another output directory (-o); lock file: {path}")


def _remove_leftovers(out_dir: Path) -> list[Path]:
    """Killed runs' ``-tmp-`` (final assembly) and ``-old-`` (replaced checkpoint) directories of ``out_dir``, see
    the module docstring; called under its lock. Returns those removed."""
    def leftovers(kind: str) -> list[Path]:
        pattern = re.compile(re.escape(f".{out_dir.name}.moequant-{kind}-") + r"[0-9a-z_]{8}")
        return [Path(e.path) for e in os.scandir(out_dir.parent)
                if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]

    old = leftovers("old")
    if len(old) == 1 and not os.path.lexists(out_dir):
        os.rename(old.pop(), out_dir)   # the overwrite never finished: the previous checkpoint goes back
    removed = leftovers("tmp") + (old if os.path.lexists(out_dir) else [])
    for path in removed:
        shutil.rmtree(path)
    return removed


# errno -> (what happened, what to do)
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free space there or choose another output directory (-o)"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or choose another output directory (-o)"),
    errno.EROFS: ("read-only file system", "choose an output directory (-o) on a writable file system"),
    errno.EACCES: ("permission denied", "choose an output directory (-o) you can write to"),
    errno.EPERM: ("operation not permitted", "choose an output directory (-o) you can write to"),
    errno.ENOLCK: ("file locks are not available", "choose an output directory (-o) on a local file system"),
}


@contextlib.contextmanager
def reported_os_errors(out_dir: Path, need_bytes: int | None = None):
    """Turn the OS errors of ``_CAUSES`` raised in the block into one ``ExportError`` line (the cause kept)."""
    try:
        yield
    except OSError as err:
        if err.errno not in _CAUSES:
            raise
        raise ExportError(os_error_line(err, Path(out_dir), need_bytes)) from err


def os_error_line(err: OSError, out_dir: Path, need_bytes: int | None = None) -> str:
    cause, fix = _CAUSES[err.errno]
    where = f" while writing {err.filename}" if err.filename else ""
    space = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(out_dir)
        space = f" ({human_bytes(free)} free there" + (f", the checkpoint needs {human_bytes(need_bytes)})"
                                                        if need_bytes else ")")
    return f"{out_dir}: {cause}{where}{space}; {fix}"


def free_bytes(out_dir: Path) -> int:
    """Free bytes on the file system that holds (or will hold) ``out_dir``."""
    folder = Path(out_dir).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(out_dir: Path, need_bytes: int) -> None:
    """Refuse up front when the file system of ``out_dir`` has less free space than the checkpoint needs."""
    free = free_bytes(out_dir)
    if free < need_bytes:
        raise ExportError(f"{out_dir}: the checkpoint needs {human_bytes(need_bytes)} but only {human_bytes(free)} "
                          "are free on that file system; free space there or choose another output directory (-o)")


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
