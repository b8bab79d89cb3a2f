"""What a quantize run knows before its first layer: the model's structure, the recipe, the plan (frozen).

``start_job`` builds a ``Job`` (discovery, the recipe applied, the experts containers, where to compute) and
the run's ``Report``; ``calibration_batches`` turns the calibration source into token batches. Nothing here
computes a scale: the per-layer step (``step.py``) does, reading the job and returning data.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moequant import kernels
from moequant.calibrate import CalibrationError
from moequant.calibration_data import CalibrationDataError, calibration_tokens, load_tokenizer
from moequant.discover import decoder_layers, discover, text_config
from moequant.layers.host_memory import bound_cpu_kernel_caches
from moequant.layers.inputs import device_of, probe_ids
from moequant.models.experts import ExpertsContainer, find_experts
from moequant.plan import Plan, Target
from moequant.recipe import Recipe, TargetScheme, apply_recipe
from moequant.report import MemoryReport, Report, tensor_bytes
from moequant.scales import QuantState


@dataclass
class QuantResult:
    state: QuantState     # weight scales of every target, input scales, KV-cache scales
    report: Report
    recipe: Recipe        # the resolved recipe (to write into the checkpoint)


@dataclass(frozen=True)
class Job:
    """The run's fixed facts: read by every step, changed by none."""

    model: nn.Module
    recipe: Recipe
    plan: Plan
    schemes: dict[str, TargetScheme]
    containers: dict[str, ExpertsContainer]
    layers_path: str
    layers: nn.ModuleList
    device: torch.device
    backend: str

    @property
    def observe_activations(self) -> bool:
        return self.recipe.input_scheme is not None

    @property
    def observe_targets(self) -> bool:
        """Target hooks are attached for input scales and/or weighted_mse's / gptq's channel statistics."""
        return self.observe_activations or self.recipe.needs_channel_stats

    @property
    def kv(self) -> str | None:
        return None if self.recipe.kv_cache == "none" else self.recipe.kv_cache

    @property
    def mla(self) -> bool:
        return getattr(text_config(self.model), "kv_lora_rank", None) is not None

    def layer_path(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def targets_of(self, layer: int | None) -> list[Target]:
        return [t for t in self.plan.targets if t.layer == layer]


@contextmanager
def timed(seconds: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def start_job(model: nn.Module, recipe: Recipe, device, backend: str, sequential: bool) -> tuple[Job, Report]:
    bound_cpu_kernel_caches()   # before this run's first CPU matmul (the probes below run some)
    report = Report(recipe.name, sequential, "", 0, recipe.calibration.dead_experts, recipe.calibration.min_tokens)
    start = time.perf_counter()
    layers_path, layers = decoder_layers(model)
    home = device_of(layers[0], f"{layers_path}.0") or torch.device("cpu")
    where = torch.device(device) if device is not None else home
    _compile_ahead(recipe, layers, where, backend)
    plan, schemes = apply_recipe(recipe, discover(model))
    report.stage_seconds["discover"] = time.perf_counter() - start
    containers = {c.path: c for c in find_experts(model, int(text_config(model).hidden_size))}
    job = Job(model, recipe, plan, schemes, containers, layers_path, layers, where, backend)
    if not sequential and where != home:
        raise ValueError(f"sequential=False runs the model where it is ({home}); move the model to {device} "
                         "first or use sequential=True")
    if recipe.smoothing.enabled and not sequential:
        raise CalibrationError("smoothing folds factors into one decoder layer at a time; use sequential=True")
    outside = [t.key for t in job.targets_of(None)]
    if outside and sequential and (job.observe_targets or job.kv):
        raise CalibrationError(
            f"targets outside the decoder layers ({', '.join(outside[:3])}) cannot be activation-calibrated layer "
            "by layer; exclude them in the recipe or use sequential=False")
    report.groups = list(plan.groups)
    return job, report


def _compile_ahead(recipe: Recipe, layers, device: torch.device, backend: str) -> None:
    """A fresh process compiles the GPU block-scale search while discovery and the calibration forward run."""
    w = recipe.weights
    if w.format != "nvfp4" or w.global_search or w.four_over_six or device.type != "cuda":
        return
    dtype = next((p.dtype for p in layers[0].parameters() if p.is_floating_point()), None)
    if dtype in (torch.bfloat16, torch.float16, torch.float32):
        kernels.compile_ahead(device, dtype, w.method, backend)


def calibration_batches(job: Job, report: Report, calib, tokenizer, batch_size: int) -> list[torch.Tensor]:
    """The calibration token batches (``[batch, seq]`` each); none when the recipe needs no data."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not job.observe_targets and job.kv != "fp8":
        if job.kv == "fp8-cast":  # scales are 1.0; one probe forward finds the attention layers
            report.calibration = "8-token probe (fp8-cast KV needs no data)"
            return [probe_ids(job.model)]
        return []
    spec = job.recipe.calibration
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    with timed(report.stage_seconds, "data"):
        data = calibration_tokens(calib, tokenizer, samples=spec.samples, seq_len=spec.seq_len, seed=spec.seed)
    vocab = job.model.get_input_embeddings().weight.shape[0]
    if int(data.tokens.max()) >= vocab or int(data.tokens.min()) < 0:
        raise CalibrationDataError(f"calibration token ids span [{int(data.tokens.min())}, "
                                   f"{int(data.tokens.max())}] but the model's vocabulary has {vocab} entries: "
                                   "use the model's own tokenizer")
    report.calibration, report.tokens = data.source, data.tokens.numel()
    return list(data.tokens.split(batch_size))


def check_hessian_memory(job: Job, batches: int, copies: int | None = None, sequential: bool = True) -> None:
    """Before the first forward: "gptq" keeps every X^T X sum of a decoder layer (float64, ``8 K^2`` bytes per
    linear, ``8 E K^2`` per experts projection: 105 GiB for a DeepSeek-V3 gate_up, 256 x 7168^2) until that
    layer's weights are done; all layers at once with ``sequential=False``. Under torchrun (``copies`` given)
    the sums live on the host, ``copies`` times: each rank keeps one per calibration batch of its own, plus the
    running total and one received sum of the ranks' fold (``ranks._fold_channel_sums``).
    Raises a one-line ``CalibrationError`` when that exceeds the memory free where the sums live, instead of
    failing (or being killed) hours into the run."""
    if not job.recipe.needs_hessians or not batches:
        return
    per_layer: dict = {}
    for t in job.plan.targets:
        if t.layer is not None:
            k = t.shape[-1]
            per_layer.setdefault(t.layer, []).append((8 * (t.shape[0] if t.kind == "experts" else 1) * k * k, t.key))
    if not per_layer:
        return
    distributed = copies is not None
    copies = copies if distributed else 1
    where = torch.device("cpu") if distributed else job.device
    if sequential:
        layer = max(per_layer, key=lambda i: sum(b for b, _ in per_layer[i]))
        parts, label = per_layer[layer], job.layer_path(layer)
    else:
        parts, label = [p for ps in per_layer.values() for p in ps], "all decoder layers (sequential=False)"
    need = copies * sum(b for b, _ in parts)
    free = _free_bytes(where)
    if free is not None and need > free:
        biggest = max(parts)
        copied = f"; x {copies} copies on this host under torchrun: each rank's batches and its fold" \
            if distributed else ""
        raise CalibrationError(
            f"weights.method gptq: the X^T X sums of {label} need {need / 2**30:.1f} GiB (float64; the largest, "
            f"{biggest[1]}, {biggest[0] / 2**30:.1f} GiB{copied}) but {where} has {free / 2**30:.1f} GiB free: "
            "use nvfp4-best (the same scales, round-to-nearest codes) or a device with more memory")


def _free_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now (CUDA: the driver's free memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def memory_report(job: Job, activation_bytes: int) -> MemoryReport:
    model_bytes = tensor_bytes(list(job.model.parameters()) + list(job.model.buffers()))
    largest = max(tensor_bytes(list(layer.parameters()) + list(layer.buffers())) for layer in job.layers)
    peak = torch.cuda.max_memory_allocated(job.device) if job.device.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB
    return MemoryReport(str(job.device), peak, model_bytes, largest, activation_bytes, rss)


def progress_bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)
