"""Read single tensors from a model directory's safetensors shards, without mapping whole files.

A safetensors file is ``u64 little-endian header length N`` + ``N bytes of JSON`` (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}}``, offsets relative to the end of the header) + the tensor bytes. Tensors are
read with plain ``seek`` + ``readinto`` into a fresh tensor: nothing is memory-mapped, so pages of tensors
already consumed do not stay resident in the process (a memory-mapped reader keeps every page it touched
counted in the process's resident set until the file is closed).

``model.safetensors.index.json`` (``weight_map``: tensor -> file) is read when present, else the single
``model.safetensors``. The index comes with the model, from whoever published it, so it is checked before any
shard is opened: ``weight_map`` must be an object of tensor -> shard file name, each name must stay inside the
model directory (no absolute path, no ``..``, no symlink resolving elsewhere; the one exception is the
Hugging Face cache layout, ``<repo>/snapshots/<rev>/<file>`` linking to ``<repo>/blobs/``), no tensor may be
listed twice, and every shard's header is read up front: each listed shard present, each listed tensor in
its shard, no tensor in two shards. Every error is one ``ShardError`` line naming the file (and the tensor,
and the bad entry) and saying what to do; a tensor whose bytes lie beyond the end of the file is found when
it is read.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from moequant.errors import MoequantError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 1000**2


class ShardError(MoequantError, ValueError):
    """A safetensors shard is missing, truncated or corrupt; the message names the file and the tensor."""


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries by name, byte offset where tensor data starts) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ShardError(f"{path}: truncated safetensors file (no header); re-download it")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER_BYTES:
                raise ShardError(f"{path}: corrupt safetensors header (claims {length} bytes); re-download it")
            text = f.read(length)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file is missing; re-download the model") from None
    if len(text) < length:
        raise ShardError(f"{path}: truncated safetensors file (header of {length} bytes, {len(text)} present); "
                         "re-download it")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: corrupt safetensors header ({err}); re-download it") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not _valid_entry(info):
            raise ShardError(f"{path}: corrupt safetensors header (tensor {name}: {json.dumps(info)[:80]} is not "
                             "{dtype, shape, data_offsets: [begin, end]}); re-download it")
    return header, 8 + length


def _valid_entry(info) -> bool:
    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    return (isinstance(shape, list) and all(count(d) for d in shape) and isinstance(offsets, list)
            and len(offsets) == 2 and all(count(o) for o in offsets) and offsets[0] <= offsets[1])


class _Object(dict):
    """A JSON object that remembers its repeated keys (``json`` silently keeps the last value)."""

    repeated: list


def _object(pairs) -> _Object:
    obj = _Object()
    obj.repeated = []
    for key, value in pairs:
        if key in obj:
            obj.repeated.append((key, obj[key], value))
        obj[key] = value
    return obj


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file, checked for shape and repeats (not yet for escaping names)."""
    try:
        data = json.loads(index.read_bytes(), object_pairs_hook=_object)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{index}: not a safetensors index (invalid JSON: {err}); re-download it") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        what = "is missing" if not isinstance(data, dict) or "weight_map" not in data else (
            f"is a {type(weight_map).__name__}")
        raise ShardError(f"{index}: not a safetensors index (weight_map {what}, expected an object of tensor name "
                         "-> shard file); re-download it")
    if weight_map.repeated:
        name, first, second = weight_map.repeated[0]
        raise ShardError(f"{index}: tensor {name} is listed twice (in {first!r} and {second!r}); the index is "
                         "corrupt: re-download it")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise ShardError(f"{index}: tensor {name} maps to {json.dumps(file)[:80]}, not a shard file name; the "
                             "index is corrupt: re-download it")
    return dict(weight_map)


def escape_reason(model_dir: Path, file: str) -> str | None:
    """Why shard ``file`` (as written in the index) would be read from outside ``model_dir``, or None.

    Names are checked as written (absolute, ``..``) and as resolved (symlinks). The Hugging Face cache keeps a
    repository as ``<repo>/snapshots/<rev>/<file>`` -> ``../../blobs/<hash>``: inside a ``snapshots``
    directory, ``<repo>/blobs`` counts as inside too."""
    if "\x00" in file:
        return "a NUL byte in the name"
    if PurePosixPath(file).is_absolute() or PureWindowsPath(file).anchor:
        return "an absolute path"
    if ".." in PurePosixPath(file).parts or ".." in PureWindowsPath(file).parts:
        return "'..' in the name"
    roots = [model_dir.resolve()]
    if model_dir.resolve().parent.name == "snapshots":
        roots.append(model_dir.resolve().parent.parent / "blobs")
    try:
        resolved = (model_dir / file).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        return f"does not resolve ({err})"
    if not any(resolved.is_relative_to(root) for root in roots):
        return f"a link resolving to {resolved}"
    return None


class SafetensorsSource:
    """The tensors of a model directory, by on-disk name; ``get(name)`` reads one tensor."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index, single = self.dir / INDEX_NAME, self.dir / SINGLE_NAME
        self._headers: dict[str, tuple[dict, int]] = {}
        if index.is_file():
            self.weight_map: dict[str, str] = read_index(index)
            self._check_shards(index)
        elif single.is_file():
            why = escape_reason(self.dir, SINGLE_NAME)
            if why is not None:
                raise ShardError(f"{single}: outside the model directory ({why}); refusing to read it (a link you "
                                 "made yourself: copy or hard-link the file in instead)")
            self.weight_map = {name: SINGLE_NAME for name in read_header(single)[0]}
        else:
            raise ShardError(f"{self.dir}: no {INDEX_NAME} and no {SINGLE_NAME}; streaming reads safetensors "
                             "checkpoints only (use --no-stream for other weight formats)")

    def _check_shards(self, index: Path) -> None:
        """Every shard inside the directory and present; every listed tensor in its shard, and in no other."""
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):  # every name first: nothing outside is even opened
            why = escape_reason(self.dir, file)
            if why is not None:
                raise ShardError(f"{index}: tensor {min(names)} is mapped to shard {file!r}, outside the model "
                                 f"directory ({why}); refusing to read it: re-download the model from a source "
                                 "you trust (a link you made yourself: copy or hard-link the file in instead)")
        for file, names in sorted(by_file.items()):
            if not (self.dir / file).is_file():
                raise ShardError(f"{self.dir / file}: shard file is missing (it holds tensor {min(names)} and "
                                 "others); re-download the model")
            header, _ = self._headers[file] = read_header(self.dir / file)
            absent = sorted(set(names) - set(header))
            if absent:
                raise ShardError(f"{self.dir / file}: tensor {absent[0]} is listed in {INDEX_NAME} but not in this "
                                 f"shard ({len(absent)} missing); re-download the model")
            for name in sorted(header):
                if self.weight_map.get(name, file) != file:
                    raise ShardError(f"{self.dir / file}: holds tensor {name}, which {INDEX_NAME} maps to "
                                     f"{self.weight_map[name]!r}: the same tensor in two shards; re-download the "
                                     "model")

    def files(self) -> list[Path]:
        return [self.dir / f for f in sorted(set(self.weight_map.values()))]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def entry(self, name: str) -> tuple[Path, dict, int]:
        """(file, header entry, data start) of tensor ``name``."""
        if name not in self.weight_map:
            raise ShardError(f"{self.dir}: tensor {name} is in no shard of the checkpoint; the model files do not "
                             "match its config.json")
        file = self.weight_map[name]
        if file not in self._headers:
            self._headers[file] = read_header(self.dir / file)
        header, start = self._headers[file]
        if name not in header:
            raise ShardError(f"{self.dir / file}: tensor {name} is listed in the index but not in this shard; "
                             "re-download the model")
        return self.dir / file, header[name], start

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entry(name)[1]["shape"])

    def get(self, name: str, pinned: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` read into CPU memory (``pinned``: page-locked, for a fast queued copy to a GPU);
        ``out``: read straight into this contiguous CPU tensor of the same dtype and element count instead
        (no new buffer, no second copy)."""
        path, info, start = self.entry(name)
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ShardError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}, which moequant does not read")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != size:
            raise ShardError(f"{path}: tensor {name} spans {end - begin} bytes but {info['dtype']} {list(shape)} "
                             f"needs {size}; the file is corrupt: re-download it")
        if out is None:
            out = torch.empty(shape, dtype=dtype, pin_memory=pinned)
        elif out.dtype != dtype or out.numel() != math.prod(shape) or out.device.type != "cpu" \
                or not out.is_contiguous():
            raise ValueError(f"{name}: cannot read {info['dtype']} {list(shape)} into {out.dtype} "
                             f"{list(out.shape)} on {out.device}")
        buf = out.reshape(-1).view(torch.uint8).numpy() if size else None
        with open(path, "rb") as f:
            f.seek(start + begin)
            got = f.readinto(buf) if size else 0
        if got != size:
            raise ShardError(f"{path}: tensor {name} is cut short ({got} of {size} bytes): the file is truncated; "
                             "re-download it")
        return out
