"""Per-layer progress of a streamed run, kept next to the output so that a killed run can continue.

Directory ``<parent>/.<output name>.moequant-partial/`` (same filesystem as the output):
    journal.json              {"fingerprint": {...}, "parts": {part: {"files": [...]}}}
    part-<name>.json          the part's shards' tensors: [[[name, dtype, shape], ...], ...]
    part-<name>-<j>.safetensors  the exported tensors of one finished part ("rest" = outside the layers,
                              "layer-00003" = decoder layer 3), written as the checkpoint's own shards
                              (``writer.part_shards``): the final checkpoint links these files, it does not
                              write them again
    part-<name>.pt            what the final report and configs need from that part (scales without the
                              block scales, coverage records, KV scales, backends): small
A part is recorded in journal.json (rewritten atomically with ``os.replace``) only after all of its files are
complete and on the disk (``fsync``ed, with the directory entries naming them), so a kill at any instant, or a
machine that goes down (power, a preempted instance: the page cache is lost, the disk stays), leaves a journal
that lists only whole parts: a resumed run never links a shard whose bytes never reached the disk. The parts are
written by the streamed run's background writer and flushed by a thread of their own, so the flush overlaps
the next part's write and the next layer's compute.

The fingerprint names what the parts depend on: the model files (config.json and index bytes, each shard's
name and size), the resolved recipe, the calibration source, the export format and the moequant version. A
journal whose fingerprint differs is refused, naming the fields that differ and how to start over.

A ``Journal`` holds the output's lock (``export/outdir.py``) from before it reads journal.json until ``close``:
another run on the same output is refused at once instead of moving this run's journal away. An OS error while
journaling (disk full, ...) is one ``ExportError`` line, as in the final write.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import torch

from moequant.export.outdir import output_lock, reported_os_errors
from moequant.export.writer import ExportError, TensorSpec, write_safetensors

JOURNAL = "journal.json"
JOURNAL_LAYOUT = 2   # 2: a part is a list of final shard files
PARTIAL_SUFFIX = ".moequant-partial"


class JournalMismatch(ExportError):
    """An existing journal belongs to another model, recipe, calibration, format or version."""


def partial_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}{PARTIAL_SUFFIX}"


def output_of(directory: Path) -> Path:
    """The output directory whose journal is ``directory`` (``partial_dir``'s inverse)."""
    directory = Path(directory).absolute()
    name = directory.name
    if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)):
        raise ValueError(f"{directory} is not named like a journal (.<output name>{PARTIAL_SUFFIX})")
    return directory.parent / name[1:-len(PARTIAL_SUFFIX)]


def sync_to_disk(path: Path) -> None:
    """``fsync`` a file, or a directory (its entries), so that it survives the machine going down."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def fingerprint(model_dir: Path, shard_files: list[Path], recipe: dict, calib, fmt: str, max_shard_bytes: int) -> dict:
    from moequant import __version__

    calib_id = repr(calib)
    if isinstance(calib, (str, os.PathLike)) and Path(calib).is_file():
        calib_id = f"{Path(calib).name} sha256:{_sha(Path(calib))}"
    return {
        "model": {"config.json": _sha(model_dir / "config.json"),
                  "index": _sha(model_dir / "model.safetensors.index.json"),
                  "shards": {p.name: p.stat().st_size for p in shard_files}},
        "recipe": recipe, "calibration": calib_id, "format": fmt, "moequant": __version__,
        "journal": JOURNAL_LAYOUT, "max_shard_bytes": max_shard_bytes,
    }


class Journal:
    """Finished parts of one streamed run (see the module docstring)."""

    def __init__(self, directory: Path, print_: dict, overwrite: bool):
        self.dir = Path(directory)
        self.out_dir = output_of(self.dir)
        self.fingerprint = json.loads(json.dumps(print_))   # as it reads back from JSON
        self.parts: dict[str, dict] = {}
        self.resumed = False
        with contextlib.ExitStack() as stack, reported_os_errors(self.out_dir):
            stack.enter_context(output_lock(self.out_dir))
            self._open(overwrite)
            self._lock = stack.pop_all()   # held until close(); released above if opening failed

    def _open(self, overwrite: bool) -> None:
        path = self.dir / JOURNAL
        if path.is_file():
            old = json.loads(path.read_text())
            differ = [k for k in sorted(set(old["fingerprint"]) | set(self.fingerprint))
                      if old["fingerprint"].get(k) != self.fingerprint.get(k)]
            if differ and not overwrite:
                then = old["fingerprint"]
                what = "; ".join(f"{k}: {_short(then.get(k))} then, {_short(self.fingerprint.get(k))} now"
                                 for k in differ)
                raise JournalMismatch(
                    f"{self.dir} holds a partial run of a different {' and '.join(differ)} ({what}); rerun with "
                    f"--overwrite to discard it and start over, or delete {self.dir}")
            if differ:
                shutil.rmtree(self.dir)
            else:
                self.parts, self.resumed = old["parts"], bool(old["parts"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save()

    def _save(self) -> None:
        tmp = self.dir / f".{JOURNAL}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "parts": self.parts}, indent=1))
        sync_to_disk(tmp)
        os.replace(tmp, self.dir / JOURNAL)
        sync_to_disk(self.dir)   # the rename itself

    def done(self, part: str) -> bool:
        return part in self.parts

    def record(self, part: str, shards: list[list[TensorSpec]], summary: dict) -> None:
        """``write`` then ``commit`` one finished part."""
        self.commit(part, self.write(part, shards, summary))

    def write(self, part: str, shards: list[list[TensorSpec]], summary: dict) -> list[str]:
        """Write one finished part's files (its shards, as the checkpoint will hold them, its tensor listing and
        its summary); returns its shard files' names. Not in the journal until ``commit``."""
        files = [f"part-{part}-{j:03d}.safetensors" for j in range(len(shards))]
        listing = [[[s.name, str(s.dtype).split(".")[1], list(s.shape)] for s in shard] for shard in shards]
        buffer = io.BytesIO()
        torch.save(summary, buffer)   # into memory: torch's own file writer turns OS errors into RuntimeError
        with reported_os_errors(self.out_dir):
            for file, shard in zip(files, shards):
                write_safetensors(self.dir / file, shard)
            (self.dir / f"part-{part}.json").write_text(json.dumps(listing))
            (self.dir / f"part-{part}.pt").write_bytes(buffer.getvalue())
        return files

    def commit(self, part: str, files: list[str]) -> None:
        """Flush a ``write``-n part to the disk, then list it in the journal (journal.json names the files only:
        rewritten after every part, it stays small). The streamed writer commits part k on a thread of its own
        while it writes part k + 1 (``layers/sinks.Journaled``), so the flush overlaps the next write."""
        with reported_os_errors(self.out_dir):
            for name in [*files, f"part-{part}.json", f"part-{part}.pt"]:
                sync_to_disk(self.dir / name)
            sync_to_disk(self.dir)   # their directory entries, before journal.json names them
            self.parts[part] = {"files": files}
            self._save()

    def shard_files(self, part: str) -> list[tuple[Path, list[tuple[str, int]]]]:
        """(file, [(tensor name, bytes)]) of each shard of ``part``, in checkpoint order."""
        listing = json.loads((self.dir / f"part-{part}.json").read_text())
        out = []
        for file, shard in zip(self.parts[part]["files"], listing):
            sizes = [(name, math.prod(shape) * getattr(torch, dtype).itemsize)
                     for name, dtype, shape in shard]
            out.append((self.dir / file, sizes))
        return out

    def summary(self, part: str) -> dict:
        return torch.load(self.dir / f"part-{part}.pt", weights_only=False)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def close(self, discard: bool) -> None:
        """The run ends: remove the journal (``discard``; kept for a rerun otherwise), release the lock."""
        try:
            if discard:
                self.discard()
        finally:
            self._lock.close()


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
