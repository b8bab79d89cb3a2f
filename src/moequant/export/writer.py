"""Sharded safetensors writer: shard by shard, into a temporary directory moved into place when complete.

Input is a list of ``TensorSpec`` (name, shape, dtype, and a function that builds the tensor). Shards are
planned from shapes alone, then each shard's tensors are built, saved and released before the next shard is
touched, so peak memory is about one shard (plus whatever the caller's tensors share with the model).

Layout written (what ``transformers`` ``save_pretrained`` writes for a sharded checkpoint, and what vLLM /
SGLang / TensorRT-LLM read):
    model-00001-of-0000N.safetensors ...     safetensors metadata {"format": "pt"}
    model.safetensors.index.json             {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
An index is written even for a single shard, so readers never need to guess the layout.

Atomicity: everything goes into ``<parent>/.<name>.moequant-tmp-XXXXXXXX`` (same filesystem as the target, so
the final move is a ``rename``); on any exception, including KeyboardInterrupt, the temporary directory is
removed and nothing appears at the target. An existing target is replaced only with ``overwrite=True``.
The whole write holds the output's lock; permissions, leftovers of killed runs and OS errors (disk full, ...)
as one line: ``outdir.py``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moequant.export.errors import ExportError
from moequant.export.outdir import (
    check_free_space,
    output_lock,
    reported_os_errors,
    sibling_dir,
    sibling_name,
)

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default "5GB"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint, built on demand by ``make()``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize   # no tensor made: 1.2 s of 12 layers' writer on an H200


def natural_key(name: str) -> tuple:
    """Sort key ordering ``layers.10`` after ``layers.9`` (numbers compared as numbers)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (size + spec.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _build(spec: TensorSpec) -> torch.Tensor:
    t = spec.make()
    if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
        raise ExportError(
            f"{spec.name}: built tensor is {t.dtype} {tuple(t.shape)} but the format table says "
            f"{spec.dtype} {tuple(spec.shape)}; this is a moequant exporter bug, please report it"
        )
    # contiguous CPU bytes; no copy beyond the device-to-host one (the writer writes each tensor out at once)
    return t.detach().to("cpu").contiguous()


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def _shard_order(shard: list[TensorSpec]) -> list[TensorSpec]:
    """Wider dtypes first (so every tensor starts at a multiple of its element size), then by name."""
    return sorted(shard, key=lambda s: (-s.dtype.itemsize, natural_key(s.name)))


def write_safetensors(path: Path, shard: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file building ONE tensor at a time (peak memory: the largest tensor); ``metadata``
    is added to the header's ``__metadata__`` in the order given (the bytes are deterministic).

    Format (safetensors spec): u64 little-endian header length, a JSON header ``{"__metadata__": {...},
    name: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded with spaces to a multiple of 8 bytes,
    then the tensors' bytes back to back, offsets relative to the end of the header.
    """
    order = _shard_order(shard)
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for spec in order:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ExportError(f"{spec.name}: dtype {spec.dtype} cannot be written to safetensors")
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    try:
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for spec in order:
                t = _build(spec)
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))   # the tensor's own buffer
                del t
    except OSError as err:
        if err.filename is None:   # write() and close() errors (disk full) name no file: this one
            err.filename = str(path)
        raise


def shard_file_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def part_shards(part: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """One part's shards: its tensors in natural name order, split greedily at ``max_shard_bytes``."""
    return plan_shards(sorted(part, key=lambda s: natural_key(s.name)), max_shard_bytes)


def _check_unique(names: list[str]) -> None:
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ExportError(f"tensor names written twice: {dup[:5]}; this is a moequant exporter bug")


def write_index(directory: Path, shards: list[list[tuple[str, int]]]) -> dict:
    """``model.safetensors.index.json`` for shards given as [(tensor name, bytes)] in file order."""
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        for name, nbytes in shard:
            weight_map[name] = shard_file_name(i, len(shards))
            total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def write_shards(directory: Path, parts: list[list[TensorSpec]], max_shard_bytes: int) -> dict:
    """Write ``parts`` as shards plus index into ``directory``; returns the index dict.

    A shard never spans two parts (the streamed path's parts: the tensors outside the decoder layers, then
    one decoder layer each): a finished layer's shards are final files, which the streamed path moves into
    the checkpoint instead of writing every byte a second time (``link_checkpoint``)."""
    _check_unique([s.name for part in parts for s in part])
    shards = [shard for part in parts for shard in part_shards(part, max_shard_bytes)]
    for i, shard in enumerate(shards, start=1):
        write_safetensors(directory / shard_file_name(i, len(shards)), shard)
    return write_index(directory, [[(s.name, s.nbytes) for s in shard] for shard in shards])


def _check_target(out_dir: Path, overwrite: bool, source_dir: str | os.PathLike | None = None) -> None:
    """Refuse an output that is a file, a non-empty directory without ``overwrite``, or (even with
    ``overwrite``) the source model directory, a folder inside it or one that contains it (symlinks resolved):
    writing there would replace or mix with the model being read."""
    out_dir = Path(out_dir)
    if source_dir is not None:
        out_real, src_real = out_dir.resolve(), Path(source_dir).resolve()
        where = ("is" if out_real == src_real else "is inside" if src_real in out_real.parents
                 else "contains" if out_real in src_real.parents else None)
        if where is not None:
            raise ExportError(f"output {out_dir} {where} the model directory {source_dir}: the checkpoint would "
                              "replace or mix with the model it is made from; choose an output outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a directory; choose another output path")
    blocker = next((p for p in out_dir.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ExportError(f"output {out_dir}: {blocker} is a file, not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output {out_dir} exists and is not empty; choose another output or pass --overwrite "
                          "(overwrite=True) to replace it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp`` (renames on one filesystem; the old directory is removed last)."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = sibling_name(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)  # put the previous checkpoint back, then report
        raise
    shutil.rmtree(old)


def write_checkpoint(
    out_dir: str | os.PathLike, parts: list[list[TensorSpec]], write_extras: Callable[[Path], None],
    overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, source_dir=None,
) -> Path:
    """Write a complete checkpoint atomically; ``write_extras(tmp_dir)`` adds configs and copied files.
    ``parts``: lists of tensors no shard spans (``write_shards``); one list for a plain sharded checkpoint.

    Under the output's lock (``OutputLocked`` if another run holds it). Refused up front when the file system
    has less free space than the tensors' bytes; an OS error while writing (disk full, quota, read-only,
    permission) is an ``ExportError`` naming the output, the file and the fix; either way nothing is left.
    ``source_dir``: the model directory read, which the output must not be, lie in or contain."""
    need = sum(s.nbytes for part in parts for s in part)

    def fill(tmp: Path) -> None:
        write_shards(tmp, parts, max_shard_bytes)
        write_extras(tmp)

    return _atomically(Path(out_dir).absolute(), need, overwrite, source_dir, fill)


def link_checkpoint(
    out_dir: str | os.PathLike, shard_files: list[Path], shard_tensors: list[list[tuple[str, int]]],
    write_extras: Callable[[Path], None], overwrite: bool = False, source_dir=None,
) -> Path:
    """``write_checkpoint`` from shard files already written by ``write_safetensors`` (in checkpoint order, with
    their [(tensor, bytes)]): each is hard-linked into the new checkpoint under its final name (copied where
    the file system has no hard links), so no byte is written twice; the files themselves stay."""
    _check_unique([name for shard in shard_tensors for name, _ in shard])

    def fill(tmp: Path) -> None:
        for i, src in enumerate(shard_files, start=1):
            dst = tmp / shard_file_name(i, len(shard_files))
            try:
                os.link(src, dst)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(src, dst)
        write_index(tmp, shard_tensors)
        write_extras(tmp)

    return _atomically(Path(out_dir).absolute(), 0, overwrite, source_dir, fill)


def _atomically(out_dir: Path, need: int, overwrite: bool, source_dir, fill: Callable[[Path], None]) -> Path:
    """``fill(tmp)`` in a fresh sibling directory, moved into place when complete (see ``write_checkpoint``)."""
    _check_target(out_dir, overwrite, source_dir)
    with reported_os_errors(out_dir, need), output_lock(out_dir):
        _check_target(out_dir, overwrite, source_dir)   # again under the lock: another run may have finished meanwhile
        check_free_space(out_dir, need)
        tmp = sibling_dir(out_dir, "tmp")
        done = False
        try:
            fill(tmp)
            _move_into_place(tmp, out_dir)
            done = True
        finally:
            if not done:
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
