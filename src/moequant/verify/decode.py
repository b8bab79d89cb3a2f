"""Read a checkpoint directory and decode its quantized tensors, written from the format descriptions only.

Independent of the exporter and of ``moequant.formats`` on purpose (a test scans the imports): if both
shared a bug, a shared decoder would hide it.

FP4 E2M1: a 4-bit code is ``sign << 3 | index``, ``index`` into (0, 0.5, 1, 1.5, 2, 3, 4, 6). Two codes per
byte along the input dimension, element ``2j`` in the LOW nibble and ``2j + 1`` in the high nibble
(vLLM ``nvfp4_emulation_utils.break_fp4_bytes``, compressed-tensors ``unpack_fp4_from_uint8``).
Block scales are FP8 E4M3 ``[out, in/16]``, one per 16 consecutive inputs, plain row-major.

Decoded value, float32, one rounding per operation:
    ModelOpt:           fp4 * (float32(block_scale) * weight_scale_2)
    compressed-tensors: fp4 * (float32(block_scale) / weight_global_scale)   (CT ``_dequantize``)
    FP8 (both):         float32(weight) * weight_scale

Safetensors headers are parsed here directly (8-byte little-endian header length, JSON header with dtype,
shape and data offsets) so that a truncated or inconsistent shard is reported by name, before any tensor read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = 16
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """The directory is not a readable checkpoint; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype | str      # a str when the header names a dtype we do not know
    shape: tuple[int, ...]


def read_header(path: Path) -> dict:
    """The safetensors header of ``path``; raises ``CheckpointError`` if it is truncated or malformed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: truncated ({size} bytes), no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path.name}: truncated, header of {n} bytes but file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path.name}: malformed safetensors header ({err})") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name}: truncated, tensors need {8 + n + end} bytes but the file has {size}; "
            "re-export or re-download this shard")
    return header


def shard_files(path: Path) -> tuple[dict[str, str] | None, list[str]]:
    """(weight_map from the index or None, shard file names)."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{INDEX_NAME}: unreadable weight_map ({err})") from None
        return weight_map, sorted(set(weight_map.values()))
    if (path / SINGLE_NAME).is_file():
        return None, [SINGLE_NAME]
    raise CheckpointError(f"{path}: neither {INDEX_NAME} nor {SINGLE_NAME}; not a safetensors checkpoint")


class Checkpoint:
    """Lazy view of a checkpoint directory: JSON files, tensor headers, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory")
        self.weight_map, self.files = shard_files(self.path)
        self.file_errors: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._read_file_header(file)

    def _read_file_header(self, file: str) -> None:
        shard = self.path / file
        if not shard.is_file():
            self.file_errors[file] = f"{file}: listed in {INDEX_NAME} but missing"
            return
        try:
            header = read_header(shard)
        except CheckpointError as err:
            self.file_errors[file] = str(err)
            return
        for name, meta in header.items():
            dtype = DTYPES.get(meta["dtype"], meta["dtype"])
            self.tensors[name] = TensorInfo(name, file, dtype, tuple(int(d) for d in meta["shape"]))

    def json(self, name: str) -> dict | None:
        p = self.path / name
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{name}: not valid JSON ({err})") from None

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        with safe_open(str(self.path / info.file), framework="pt") as f:
            return f.get_tensor(name)


def fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> codes ``[..., K]``: low nibble first."""
    low = packed & 0x0F
    high = (packed >> 4) & 0x0F
    return torch.stack((low, high), dim=-1).flatten(-2)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    magnitude = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude)


def decode_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                 convention: str) -> torch.Tensor:
    """float32 ``[N, K]`` of a packed NVFP4 tensor; ``convention`` "modelopt" (multiply) or "ct" (divide)."""
    values = fp4_values(fp4_codes(packed))
    n, k = values.shape
    blocks = values.reshape(n, k // BLOCK, BLOCK)
    g = global_scale.to(torch.float32).reshape(())
    scale = block_scale.to(torch.float32).unsqueeze(-1)
    scale = scale * g if convention == "modelopt" else scale / g
    return (blocks * scale).reshape(n, k)


def decode_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight.to(torch.float32) * scale.to(torch.float32).reshape(())
