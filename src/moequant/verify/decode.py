"""Read a checkpoint directory and decode its quantized tensors, written from the format descriptions only.

Independent of the exporter and of ``moequant.formats`` on purpose (a test scans the imports): if both
shared a bug, a shared decoder would hide it.

FP4 E2M1: a 4-bit code is ``sign << 3 | index``, ``index`` into (0, 0.5, 1, 1.5, 2, 3, 4, 6). Two codes per
byte along the input dimension, element ``2j`` in the LOW nibble and ``2j + 1`` in the high nibble
(vLLM ``nvfp4_emulation_utils.break_fp4_bytes``, compressed-tensors ``unpack_fp4_from_uint8``).
Block scales are FP8 E4M3 ``[out, in/16]``, one per 16 consecutive inputs, plain row-major.

Decoding looks each packed byte up in a 256-entry table of (low, high) value pairs, which is the nibble
order above applied to every byte once.

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
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import safe_open

from moequant.errors import MoequantError

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = 16
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


class CheckpointError(MoequantError, ValueError):
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
    """(weight_map from the index or None, shard file names); every name must stay inside ``path``."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{INDEX_NAME}: unreadable weight_map ({err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
            raise CheckpointError(f"{INDEX_NAME}: weight_map is not an object of tensor name -> shard file name")
        files = sorted(set(weight_map.values()))
        why = {file: _outside(path, file) for file in files}   # once per file: an index lists ~1e5 tensors
        for name, file in sorted(weight_map.items()):
            if why[file] is not None:
                raise CheckpointError(f"{INDEX_NAME}: tensor {name} is mapped to {file!r}, outside {path} "
                                      f"({why[file]}); refusing to read it")
        return weight_map, sorted(set(weight_map.values()))
    if (path / SINGLE_NAME).is_file():
        return None, [SINGLE_NAME]
    raise CheckpointError(f"{path}: neither {INDEX_NAME} nor {SINGLE_NAME}; not a safetensors checkpoint")


def _outside(path: Path, file: str) -> str | None:
    """Why ``file`` (a name from the index) would be read from outside the directory ``path``, or None. Inside a
    Hugging Face cache snapshot (``<repo>/snapshots/<rev>``), ``<repo>/blobs`` counts as inside."""
    if "\x00" in file:
        return "a NUL byte in the name"
    if PurePosixPath(file).is_absolute() or PureWindowsPath(file).anchor:
        return "an absolute path"
    if ".." in PurePosixPath(file).parts or ".." in PureWindowsPath(file).parts:
        return "'..' in the name"
    root = path.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    try:
        resolved = (path / file).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        return f"does not resolve ({err})"
    return None if any(resolved.is_relative_to(r) for r in roots) else f"a link resolving to {resolved}"


class Checkpoint:
    """Lazy view of a checkpoint directory: JSON files, tensor headers, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory")
        self.weight_map, self.files = shard_files(self.path)
        self.file_errors: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[str, object] = {}  # shard file -> open safe_open handle
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
        """The tensor ``name`` (a copy). Each shard is opened once (its header parsed once) and kept open
        until ``close()``: re-opening a shard per tensor re-parsed its whole header every time."""
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(self.path / info.file), framework="pt")
        return handle.get_tensor(name)

    def close(self) -> None:
        """Release the open shards (also when the object is garbage-collected)."""
        self._handles.clear()

    def __enter__(self) -> Checkpoint:  # noqa: PYI034 (typing.Self needs Python 3.11; we support 3.10)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> codes ``[..., K]``: low nibble first."""
    low = packed & 0x0F
    high = (packed >> 4) & 0x0F
    return torch.stack((low, high), dim=-1).flatten(-2)


def _code_values() -> torch.Tensor:
    """float32 ``[16]``: the value of each 4-bit code (sign bit 8; code 8 is -0.0)."""
    magnitude = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.cat((magnitude, -magnitude))


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    return _code_values()[(codes & 0xF).long()]


_BYTE_PAIRS: torch.Tensor | None = None


def _byte_pairs() -> torch.Tensor:
    """float64-typed ``[256]`` whose 8 bytes per entry are the float32 pair (value of the low nibble, value of
    the high nibble) of that packed byte: one gather decodes two elements, already in checkpoint order."""
    global _BYTE_PAIRS
    if _BYTE_PAIRS is None:
        byte = torch.arange(256)
        values = _code_values()
        pairs = torch.stack((values[byte & 0xF], values[byte >> 4]), dim=1)  # [256, 2] float32
        _BYTE_PAIRS = pairs.contiguous().view(torch.float64).reshape(256)
    return _BYTE_PAIRS


def fp4_decode_bytes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> float32 values ``[..., K]`` (= ``fp4_values(fp4_codes(packed))``, one pass)."""
    pairs = _byte_pairs().index_select(0, packed.reshape(-1).to(torch.int32))  # [numel] two float32 each
    return pairs.view(torch.float32).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def nvfp4_scales(block_scale: torch.Tensor, global_scale: torch.Tensor, convention: str) -> torch.Tensor:
    """float32 per-block scales ``[N, K/16]``: ``float32(block) * g`` (modelopt) or ``float32(block) / g`` (ct)."""
    g = global_scale.to(torch.float32).reshape(())
    scale = block_scale.to(torch.float32)
    return scale.mul_(g) if convention == "modelopt" else scale.div_(g)


def decode_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                 convention: str) -> torch.Tensor:
    """float32 ``[N, K]`` of a packed NVFP4 tensor; ``convention`` "modelopt" (multiply) or "ct" (divide)."""
    values = fp4_decode_bytes(packed)
    n, k = values.shape
    scale = nvfp4_scales(block_scale, global_scale, convention).unsqueeze(-1)  # [N, K/16, 1]
    return values.view(n, k // BLOCK, BLOCK).mul_(scale).reshape(n, k)


def nvfp4_finite_bound(max_block_scale: torch.Tensor, global_scale: torch.Tensor, convention: str) -> bool:
    """True when every value ``decode_nvfp4`` can produce is finite, given block scales that are all finite,
    > 0 and at most ``max_block_scale`` (a one-element tensor of their dtype): a decoded value is
    ``fl(v * s)``, ``s = fl(float32(b) (*|/) g)``, with ``|v| <= 6``, and fp32 rounding is monotone, so its
    magnitude is at most ``fl(6 * fl(max_b (*|/) g))``. False proves nothing (then decode and look)."""
    bound = nvfp4_scales(max_block_scale.reshape(1), global_scale, convention).mul_(6.0)
    return bool(torch.isfinite(bound).all())


def decode_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight.to(torch.float32) * scale.to(torch.float32).reshape(())
