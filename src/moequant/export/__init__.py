"""Export a calibrated ``QuantState`` to a checkpoint engines load: ModelOpt-HF (default) or compressed-tensors.

    export(model, state, out_dir, format="modelopt" | "compressed-tensors", overwrite=False,
           source_dir=None, recipe=None, max_shard_bytes=5e9) -> Path

Composition: ``common.check_exportable`` (refuses what a format cannot hold, naming the tensor) ->
format module (``modelopt_hf`` / ``compressed_tensors``: the quantized tensors and config dicts, tabled in
their docstrings; a pure mapping of the state) + ``common.unquantized_tensors`` (everything else, names and
dtypes as ``save_pretrained`` writes them), one part per decoder layer (``part_specs``) -> ``writer.write_checkpoint`` (sharded, atomic) with ``hf_files`` adding config.json,
hf_quant_config.json, the generation config and the source's tokenizer files. The model is only read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from torch import nn

from moequant.export import common, compressed_tensors, hf_files, modelopt_hf
from moequant.export.smoothing_file import write_smoothing_file
from moequant.export.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    ExportError,
    TensorSpec,
    write_checkpoint,
)
from moequant.scales import QuantState

FORMATS = ("modelopt", "compressed-tensors")

__all__ = ["FORMATS", "ExportError", "TensorSpec", "checkpoint_extras", "export", "part_specs", "part_state"]


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


def part_specs(state: QuantState, fmt: str, unquantized: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The checkpoint's tensors of one part (a decoder layer, or everything outside the decoder layers): the
    quantized tensors and KV scales of ``state`` (that part's targets; already through
    ``common.check_exportable``) and ``unquantized`` (on-disk name -> tensor, ``common.unquantized_tensors``).
    A pure mapping: no model, no computation. The in-memory export and the streamed writer both write the
    checkpoint as these parts, so a shard never spans two of them and both write the same bytes."""
    mod = modelopt_hf if fmt == "modelopt" else compressed_tensors
    quantized = mod.tensor_specs(state) if state.plan.targets else mod.kv_specs(state)   # a part may have none
    names = {s.name for s in quantized}
    clash = sorted(names & set(unquantized))
    if clash:
        raise ExportError(f"{clash[0]}: both a quantized tensor and an unquantized one; exporter bug")
    return [TensorSpec(n, tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in unquantized.items()] + quantized


def part_state(state: QuantState, prefix: str, layer: int | None) -> QuantState:
    """The targets and KV scales of one part of ``state``: decoder layer ``layer`` (its KV scales under
    ``prefix``, the layer's path + "."), or ``layer=None`` and ``prefix`` the decoder layers' path + ".":
    everything outside them."""
    targets = tuple(t for t in state.plan.targets if t.layer == layer)
    kv = {p: v for p, v in state.kv_cache.items() if p.startswith(prefix) != (layer is None)}
    return QuantState(state.plan.with_targets(targets, state.plan.excluded),
                      {t.key: state.tensors[t.key] for t in targets}, state.backend, state.method, kv, state.kv_scheme)


def checkpoint_extras(model: nn.Module, state: QuantState, fmt: str, source_dir, recipe):
    """``write_extras(tmp_dir)`` writing config.json, hf_quant_config.json, generation config, tokenizer."""
    qconfig, hf_quant = format_configs(model, state, fmt)
    config = hf_files.model_config_dict(model)
    config["quantization_config"] = qconfig
    config["moequant"] = _metadata(state, fmt, recipe)

    def write_extras(tmp: Path) -> None:
        write_smoothing_file(model, state.plan, state.smoothing, tmp)
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
    inside = layers_path + "."
    smoothed = state.smoothed_tensors()
    parts = [part_specs(part_state(state, inside, None), format,
                        common.unquantized_tensors(model, state.plan, "", inside, smoothed))]
    for i in range(len(layers)):
        prefix = f"{inside}{i}."
        parts.append(part_specs(part_state(state, prefix, i), format,
                                common.unquantized_tensors(model, state.plan, prefix, replaced=smoothed)))
    write_extras = checkpoint_extras(model, state, format, source_dir, recipe)
    return write_checkpoint(out_dir, parts, write_extras, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                            source_dir=source_dir)
