"""``quantize(model, recipe, calib)``: the calibrated state of a model in memory, one decoder layer at a time.

    recipe -> Job (discover, recipe applied) -> calibration tokens
           -> capture decoder layer 0's inputs (hidden states + the arguments the layer gets: position
              embeddings, masks, ...) for every calibration sample, stopping the forward there
           -> the layer loop (``loop.py``): the model's layers (each moved to ``device`` while it runs)
              -> the per-layer step -> collected results
           -> targets outside the decoder layers (weights only) -> ``QuantResult(state, report, recipe)``

Layer by layer replays layer 0's keyword arguments for every layer, which is right only when every layer
receives the same ones; a probe forward (8 tokens) checks that and refuses models whose layers differ
(sliding / full attention mixes): ``sequential=False`` calibrates those with whole-model forwards (the
all-at-once reference, ``_all_at_once``). The user's model is left as it was: weights, config, generation
config, devices and training mode (it runs in eval mode under ``torch.no_grad``; modes restored in ``finally``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from moequant.calibrate import ActivationStats, observing
from moequant.channel_stats import ChannelStats
from moequant.layers.inputs import capture_layer_inputs, check_uniform_layer_arguments, flat_tensors, \
    input_device
from moequant.layers.job import Job, QuantResult, calibration_batches, check_hessian_memory, memory_report, \
    progress_bar, start_job, timed
from moequant.layers.loop import account, assemble_state, run_layers
from moequant.layers.sinks import Collect
from moequant.layers.sources import ModelLayers
from moequant.layers.step import LayerResult, calibrate_layer, finish_coverage, frozen, layer_weights, with_input_scales
from moequant.kv_cache import kv_cache_scales
from moequant.recipe import Recipe, load_recipe
from moequant.report import Report, tensor_bytes, weight_errors


@contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def quantize(model: nn.Module, recipe: str | Path | Recipe = "nvfp4", calib=None, *, tokenizer=None,
             device: str | torch.device | None = None, batch_size: int = 8, backend: str = "auto",
             sequential: bool = True, progress: bool = False) -> QuantResult:
    """Calibrate ``model`` (a transformers 5.x causal LM) under ``recipe``; the model is left unchanged.

    ``calib``: calibration source (see ``moequant.calibration_data``: None = built-in text, a text file, a list of
    strings, token ids); ``tokenizer``: a tokenizer or a model directory holding one (needed for text).
    ``device``: where each layer is calibrated (default: where the model is). ``batch_size``: calibration
    sequences per forward. ``backend``: block-scale search backend (``moequant.kernels``). ``sequential=False``:
    the all-at-once reference (whole-model forwards where the model is). Activations are observed on the
    unquantized model (each layer's input is the previous layer's unquantized output), as ModelOpt does.
    ``report.memory.device_peak`` is the CUDA allocator's peak during calibration (all tensors on the device).
    """
    recipe = load_recipe(recipe)
    with torch.no_grad(), _eval_mode(model):
        job, report = start_job(model, recipe, device, backend, sequential)
        batches = calibration_batches(job, report, calib, tokenizer, batch_size)
        check_hessian_memory(job, len(batches), sequential=sequential)
        if job.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(job.device)
        if sequential:
            results, activation_bytes = _layer_by_layer(job, report, batches, progress)
        else:
            results, activation_bytes = [_all_at_once(job, report, batches, progress)], 0
        with timed(report.stage_seconds, "finalize"):
            state = assemble_state(job, results, report)
    report.weight_errors = weight_errors(state)
    report.memory = memory_report(job, activation_bytes)
    return QuantResult(state, report, recipe)


def _layer_by_layer(job: Job, report: Report, batches, progress: bool) -> tuple[list[LayerResult], int]:
    inputs = []
    if batches:
        with timed(report.stage_seconds, "capture"):
            check_uniform_layer_arguments(job.model, job.layers_path, job.layers)
            inputs = capture_layer_inputs(job.model, job.layers[0], job.layer_path(0), batches, job.device)
    activation_bytes = sum(tensor_bytes(flat_tensors(i.__dict__)) for i in inputs)
    sink = Collect()
    run_layers(job, ModelLayers(job, report.stage_seconds), sink, inputs, report, progress=progress)
    outside = calibrate_layer(job, None, [])   # targets outside the decoder layers: weights only
    account(report, outside)
    return sink.results + [outside], activation_bytes


def _all_at_once(job: Job, report: Report, batches, progress: bool) -> LayerResult:
    """Reference: the whole plan's weights in one call, whole-model forwards with every observer attached."""
    seconds: dict[str, float] = {}
    stats = ActivationStats(channels=ChannelStats(hessians=job.recipe.needs_hessians)
                            if job.recipe.needs_channel_stats else None)
    targets = list(job.plan.targets)
    if not job.recipe.needs_channel_stats:
        with timed(seconds, "weights"):
            tensors, backends = layer_weights(job, targets, stats, None)
    coverage, expert_amax = [], {}
    if batches:
        kv_layers = [(job.layer_path(i), layer) for i, layer in enumerate(job.layers)] if job.kv else []
        with timed(seconds, "observe"), observing(job.model, "", job.plan, job.containers, stats,
                                                  policy=job.recipe.calibration.dead_experts,
                                                  activations=job.observe_targets, kv_layers=kv_layers):
            for batch in progress_bar(batches, progress, "batches"):
                job.model(input_ids=batch.to(input_device(job.model)), use_cache=False)
        with timed(seconds, "coverage"):
            coverage, expert_amax = finish_coverage(job, stats)
    if job.recipe.needs_channel_stats:
        with timed(seconds, "weights"):
            tensors, backends = layer_weights(job, targets, stats, None)
    if job.observe_activations:
        tensors = with_input_scales(job, targets, tensors, stats, expert_amax)
    kv = kv_cache_scales(stats.kv_amax, job.kv, job.mla) if job.kv and stats.kv_amax else {}
    result = LayerResult(None, frozen(tensors), frozen(kv), tuple(coverage), frozenset(backends), frozen(seconds))
    account(report, result)
    return result
