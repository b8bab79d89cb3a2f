"""``quantize_streamed``: quantize a model directory holding one decoder layer in memory at a time.

    config -> model skeleton on the meta device (no weights)
           -> load the tensors outside the decoder layers (embeddings, final norm, lm_head) once
           -> discover + per-layer argument check: probe forwards in which each layer is zero-filled only
              while it runs (``skeleton.zero_layers_on_the_fly``): no weight is read
           -> capture decoder layer 0's inputs (the forward stops before layer 0)
           -> for each decoder layer: load its tensors from the shards (fused as the model code expects),
              weight scales + observed forward + coverage (the pipeline's own steps, in the same order),
              input and KV scales of the layer, export its tensors into the journal, free it (back to meta)
           -> assemble the shards from the journal's parts, add config files, move into place atomically

The checkpoint is byte-identical to ``pipeline.quantize`` + ``export.export`` on the loaded model: the same
functions compute the same values in the same order, the writer plans the same shards from the same names,
shapes and dtypes, and a shard never spans two parts (``export.part_specs``): each finished layer's shards are
journaled as the checkpoint's own files, and the final assembly links them in (no byte is written twice).
Memory: one decoder layer + the calibration activations + the non-layer tensors.

Resume (``journal.py``): every finished part is journaled in ``<parent>/.<name>.moequant-partial``; running the
same command again replays the finished layers' forward (their outputs are the next layers' inputs; nothing is
recalibrated) and continues with the first unfinished one. The returned ``QuantState`` holds every target's
scalars and error statistics but no block scales (they live in the written checkpoint).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from moequant.discover import decoder_layers, text_config
from moequant.distributed import Ranks
from moequant.export import FORMATS, checkpoint_extras, part_specs
from moequant.export.common import check_exportable
from moequant.export.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    ExportError,
    _check_target,
    link_checkpoint,
    natural_key,
    part_shards,
)
from moequant.journal import Journal, fingerprint, partial_dir
from moequant.kv_cache import KVObservationError, kv_cache_scales
from moequant.layerwise import (
    capture_layer_inputs,
    check_uniform_layer_arguments,
    flat_tensors,
    on_device,
)
from moequant.pipeline import (
    QuantResult,
    _calibrate_layer,
    _calibration_batches,
    _fill_input_scales,
    _memory,
    _progress,
    _Run,
    _stage,
    _start,
)
from moequant.plan import Target
from moequant.recipe import Recipe, load_recipe
from moequant.report import tensor_bytes, weight_errors
from moequant.safetensors_source import SafetensorsSource
from moequant.skeleton import free, load_into, meta_model, release_heap, zero_layers_on_the_fly
from moequant.state import KVScales, QuantState, TensorScales

KILL_AFTER_LAYER_ENV = "MOEQUANT_TEST_KILL_AFTER_LAYER"   # tests only: SIGKILL self after journaling layer k


@dataclass
class _Stream:
    run: _Run
    journal: Journal
    source: SafetensorsSource
    fmt: str
    kv_scales: dict[str, KVScales] = field(default_factory=dict)
    layers_resumed: int = 0
    ranks: Ranks | None = None          # under torch.distributed; rank 0 alone journals and writes
    done: frozenset = frozenset()       # journaled parts (rank 0's journal, broadcast)
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    @property
    def writer(self) -> bool:
        return self.ranks is None or self.ranks.writer


def quantize_streamed(model_dir: str | Path, out_dir: str | Path, recipe: str | Path | Recipe = "nvfp4",
                      fmt: str = "modelopt", calib=None, *, tokenizer=None, device: str | torch.device = "cpu",
                      batch_size: int = 8, backend: str = "auto", overwrite: bool = False, progress: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, trust_remote_code: bool = False,
                      ) -> QuantResult | None:
    """Quantize the safetensors model in ``model_dir`` layer by layer and write the checkpoint to ``out_dir``.

    Arguments as ``pipeline.quantize`` + ``export.export``. A partial run of the same model, recipe,
    calibration, format and version found next to ``out_dir`` is continued; one of another is refused
    (``JournalMismatch``) unless ``overwrite``. On an error (a corrupt shard, a NaN weight, ...) nothing is
    left behind; a killed or interrupted (Ctrl-C) run leaves its journal for the next run to continue.
    Under torch.distributed (``distributed.py``) every rank calls this; rank 0 writes and returns the result,
    the other ranks return None.
    """
    model_dir, out_dir, recipe = Path(model_dir), Path(out_dir).absolute(), load_recipe(recipe)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    _check_target(out_dir, overwrite, model_dir)
    source = SafetensorsSource(model_dir)
    ranks = Ranks.current()
    if ranks is not None and not ranks.writer:   # the other ranks compute and send; they write nothing
        with torch.no_grad():
            _calibrate_and_journal(model_dir, source, None, recipe, fmt, calib, tokenizer, device, batch_size,
                                   backend, progress, ranks, trust_remote_code, max_shard_bytes)
        return None
    print_ = fingerprint(model_dir, source.files(), recipe.to_dict(), calib, fmt, max_shard_bytes)
    journal = Journal(partial_dir(out_dir), print_, overwrite)
    keep = False
    try:
        with torch.no_grad():
            stream, state = _calibrate_and_journal(model_dir, source, journal, recipe, fmt, calib, tokenizer,
                                                   device, batch_size, backend, progress, ranks, trust_remote_code,
                                                   max_shard_bytes)
        with _stage(stream.run, "write"):
            _write(stream, state, out_dir, model_dir, recipe, overwrite)
    except KeyboardInterrupt:   # interrupted, not wrong: the next run continues (errors leave nothing behind)
        keep = any(p.startswith("layer") for p in journal.parts)
        raise
    finally:
        journal.close(discard=not keep)   # and release the output's lock (taken by Journal)
    run = stream.run
    run.report.weight_errors = weight_errors(state)
    run.report.memory = _memory(run)
    if stream.layers_resumed:
        run.report.notes.append(f"resumed: {stream.layers_resumed} decoder layer(s) taken from the journal")
    return QuantResult(state, run.report, recipe)


def _calibrate_and_journal(model_dir, source, journal, recipe, fmt, calib, tokenizer, device, batch_size,
                           backend, progress, ranks=None, trust_remote_code=False,
                           max_shard_bytes=DEFAULT_MAX_SHARD_BYTES) -> tuple[_Stream, QuantState | None]:
    model = meta_model(model_dir, source, trust_remote_code)
    layers_path, layers = decoder_layers(model)
    load_into(model, source, "", exclude_prefix=layers_path + ".")
    with zero_layers_on_the_fly(model, layers, layers_path):
        run = _start(model, recipe, device if device is not None else "cpu", backend, progress, True)
        if ranks is not None and run.stats.channels is not None:
            run.stats.channels.record_parts = True  # the ranks fold them per layer (Ranks.reduce_observations)
        outside = [t.key for t in run.plan.targets if t.layer is None]
        if outside:
            raise ExportError(f"{outside[0]}: a target outside the decoder layers; streaming quantizes layer by "
                              "layer: exclude it in the recipe or use --no-stream")
        batches = _calibration_batches(run, calib, tokenizer, batch_size)
        if batches:
            check_uniform_layer_arguments(model, layers_path, layers)
    done = frozenset(journal.parts) if journal is not None else frozenset()
    stream = _Stream(run, journal, source, fmt, ranks=ranks, done=ranks.broadcast(done) if ranks else done,
                     max_shard_bytes=max_shard_bytes)
    if ranks is not None:
        batches = ranks.my_batches(batches)
    inputs = []
    if batches:
        with _stage(run, "capture"):
            inputs = capture_layer_inputs(model, layers[0], run.layer_path(0), batches, run.device)
        run.activation_bytes = sum(tensor_bytes(flat_tensors(i.__dict__)) for i in inputs)
    if stream.writer:
        _rest_part(stream)
    for i in _progress(range(len(layers)), progress and stream.writer, "layers"):
        _layer(stream, i, inputs)
        release_heap()   # the layer's tensors are all dropped now: memory stays flat with depth
    return stream, (_final_state(stream) if stream.writer else None)


def _rest_part(stream: _Stream) -> None:
    """The tensors outside the decoder layers (embeddings, final norm, lm_head), exported once."""
    run = stream.run
    if "rest" in stream.done:
        return
    state = QuantState(run.plan, {}, "torch", run.recipe.weights.method)   # streaming: no targets out there
    specs = part_specs(run.model, state, stream.fmt, run.layers_path, None)
    stream.journal.record("rest", part_shards(specs, stream.max_shard_bytes), {})


def _layer(stream: _Stream, i: int, inputs: list) -> None:
    run, part = stream.run, f"layer-{i:05d}"
    path, layer = run.layer_path(i), run.layers[i]
    targets = [t for t in run.plan.targets if t.layer == i]
    with _stage(run, "load"):
        load_into(run.model, stream.source, path + ".", device=run.device)
    try:
        if part in stream.done:
            if stream.writer:
                _restore(stream, stream.journal.summary(part))
            stream.layers_resumed += 1
            with on_device(layer, run.device, path), _stage(run, "replay"):
                _replay(layer, inputs)
            return
        _calibrate_layer(run, i, inputs, stream.ranks)
        if stream.writer:
            with _stage(run, "export"):
                _export_layer(stream, part, i, targets)
    finally:
        free(layer)
    if os.environ.get(KILL_AFTER_LAYER_ENV) == str(i):
        os.kill(os.getpid(), signal.SIGKILL)


def _replay(layer, inputs: list) -> None:
    """A journaled layer's forward on the captured inputs: its outputs become the next layer's inputs."""
    for inp in inputs:
        out = layer(inp.hidden, *inp.args, **inp.kwargs)
        inp.hidden = out[0] if isinstance(out, tuple) else out


def _light(scales: TensorScales) -> TensorScales:
    """Scales without the block scales and codes (those are in the exported tensors): per-target scalars and errors."""
    return replace(scales, block_scale=None, codes=None)


def _layer_kv(run: _Run, path: str) -> dict[str, KVScales]:
    if not run.kv:
        return {}
    seen = {p: a for p, a in run.stats.kv_amax.items() if p.startswith(path + ".")}
    if not seen:
        return {}
    mla = getattr(text_config(run.model), "kv_lora_rank", None) is not None
    out = kv_cache_scales(seen, run.kv, mla)
    for p in seen:
        del run.stats.kv_amax[p]
    return out


def _export_layer(stream: _Stream, part: str, i: int, targets: list[Target]) -> None:
    run, path = stream.run, stream.run.layer_path(i)
    _fill_input_scales(run, targets)
    kv = _layer_kv(run, path)
    keys = [t.key for t in targets]
    sub = QuantState(run.plan.with_targets(tuple(targets), run.plan.excluded), {k: run.tensors[k] for k in keys},
                     ",".join(sorted(run.backends)) or "torch", run.recipe.weights.method, kv, run.kv)
    if targets:
        check_exportable(sub)
    specs = part_specs(run.model, sub, stream.fmt, run.layers_path, i)
    for k in keys:
        run.tensors[k] = _light(run.tensors[k])
    summary = {"tensors": {k: run.tensors[k] for k in keys}, "kv": kv, "backends": sorted(run.backends),
               "coverage": [c for c in run.report.coverage if c.path.startswith(path + ".")]}
    stream.journal.record(part, part_shards(specs, stream.max_shard_bytes), summary)
    stream.kv_scales.update(kv)


def _restore(stream: _Stream, summary: dict) -> None:
    run = stream.run
    run.tensors.update(summary["tensors"])
    run.backends.update(summary["backends"])
    run.report.coverage.extend(summary["coverage"])
    stream.kv_scales.update(summary["kv"])


def _final_state(stream: _Stream) -> QuantState:
    run = stream.run
    tensors = {t.key: run.tensors[t.key] for t in run.plan.targets}
    state = QuantState(run.plan, tensors, ",".join(sorted(run.backends)) or "torch", run.recipe.weights.method)
    if run.kv:
        if not stream.kv_scales:
            raise KVObservationError("kv_cache was requested but no attention layer wrote to the KV cache during "
                                     "calibration; use kv_cache: none for this model")
        state.kv_cache = dict(sorted(stream.kv_scales.items(), key=lambda kv: natural_key(kv[0])))
        state.kv_scheme = run.kv
        if getattr(text_config(run.model), "kv_lora_rank", None) is not None:
            run.report.notes.append("MLA: k_scale = v_scale = amax over the cached latent and k_pe / 448 (one "
                                    "FP8 cache entry, as vLLM stores it)")
    return state


def _write(stream: _Stream, state: QuantState, out_dir: Path, model_dir: Path, recipe: Recipe,
           overwrite: bool) -> Path:
    """The checkpoint from the journal's parts: their shard files are the final ones (``part_shards``, as
    ``export`` writes them), linked in under their final names; configs and copied files added."""
    journal = stream.journal
    order = ["rest"] + [f"layer-{i:05d}" for i in range(len(stream.run.layers))]
    shards = [shard for part in order for shard in journal.shard_files(part)]
    extras = checkpoint_extras(stream.run.model, state, stream.fmt, model_dir, recipe)
    return link_checkpoint(out_dir, [f for f, _ in shards], [t for _, t in shards], extras, overwrite=overwrite,
                           source_dir=model_dir)
