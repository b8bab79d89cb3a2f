"""Read single tensors from a model directory's safetensors shards, without mapping whole files.

A safetensors file is ``u64 little-endian header length N`` + ``N bytes of JSON`` (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}}``, offsets relative to the end of the header) + the tensor bytes. Tensors are
read with plain ``seek`` + ``readinto`` into a fresh tensor: nothing is memory-mapped, so pages of tensors
already consumed do not stay resident in the process (a memory-mapped reader keeps every page it touched
counted in the process's resident set until the file is closed).

``model.safetensors.index.json`` (``weight_map``: tensor -> file) is read when present, else the single
``model.safetensors``. Every error names the file and the tensor, and says what to do: a shard listed in the
index but missing, a header that is not JSON, a tensor whose bytes lie beyond the end of the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

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
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: corrupt safetensors header ({err}); re-download it") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsSource:
    """The tensors of a model directory, by on-disk name; ``get(name)`` reads one tensor."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ShardError(f"{index}: not a safetensors index ({err}); re-download it") from None
        elif (self.dir / SINGLE_NAME).is_file():
            weight_map = {name: SINGLE_NAME for name in read_header(self.dir / SINGLE_NAME)[0]}
        else:
            raise ShardError(f"{self.dir}: no {INDEX_NAME} and no {SINGLE_NAME}; streaming reads safetensors "
                             "checkpoints only (use --no-stream for other weight formats)")
        self.weight_map: dict[str, str] = dict(weight_map)
        self._headers: dict[str, tuple[dict, int]] = {}
        for file in sorted(set(self.weight_map.values())):
            if not (self.dir / file).is_file():
                first = min(n for n, f in self.weight_map.items() if f == file)
                raise ShardError(f"{self.dir / file}: shard file is missing (it holds tensor {first} and others); "
                                 "re-download the model")

    @classmethod
    def of_files(cls, directory: Path, weight_map: dict[str, str]) -> SafetensorsSource:
        """A source over given files (tensor name -> file name in ``directory``), e.g. a journal's parts."""
        self = cls.__new__(cls)
        self.dir, self.weight_map, self._headers = Path(directory), dict(weight_map), {}
        return self

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

    def get(self, name: str) -> torch.Tensor:
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
        out = torch.empty(shape, dtype=dtype)
        buf = out.view(-1).view(torch.uint8).numpy() if size else None
        with open(path, "rb") as f:
            f.seek(start + begin)
            got = f.readinto(buf) if size else 0
        if got != size:
            raise ShardError(f"{path}: tensor {name} is cut short ({got} of {size} bytes): the file is truncated; "
                             "re-download it")
        return out
