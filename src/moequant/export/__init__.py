"""Export a calibrated ``QuantState`` to a checkpoint engines load: ModelOpt-HF (default) or compressed-tensors.

    export(model, state, out_dir, format="modelopt" | "compressed-tensors", overwrite=False,
           source_dir=None, recipe=None, max_shard_bytes=5e9) -> Path

Composition: ``common.check_exportable`` (refuses what a format cannot hold, naming the tensor) ->
format module (``modelopt_hf`` / ``compressed_tensors``: the quantized tensors and config dicts, tabled in
their docstrings) + ``common.unquantized_specs`` (everything else, names and dtypes as ``save_pretrained``
writes them) -> ``writer.write_checkpoint`` (sharded, atomic) with ``hf_files`` adding config.json,
hf_quant_config.json, the generation config and the source's tokenizer files. The model is only read.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from moequant.export import common, compressed_tensors, hf_files, modelopt_hf
from moequant.export.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    ExportError,
    TensorSpec,
    natural_key,
    write_checkpoint,
)
from moequant.state import QuantState

FORMATS = ("modelopt", "compressed-tensors")

__all__ = ["FORMATS", "ExportError", "TensorSpec", "checkpoint_extras", "export", "part_specs", "tensor_specs"]


def _metadata(state: QuantState, fmt: str, recipe) -> dict:
    from moequant import __version__

    if recipe is not None and hasattr(recipe, "to_dict"):
        recipe = recipe.to_dict()
    elif recipe is not None and not isinstance(recipe, (dict, str)):
        from dataclasses import asdict, is_dataclass

        recipe = asdict(recipe) if is_dataclass(recipe) else str(recipe)
    return {"version": __version__, "format": fmt, "backend": state.backend, "method": state.method,
            "kv_scheme": state.kv_scheme, "recipe": recipe, "notes": list(state.notes)}


def format_configs(model: nn.Module, state: QuantState, fmt: str) -> tuple[dict, dict | None]:
    """(config.json ``quantization_config``, hf_quant_config.json or None); reads only the plan and scalars."""
    from moequant import __version__

    exclude = common.excluded_modules(model, state, fmt)
    if fmt == "modelopt":
        hf_quant, flat = modelopt_hf.configs(state, exclude, {"name": "moequant", "version": __version__})
        return flat, hf_quant
    return compressed_tensors.quantization_config(state, exclude), None


def tensor_specs(model: nn.Module, state: QuantState, fmt: str, prefix: str = "",
                 exclude_prefix: str | None = None, *, check: bool = True) -> list[TensorSpec]:
    """Every tensor of the checkpoint (quantized targets, KV scales, unquantized tensors under ``prefix``).
    ``check=False``: the caller has run ``common.check_exportable`` on this state already."""
    if state.plan.targets:
        if check:
            common.check_exportable(state)
        mod = modelopt_hf if fmt == "modelopt" else compressed_tensors
        quantized = mod.tensor_specs(model, state)
    else:  # a part without quantized targets (a dense layer under an experts-only recipe): KV scales only
        quantized = modelopt_hf.kv_specs(state) if fmt == "modelopt" else compressed_tensors.kv_specs(state)
    return common.unquantized_specs(model, state, prefix, exclude_prefix) + quantized


def part_specs(model: nn.Module, state: QuantState, fmt: str, layers_path: str, layer: int | None,
               ) -> list[TensorSpec]:
    """The checkpoint's tensors of one part: decoder layer ``layer`` (its targets, KV scales and unquantized
    tensors), or with ``layer=None`` everything outside the decoder layers. The in-memory export and the
    streamed path (one layer in memory at a time) both write the checkpoint as these parts, so a shard never
    spans two of them and both write the same bytes. Reads only that part's tensors; the state must already
    have passed ``common.check_exportable``."""
    inside = layers_path + "."
    prefix = inside if layer is None else f"{inside}{layer}."
    targets = tuple(t for t in state.plan.targets if t.layer == layer)
    kv = {p: v for p, v in state.kv_cache.items() if p.startswith(prefix) != (layer is None)}
    sub = QuantState(state.plan.with_targets(targets, state.plan.excluded),
                     {t.key: state.tensors[t.key] for t in targets}, state.backend, state.method, kv, state.kv_scheme)
    if layer is None:
        return tensor_specs(model, sub, fmt, prefix="", exclude_prefix=inside, check=False)
    return tensor_specs(model, sub, fmt, prefix=prefix, check=False)


def checkpoint_extras(model: nn.Module, state: QuantState, fmt: str, source_dir, recipe):
    """``write_extras(tmp_dir)`` writing config.json, hf_quant_config.json, generation config, tokenizer."""
    qconfig, hf_quant = format_configs(model, state, fmt)
    config = hf_files.model_config_dict(model)
    config["quantization_config"] = qconfig
    config["moequant"] = _metadata(state, fmt, recipe)

    def write_extras(tmp: Path) -> None:
        hf_files.copy_source_files(source_dir, tmp)
        hf_files.write_json(tmp / "config.json", config)
        if hf_quant is not None:
            hf_files.write_json(tmp / "hf_quant_config.json", hf_quant)
        hf_files.write_generation_config(model, source_dir, tmp)

    return write_extras


def export(
    model: nn.Module, state: QuantState, out_dir: str | os.PathLike, format: str = "modelopt",
    overwrite: bool = False, source_dir: str | os.PathLike | None = None, recipe=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the checkpoint of ``model`` quantized by ``state`` to ``out_dir``; returns its absolute path.

    ``source_dir``: the original model directory; its generation_config.json is copied byte for byte and its
    other non-weight files (tokenizer, chat template, ...) are copied. ``recipe`` is recorded in config.json
    under ``"moequant"`` together with the moequant version and the backend used. Raises ``ExportError``
    naming the tensor or file, with the fix, for anything that cannot be written faithfully.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; expected one of {FORMATS}")
    from moequant.discover import decoder_layers

    common.check_exportable(state)
    layers_path, layers = decoder_layers(model)
    parts = [part_specs(model, state, format, layers_path, i) for i in [None, *range(len(layers))]]
    write_extras = checkpoint_extras(model, state, format, source_dir, recipe)
    return write_checkpoint(out_dir, parts, write_extras, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                            source_dir=source_dir)
