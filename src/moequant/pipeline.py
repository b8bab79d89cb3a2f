"""``quantize(model, recipe, calib)``: the calibrated state of a model, one decoder layer at a time.

    recipe -> discover -> apply_recipe -> calibration tokens
           -> capture decoder layer 0's inputs (hidden states + the arguments the layer gets: position
              embeddings, masks, ...) for every calibration sample, stopping the forward there
           -> for each decoder layer: move it (only it) to ``device``; weight scales of its targets
              (``calibrate_weights`` on a plan of this layer, so the result equals an all-at-once run); run it
              on the captured inputs with observers attached, its outputs become the next layer's inputs;
              cover its under-covered experts (targeted pass); move it back
           -> input scales (group max), KV-cache scales -> ``QuantResult(state, report, recipe)``

Layer by layer replays layer 0's keyword arguments for every layer, which is right only when every layer
receives the same ones; a probe forward (8 tokens) checks that and refuses models whose layers differ
(sliding / full attention mixes): ``sequential=False`` calibrates those with whole-model forwards.
The user's model is left as it was: weights, config, generation config, devices and training mode (it runs
in eval mode under ``torch.no_grad`` and each module's mode is restored in ``finally``).
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from moequant.calibrate import (
    ActivationStats,
    CalibrationError,
    finish_experts,
    input_scale,
    linear_input_amax,
    observing,
)
from moequant.channel_stats import ChannelStats, channel_weights, hessians
from moequant.data import CalibrationDataError, calibration_tokens, load_tokenizer
from moequant.discover import decoder_layers, discover, text_config
from moequant import kernels
from moequant.kv_cache import kv_cache_scales
from moequant.layerwise import (
    LayerInput,
    capture_layer_inputs,
    check_uniform_layer_arguments,
    device_of,
    flat_tensors,
    input_device,
    on_device,
    probe_ids,
)
from moequant.models.experts import ExpertsContainer, find_experts
from moequant.plan import Plan
from moequant.weights import calibrate_weights
from moequant.recipe import Recipe, TargetScheme, apply_recipe, load_recipe
from moequant.report import MemoryReport, Report, tensor_bytes, weight_errors
from moequant.state import QuantState, TensorScales


@dataclass
class QuantResult:
    state: QuantState     # weight scales of every target, input scales, KV-cache scales
    report: Report
    recipe: Recipe        # the resolved recipe (to write into the checkpoint)


@dataclass
class _Run:
    model: nn.Module
    recipe: Recipe
    plan: Plan
    schemes: dict[str, TargetScheme]
    containers: dict[str, ExpertsContainer]
    layers_path: str
    layers: nn.ModuleList
    device: torch.device
    backend: str
    progress: bool
    stats: ActivationStats = field(default_factory=ActivationStats)
    tensors: dict[str, TensorScales] = field(default_factory=dict)
    backends: set = field(default_factory=set)
    expert_amax: dict = field(default_factory=dict)       # container path -> (gate_up amax [E], down amax [E])
    report: Report | None = None
    activation_bytes: int = 0

    @property
    def observe_activations(self) -> bool:
        return self.recipe.input_scheme is not None

    @property
    def observe_targets(self) -> bool:
        """Target hooks are attached for input scales and/or weighted_mse's channel statistics."""
        return self.observe_activations or self.recipe.needs_channel_stats

    @property
    def kv(self) -> str | None:
        return None if self.recipe.kv_cache == "none" else self.recipe.kv_cache

    def layer_path(self, i: int) -> str:
        return f"{self.layers_path}.{i}"


@contextmanager
def _stage(run: _Run, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        run.report.stage_seconds[name] = run.report.stage_seconds.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ------------------------------------------------------------------------------------------ public API


def quantize(model: nn.Module, recipe: str | Path | Recipe = "nvfp4", calib=None, *, tokenizer=None,
             device: str | torch.device | None = None, batch_size: int = 8, backend: str = "auto",
             sequential: bool = True, progress: bool = False) -> QuantResult:
    """Calibrate ``model`` (a transformers 5.x causal LM) under ``recipe``; the model is left unchanged.

    ``calib``: calibration source (see ``moequant.data``: None = built-in text, a text file, a list of
    strings, token ids); ``tokenizer``: a tokenizer or a model directory holding one (needed for text).
    ``device``: where each layer is calibrated (default: where the model is). ``batch_size``: calibration
    sequences per forward. ``backend``: block-scale search backend (``moequant.kernels``). ``sequential=False``:
    the all-at-once reference (whole-model forwards where the model is). Activations are observed on the
    unquantized model (each layer's input is the previous layer's unquantized output), as ModelOpt does.
    ``report.memory.device_peak`` is the CUDA allocator's peak during calibration (all tensors on the device).
    """
    recipe = load_recipe(recipe)
    with torch.no_grad(), _eval_mode(model):
        run = _start(model, recipe, device, backend, progress, sequential)
        batches = _calibration_batches(run, calib, tokenizer, batch_size)
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        if sequential:
            _run_sequential(run, batches)
        else:
            _run_all_at_once(run, batches)
        with _stage(run, "finalize"):
            _fill_input_scales(run)
            state = _state(run)
    run.report.weight_errors = weight_errors(state)
    run.report.memory = _memory(run)
    return QuantResult(state, run.report, recipe)


def _start(model, recipe: Recipe, device, backend: str, progress: bool, sequential: bool) -> _Run:
    report = Report(recipe.name, sequential, "", 0, recipe.calibration.dead_experts, recipe.calibration.min_tokens)
    start = time.perf_counter()
    layers_path, layers = decoder_layers(model)
    home = device_of(layers[0], f"{layers_path}.0") or torch.device("cpu")
    _compile_ahead(recipe, layers, torch.device(device) if device is not None else home, backend)
    plan, schemes = apply_recipe(recipe, discover(model))
    report.stage_seconds["discover"] = time.perf_counter() - start
    hidden = int(text_config(model).hidden_size)
    containers = {c.path: c for c in find_experts(model, hidden)}
    run = _Run(model, recipe, plan, schemes, containers, layers_path, layers,
               torch.device(device) if device is not None else home, backend, progress, report=report)
    if not sequential and device is not None and torch.device(device) != home:
        raise ValueError(f"sequential=False runs the model where it is ({home}); move the model to {device} "
                         "first or use sequential=True")
    outside = [t.key for t in plan.targets if t.layer is None]
    if outside and sequential and (run.observe_targets or run.kv):
        raise CalibrationError(
            f"targets outside the decoder layers ({', '.join(outside[:3])}) cannot be activation-calibrated layer "
            "by layer; exclude them in the recipe or use sequential=False")
    report.groups = list(plan.groups)
    if recipe.needs_channel_stats:
        run.stats.channels = ChannelStats(hessians=recipe.needs_hessians)
    return run


def _compile_ahead(recipe: Recipe, layers, device: torch.device, backend: str) -> None:
    """A fresh process compiles the GPU block-scale search while discovery and the calibration forward run."""
    w = recipe.weights
    if w.format != "nvfp4" or w.global_search or w.four_over_six or device.type != "cuda":
        return
    dtype = next((p.dtype for p in layers[0].parameters() if p.is_floating_point()), None)
    if dtype in (torch.bfloat16, torch.float16, torch.float32):
        kernels.compile_ahead(device, dtype, w.method, backend)


def _calibration_batches(run: _Run, calib, tokenizer, batch_size: int) -> list[torch.Tensor]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not run.observe_targets and run.kv != "fp8":
        if run.kv == "fp8-cast":  # scales are 1.0; one probe forward finds the attention layers
            run.report.calibration = "8-token probe (fp8-cast KV needs no data)"
            return [probe_ids(run.model)]
        return []
    spec = run.recipe.calibration
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    with _stage(run, "data"):
        data = calibration_tokens(calib, tokenizer, samples=spec.samples, seq_len=spec.seq_len, seed=spec.seed)
    vocab = run.model.get_input_embeddings().weight.shape[0]
    if int(data.tokens.max()) >= vocab or int(data.tokens.min()) < 0:
        raise CalibrationDataError(f"calibration token ids span [{int(data.tokens.min())}, "
                                   f"{int(data.tokens.max())}] but the model's vocabulary has {vocab} entries: "
                                   "use the model's own tokenizer")
    run.report.calibration, run.report.tokens = data.source, data.tokens.numel()
    return list(data.tokens.split(batch_size))


# ------------------------------------------------------------------------------------------ sequential


def _run_sequential(run: _Run, batches: list[torch.Tensor]) -> None:
    inputs: list[LayerInput] = []
    if batches:
        with _stage(run, "capture"):
            check_uniform_layer_arguments(run.model, run.layers_path, run.layers)
            inputs = capture_layer_inputs(run.model, run.layers[0], run.layer_path(0), batches, run.device)
        run.activation_bytes = sum(tensor_bytes(flat_tensors(i.__dict__)) for i in inputs)
    for i in _progress(range(len(run.layers)), run.progress, "layers"):
        _calibrate_layer(run, i, inputs)
    with _stage(run, "weights"):
        _calibrate_weights(run, [t for t in run.plan.targets if t.layer is None])


def _calibrate_layer(run: _Run, i: int, inputs: list[LayerInput], ranks=None) -> None:
    """Weight scales and observation of decoder layer ``i`` on ``run.device`` (also used by ``stream.py``).

    ``ranks`` (a ``distributed.Ranks``, streaming under torch.distributed): this process searches only its
    share of the layer's weights (gathered to rank 0) and observes only its calibration batches (reduced)."""
    path, layer = run.layer_path(i), run.layers[i]
    targets = [t for t in run.plan.targets if t.layer == i]
    with on_device(layer, run.device, path):
        if inputs and run.recipe.needs_channel_stats:  # weighted_mse: statistics before the search
            _observe_layer(run, i, inputs, ranks)
        with _stage(run, "weights"):
            _calibrate_weights(run, targets if ranks is None else ranks.mine(targets))
            if ranks is not None:
                ranks.gather_scales(run, targets)
        if run.stats.channels is not None:   # gptq's X^T X sums live for one layer only
            run.stats.channels.drop_hessians(path + ".")
        if inputs and not run.recipe.needs_channel_stats:
            _observe_layer(run, i, inputs, ranks)


def _observe_layer(run: _Run, i: int, inputs: list[LayerInput], ranks=None) -> None:
    path, layer = run.layer_path(i), run.layers[i]
    kv_layers = [(path, layer)] if run.kv else []
    with _stage(run, "observe"), observing(layer, path, run.plan, run.containers, run.stats,
                                           policy=run.recipe.calibration.dead_experts,
                                           activations=run.observe_targets, kv_layers=kv_layers):
        for inp in inputs:
            out = layer(inp.hidden, *inp.args, **inp.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if out.shape != inp.hidden.shape:
                raise CalibrationError(f"{path} returned shape {tuple(out.shape)} for input "
                                       f"{tuple(inp.hidden.shape)}; cannot chain layers")
            inp.hidden = out
    if ranks is not None:
        ranks.reduce_observations(run, path + ".")
    with _stage(run, "coverage"):
        _finish_containers(run, path + ".")
    if ranks is not None:
        ranks.reduce_expert_amax(run, path + ".")


def _finish_containers(run: _Run, prefix: str) -> None:
    spec = run.recipe.calibration
    for cpath, obs in run.stats.experts.items():
        if cpath.startswith(prefix) and cpath not in run.expert_amax:
            gate_up, down, record = finish_experts(obs, run.containers[cpath], spec.dead_experts, spec.min_tokens,
                                                   spec.input_floor)
            run.expert_amax[cpath] = (gate_up, down)
            run.report.coverage.append(record)


def _calibrate_weights(run: _Run, targets: list) -> None:
    if not targets:
        return
    sub = run.plan.with_targets(tuple(targets), run.plan.excluded)
    spec = run.recipe.weights
    weights = _channel_weights(run, targets) if run.recipe.needs_channel_stats else None
    grams = _channel_weights(run, targets, hessians) if run.recipe.needs_hessians else None
    state = calibrate_weights(run.model, sub, method=spec.method, backend=run.backend, channel_weights=weights,
                              global_search=spec.global_search, four_over_six=spec.four_over_six,
                              hessians=grams)
    run.backends.update(state.backend.split(","))
    copied = False
    for key, scales in state.tensors.items():
        host = {f.name: _to_host(getattr(scales, f.name)) for f in fields(scales)
                if isinstance(getattr(scales, f.name), torch.Tensor)}
        copied = copied or any(getattr(scales, k).device.type == "cuda" for k in host)
        run.tensors[key] = replace(scales, **host)
    if copied:
        torch.cuda.current_stream().synchronize()   # the copies above were queued; one wait for all of them


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU. From a GPU into pinned memory, queued (the caller waits once): a layer's codes are
    hundreds of MB, and pageable copies of them ran at ~2 GB/s (3.1 s of a 12-layer Qwen3-30B-A3B job on an
    H200); pinned blocks come from torch's caching host allocator, so each layer reuses the last one's."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def _channel_weights(run: _Run, targets: list, of=channel_weights) -> dict:
    """weighted_mse's channel weights (``of=hessians``: gptq's X^T X) of ``targets``, observed before their
    weights are searched."""
    keys = [t.key for t in targets if run.schemes[t.key].weights == "nvfp4"]
    try:
        return of(run.plan, run.stats.channels, run.containers, keys, run.recipe.calibration.min_tokens)
    except KeyError as err:
        raise CalibrationError(f"{run.recipe.weights.method}: {err.args[0]}; calibrate with data that reaches every "
                               "target, or exclude the target in the recipe") from None


# ------------------------------------------------------------------------------------------ all at once


def _run_all_at_once(run: _Run, batches: list[torch.Tensor]) -> None:
    """Reference: weights of the whole plan in one call, whole-model forwards with every observer attached."""
    if not run.recipe.needs_channel_stats:
        with _stage(run, "weights"):
            _calibrate_weights(run, list(run.plan.targets))
    if not batches:
        return
    kv_layers = [(run.layer_path(i), layer) for i, layer in enumerate(run.layers)] if run.kv else []
    with _stage(run, "observe"), observing(run.model, "", run.plan, run.containers, run.stats,
                                           policy=run.recipe.calibration.dead_experts,
                                           activations=run.observe_targets, kv_layers=kv_layers):
        for batch in _progress(batches, run.progress, "batches"):
            run.model(input_ids=batch.to(input_device(run.model)), use_cache=False)
    with _stage(run, "coverage"):
        _finish_containers(run, "")
    if run.recipe.needs_channel_stats:
        with _stage(run, "weights"):
            _calibrate_weights(run, list(run.plan.targets))


# ------------------------------------------------------------------------------------------ results


def _fill_input_scales(run: _Run, targets=None) -> None:
    """Input scales of ``targets`` (default: the whole plan; groups never span decoder layers)."""
    if not run.observe_activations:
        return
    plan = run.plan
    targets = plan.targets if targets is None else targets
    linear = linear_input_amax(plan, run.stats, [t.key for t in targets if t.kind == "linear"])
    for t in targets:
        if t.kind == "linear":
            amax = linear[t.key]
        else:
            if t.module_path not in run.expert_amax:
                raise CalibrationError(f"{t.module_path}: no calibration token reached this experts container; "
                                       "check that the model's forward reaches it")
            gate_up, down = run.expert_amax[t.module_path]
            amax = gate_up if t.param_name == run.containers[t.module_path].layout.gate_up else down
        run.tensors[t.key].input_scale = input_scale(amax, run.schemes[t.key].activations)


def _state(run: _Run) -> QuantState:
    tensors = {t.key: run.tensors[t.key] for t in run.plan.targets}
    state = QuantState(run.plan, tensors, ",".join(sorted(run.backends)) or "torch", run.recipe.weights.method)
    if run.kv:
        mla = getattr(text_config(run.model), "kv_lora_rank", None) is not None
        state.kv_cache, state.kv_scheme = kv_cache_scales(run.stats.kv_amax, run.kv, mla), run.kv
        if mla:
            run.report.notes.append("MLA: k_scale = v_scale = amax over the cached latent and k_pe / 448 (one "
                                    "FP8 cache entry, as vLLM stores it)")
    return state


def _memory(run: _Run) -> MemoryReport:
    model_bytes = tensor_bytes(list(run.model.parameters()) + list(run.model.buffers()))
    largest = max(tensor_bytes(list(layer.parameters()) + list(layer.buffers())) for layer in run.layers)
    peak = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB
    return MemoryReport(str(run.device), peak, model_bytes, largest, run.activation_bytes, rss)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)
