"""``quantize_streamed``: quantize a model directory holding one decoder layer in memory at a time.

    config -> model skeleton on the meta device (no weights)
           -> load the tensors outside the decoder layers (embeddings, final norm, lm_head) once
           -> Job (discover) + per-layer argument check: probe forwards in which each layer is zero-filled only
              while it runs (``meta_model.zero_layers_on_the_fly``): no weight is read
           -> capture decoder layer 0's inputs (the forward stops before layer 0)
           -> the layer loop (``loop.py``): layers read from the shards one layer ahead (``ShardLayers``)
              -> the per-layer step -> each result written as its checkpoint part into the journal, in the
              background while the next layer computes (``Journaled``)
           -> the checkpoint: the journal's shard files linked in under their final names, configs added,
              moved into place atomically

The checkpoint is byte-identical to ``quantize`` + ``export`` on the loaded model: the same loop and step
compute the same values in the same order, and both write the checkpoint as the same parts
(``export.part_specs``). Memory: two decoder layers (one computing, one being read) + the calibration
activations + the non-layer tensors.

Resume (``journal.py``): every finished part is journaled in ``<parent>/.<name>.moequant-partial``; running the
same command again replays the finished layers' forward (their outputs are the next layers' inputs; nothing is
recalibrated) and continues with the first unfinished one. The returned ``QuantState`` holds every target's
scalars and error statistics but no block scales or codes (they live in the written checkpoint).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import torch

from moequant.discover import decoder_layers
from moequant.export import FORMATS, checkpoint_extras
from moequant.export.common import unquantized_tensors
from moequant.export.writer import DEFAULT_MAX_SHARD_BYTES, ExportError, _check_target, link_checkpoint
from moequant.journal import Journal, fingerprint, partial_dir
from moequant.layers.inputs import capture_layer_inputs, check_uniform_layer_arguments, flat_tensors
from moequant.layers.job import QuantResult, calibration_batches, check_hessian_memory, memory_report, start_job, \
    timed
from moequant.layers.loop import assemble_state, run_layers
from moequant.layers.meta_model import load_into, meta_model, zero_layers_on_the_fly
from moequant.layers.ranks import Ranks
from moequant.layers.sinks import Journaled, Skip, part_name
from moequant.layers.sources import ShardLayers, host_copies
from moequant.layers.step import LayerResult, frozen
from moequant.recipe import Recipe, load_recipe
from moequant.report import tensor_bytes, weight_errors
from moequant.safetensors_source import SafetensorsSource


def quantize_streamed(model_dir: str | Path, out_dir: str | Path, recipe: str | Path | Recipe = "nvfp4",
                      fmt: str = "modelopt", calib=None, *, tokenizer=None, device: str | torch.device = "cpu",
                      batch_size: int = 8, backend: str = "auto", overwrite: bool = False, progress: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, trust_remote_code: bool = False,
                      ) -> QuantResult | None:
    """Quantize the safetensors model in ``model_dir`` layer by layer and write the checkpoint to ``out_dir``.

    Arguments as ``quantize`` + ``export.export``. A partial run of the same model, recipe, calibration,
    format and version found next to ``out_dir`` is continued; one of another is refused (``JournalMismatch``)
    unless ``overwrite``. On an error (a corrupt shard, a NaN weight, ...) nothing is left behind; a killed
    or interrupted (Ctrl-C) run leaves its journal for the next run to continue. Under torch.distributed
    (``ranks.py``) every rank calls this; rank 0 writes and returns the result, the other ranks return None.
    """
    start = time.perf_counter()
    model_dir, out_dir, recipe = Path(model_dir), Path(out_dir).absolute(), load_recipe(recipe)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    _check_target(out_dir, overwrite, model_dir)
    shards = SafetensorsSource(model_dir)
    ranks = Ranks.current()
    args = (model_dir, shards, recipe, fmt, calib, tokenizer, device if device is not None else "cpu", batch_size,
            backend, progress, ranks, trust_remote_code, max_shard_bytes)
    if ranks is not None and not ranks.writer:   # the other ranks compute and send; they write nothing
        with torch.no_grad():
            _stream(None, *args)
        return None
    print_ = fingerprint(model_dir, shards.files(), recipe.to_dict(), calib, fmt, max_shard_bytes)
    journal = Journal(partial_dir(out_dir), print_, overwrite)
    try:
        _check_target(out_dir, overwrite, model_dir)   # again under the lock, which may have put a checkpoint back
    except BaseException:
        journal.close(discard=not journal.parts)   # finished parts stay for a rerun with --overwrite
        raise
    setup, keep, result = time.perf_counter() - start, False, None   # the shards' headers, the journal
    try:
        with torch.no_grad():
            result, write_extras = _stream(journal, *args)
        result.report.stage_seconds = {"setup": setup, **result.report.stage_seconds}
        with timed(result.report.stage_seconds, "write"):
            _link(journal, out_dir, write_extras, overwrite, model_dir)
    except KeyboardInterrupt:   # interrupted, not wrong: the next run continues (errors leave nothing behind)
        keep = any(p.startswith("layer") for p in journal.parts)
        raise
    finally:
        with timed(result.report.stage_seconds if result is not None else {}, "write"):
            journal.close(discard=not keep)   # and release the output's lock (taken by Journal)
    return result


def _stream(journal, model_dir, shards, recipe, fmt, calib, tokenizer, device, batch_size, backend, progress,
            ranks, trust_remote_code, max_shard_bytes):
    start = time.perf_counter()
    model = meta_model(model_dir, shards, trust_remote_code)
    layers_path, layers = decoder_layers(model)
    load_into(model, shards, "", exclude_prefix=layers_path + ".")
    model_seconds = time.perf_counter() - start
    with zero_layers_on_the_fly(model, layers, layers_path):
        job, report = start_job(model, recipe, device, backend, True)
        report.stage_seconds = {"model": model_seconds, **report.stage_seconds}
        outside = [t.key for t in job.targets_of(None)]
        if outside:
            raise ExportError(f"{outside[0]}: a target outside the decoder layers; streaming quantizes layer by "
                              "layer: exclude it in the recipe or use --no-stream")
        batches = calibration_batches(job, report, calib, tokenizer, batch_size)
        if batches:
            with timed(report.stage_seconds, "probe"):
                check_uniform_layer_arguments(model, layers_path, layers)
    done = frozenset(journal.parts) if journal is not None else frozenset()
    if ranks is not None:
        done = ranks.broadcast(done)
        batches = ranks.my_batches(batches)
        # every rank of a (single-host) torchrun keeps its batches' sums, a running total and one received sum
        check_hessian_memory(job, len(batches), copies=ranks.world * (len(batches) + 2))
    else:
        check_hessian_memory(job, len(batches))
    inputs = []
    if batches:
        with timed(report.stage_seconds, "capture"):
            inputs = capture_layer_inputs(model, layers[0], job.layer_path(0), batches, job.device)
    activation_bytes = sum(tensor_bytes(flat_tensors(i.__dict__)) for i in inputs)
    sink = (Skip(done) if journal is None
            else Journaled(job, journal, fmt, max_shard_bytes, seconds=report.stage_seconds))
    with ExitStack() as stack:
        source = ShardLayers(job, shards, report.stage_seconds)
        stack.callback(source.close)
        if journal is not None:
            stack.callback(sink.finish)
            if not sink.done(None):   # the tensors outside the decoder layers, written once
                rest = unquantized_tensors(model, job.plan, "", layers_path + ".")
                sink.put(LayerResult(None, frozen({}), frozen({}), (), frozenset(), frozen({}), host_copies(rest)))
        resumed = run_layers(job, source, sink, inputs, report, ranks, progress and journal is not None)
    if journal is None:
        return None
    with timed(report.stage_seconds, "finalize"):
        state = assemble_state(job, sink.results, report)
    report.weight_errors = weight_errors(state)
    report.memory = memory_report(job, activation_bytes)
    if resumed:
        report.notes.append(f"resumed: {resumed} decoder layer(s) taken from the journal")
    return QuantResult(state, report, recipe), checkpoint_extras(model, state, fmt, model_dir, recipe)


def _link(journal: Journal, out_dir: Path, write_extras, overwrite: bool, model_dir: Path) -> Path:
    """The checkpoint from the journal's parts: their shard files are the final ones (``part_shards``, as
    ``export`` writes them), linked in under their final names; configs and copied files added."""
    layers = sorted(p for p in journal.parts if p.startswith("layer-"))
    shards = [shard for part in [part_name(None), *layers] for shard in journal.shard_files(part)]
    return link_checkpoint(out_dir, [f for f, _ in shards], [t for _, t in shards], write_extras,
                           overwrite=overwrite, source_dir=model_dir)
