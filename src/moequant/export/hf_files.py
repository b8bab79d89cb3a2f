"""The non-weight files of an exported checkpoint: config.json, generation config, tokenizer and friends.

Nothing here touches the user's model: configs are deep-copied before anything is set on them, and the
generation config is serialized with ``to_json_string`` (what ``GenerationConfig.save_pretrained`` writes),
which skips the strict validation that transformers >= 5.17 applies in ``save_pretrained``. A source
``generation_config.json`` is copied byte for byte, so sampling defaults behave exactly as the source's
(ModelOpt instead flipped ``do_sample`` to True, silently turning greedy decoding into sampling).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from torch import nn

from moequant.export.writer import ExportError

GENERATION_CONFIG = "generation_config.json"
# files we write ourselves, or weights that must not be copied next to the quantized ones
_NOT_COPIED_NAMES = {"config.json", "hf_quant_config.json", GENERATION_CONFIG}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(_WEIGHT_INDEXES)


def copy_source_files(source_dir: str | Path | None, dest: Path) -> list[str]:
    """Copy every top-level non-weight file of ``source_dir`` (tokenizer, chat template, README, ...)."""
    if source_dir is None:
        return []
    source = Path(source_dir)
    if not source.is_dir():
        raise ExportError(f"source_dir {source} is not a directory; pass the original model directory or None")
    copied = []
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name.startswith(".") or _is_weight_file(path.name):
            continue
        if path.name in _NOT_COPIED_NAMES:
            continue
        shutil.copyfile(path, dest / path.name)   # not copy2: the umask's mode, not the source file's
        copied.append(path.name)
    return copied


def write_generation_config(model: nn.Module, source_dir: str | Path | None, dest: Path) -> str | None:
    """Copy the source's generation config byte for byte, else serialize a copy of the model's."""
    if source_dir is not None and (Path(source_dir) / GENERATION_CONFIG).is_file():
        shutil.copyfile(Path(source_dir) / GENERATION_CONFIG, dest / GENERATION_CONFIG)
        return "copied"
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return None
    gen = copy.deepcopy(gen)
    text = gen.to_json_string(use_diff=True, keys_to_pop=["compile_config"])
    (dest / GENERATION_CONFIG).write_text(text)
    return "serialized"


def model_config_dict(model: nn.Module) -> dict:
    """config.json content as ``save_pretrained`` writes it (dtype, architectures), from a copy of the config."""
    config = copy.deepcopy(model.config)
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return json.loads(config.to_json_string(use_diff=True))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
