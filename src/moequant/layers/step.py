"""The per-layer step: one decoder layer's inputs and weights -> a frozen ``LayerResult``. The only place that
computes; the loop (``loop.py``) feeds it and hands what it returns to a sink.

    observe (activation amax, routing, channel statistics, KV)  -- on the layer's calibration inputs
    -> coverage (under-covered experts get their remedy)         -- before any scale is taken from them
    -> weights: global scales (groups fixed) -> block-scale search -> codes, on the compute device
    -> input scales, KV scales -> LayerResult (codes and scales on the host)

With weighted_mse / gptq the observation runs first (the search needs its statistics), otherwise after the
weights (the observed forward runs the unquantized layer either way, so the order changes no value). The
observed forward's outputs replace ``inputs[k].hidden``: they are the next layer's inputs. With the recipe's
``smoothing`` the layer is first smoothed in place (``moequant.smoothing``: one forward of the original layer
gives the factors' statistics and the next layer's inputs), then observed and quantized as above, then
restored. Statistics live in this call only, so nothing grows with depth. Under torchrun (``ranks.Ranks``) each
rank observes its batches and searches its share of the weight work; the ranks exchange statistics and
results, and rank 0's result is the whole layer's (other ranks return their own share, which nobody writes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Mapping

import torch

from moequant.calibrate import ActivationStats, CalibrationError, ExpertsCoverage, finish_experts, input_scale, \
    linear_input_amax, observing
from moequant.channel_stats import ChannelStats, channel_weights, hessians
from moequant.kv_cache import kv_cache_scales
from moequant.layers.inputs import LayerInput
from moequant.layers.job import Job, timed
from moequant.plan import Target
from moequant.scales import KVScales, TensorScales
from moequant.smoothing import Smoothing, smooth_layer
from moequant.weights import calibrate_weights


@dataclass(frozen=True)
class LayerResult:
    """What one decoder layer (``index``; None: the targets outside the decoder layers) ships."""

    index: int | None
    tensors: Mapping[str, TensorScales]      # target key -> scales and codes (host), input scales filled
    kv: Mapping[str, KVScales]               # attention path -> KV-cache scales
    coverage: tuple[ExpertsCoverage, ...]
    backends: frozenset[str]
    seconds: Mapping[str, float]
    unquantized: Mapping[str, torch.Tensor] = field(default_factory=dict)   # on-disk name -> tensor (writers)
    smoothing: Smoothing = Smoothing()       # recipe smoothing: factors, changed unquantized tensors


def frozen(d: dict) -> Mapping:
    return MappingProxyType(dict(d))


def calibrate_layer(job: Job, i: int | None, inputs: list[LayerInput], ranks=None) -> LayerResult:
    """Decoder layer ``i`` of ``job`` (already on ``job.device``), observed on ``inputs`` (updated in place to
    its outputs); ``i=None``: the targets outside the decoder layers (weights only)."""
    targets, seconds = job.targets_of(i), {}
    if not (inputs and i is not None and job.recipe.smoothing.enabled):
        return _calibrate(job, i, inputs, targets, seconds, ranks)
    with timed(seconds, "smooth"):
        smoothing, folded, next_hidden = _smooth(job, i, inputs, targets, ranks)
    try:
        result = _calibrate(job, i, inputs, targets, seconds, ranks)
    finally:
        if folded is not None:
            folded.restore()
    for inp, hidden in zip(inputs, next_hidden):   # the unsmoothed layer's outputs: what a resumed run replays
        inp.hidden = hidden
    return replace(result, smoothing=smoothing)


def _smooth(job: Job, i: int, inputs: list[LayerInput], targets: list[Target], ranks):
    """Layer ``i`` smoothed in place (``moequant.smoothing``); ``inputs`` left as they were. Returns the record,
    the originals to restore, and the unsmoothed layer's outputs (the next layer's inputs)."""
    originals = [inp.hidden for inp in inputs]
    spec = job.recipe.smoothing
    reduce = ranks.reduce_smoothing if ranks is not None else None
    smoothing, folded = smooth_layer(job.layers[i], job.layer_path(i), inputs, {t.module_path for t in targets},
                                     job.containers, spec.alpha, job.recipe.calibration.min_tokens, reduce,
                                     down=spec.down)
    next_hidden = [inp.hidden for inp in inputs]
    for inp, hidden in zip(inputs, originals):
        inp.hidden = hidden
    return smoothing, folded, next_hidden


def _calibrate(job: Job, i: int | None, inputs: list[LayerInput], targets: list[Target], seconds: dict,
               ranks) -> LayerResult:
    stats = ActivationStats(channels=ChannelStats(hessians=job.recipe.needs_hessians)
                            if job.recipe.needs_channel_stats else None)
    if ranks is not None and stats.channels is not None:
        stats.channels.record_parts = True   # the ranks fold them in one process's order
    observed = None
    if inputs and job.recipe.needs_channel_stats:   # weighted_mse / gptq: statistics before the search
        observed = _observe(job, i, inputs, stats, ranks, seconds)
    with timed(seconds, "weights"):
        tensors, backends = layer_weights(job, targets, stats, ranks)
    if inputs and observed is None:
        observed = _observe(job, i, inputs, stats, ranks, seconds)
    coverage, expert_amax = observed if observed is not None else ((), {})
    if job.observe_activations and i is not None:
        tensors = with_input_scales(job, targets, tensors, stats, expert_amax)
    kv = kv_cache_scales(stats.kv_amax, job.kv, job.mla) if job.kv and stats.kv_amax else {}
    return LayerResult(i, frozen(tensors), frozen(kv), tuple(coverage), frozenset(backends), frozen(seconds))


def _observe(job: Job, i: int, inputs: list[LayerInput], stats: ActivationStats, ranks, seconds: dict):
    """The observed forward of layer ``i``; returns (coverage records, container -> (gate_up, down) amax)."""
    path, layer = job.layer_path(i), job.layers[i]
    with timed(seconds, "observe"), observing(layer, path, job.plan, job.containers, stats,
                                              policy=job.recipe.calibration.dead_experts,
                                              activations=job.observe_targets,
                                              kv_layers=[(path, layer)] if job.kv else []):
        for inp in inputs:
            out = layer(inp.hidden, *inp.args, **inp.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if out.shape != inp.hidden.shape:
                raise CalibrationError(f"{path} returned shape {tuple(out.shape)} for input "
                                       f"{tuple(inp.hidden.shape)}; cannot chain layers")
            inp.hidden = out
    if ranks is not None:
        ranks.reduce_observations(stats, path + ".")
    with timed(seconds, "coverage"):
        coverage, expert_amax = finish_coverage(job, stats)
    if ranks is not None:
        expert_amax = ranks.reduce_expert_amax(expert_amax)
    return coverage, expert_amax


def finish_coverage(job: Job, stats: ActivationStats) -> tuple[list[ExpertsCoverage], dict]:
    """Every observed experts container's remedy for under-covered experts, and its per-expert input amax."""
    spec, coverage, amax = job.recipe.calibration, [], {}
    for cpath, obs in stats.experts.items():
        gate_up, down, record = finish_experts(obs, job.containers[cpath], spec.dead_experts, spec.min_tokens,
                                               spec.input_floor)
        amax[cpath] = (gate_up, down)
        coverage.append(record)
    return coverage, amax


# ------------------------------------------------------------------------------------------ weights


def layer_weights(job: Job, targets: list[Target], stats: ActivationStats, ranks) -> tuple[dict, set]:
    """Scales and codes of ``targets`` (on the host). Under torchrun: this rank's units, gathered to rank 0."""
    if not targets:
        return {}, set()
    weights = _channel_weights(job, targets, stats, channel_weights) if job.recipe.needs_channel_stats else None
    grams = _channel_weights(job, targets, stats, hessians) if job.recipe.needs_hessians else None
    if stats.channels is not None:   # gptq's X^T X sums: needed no longer
        stats.channels.drop_hessians("")
    units = [targets] if ranks is None else ranks.my_units(targets)
    pieces, backends = [], set()
    for unit in units:
        state = calibrate_weights(job.model, job.plan.with_targets(tuple(unit), job.plan.excluded),
                                  method=job.recipe.weights.method, backend=job.backend,
                                  channel_weights=_ranged(unit, weights), hessians=_ranged(unit, grams),
                                  global_search=job.recipe.weights.global_search,
                                  four_over_six=job.recipe.weights.four_over_six,
                                  act_order=job.recipe.weights.act_order)
        backends.update(state.backend.split(","))
        pieces += [(t.expert_offset, state.tensors[t.key]) for t in unit]
    pieces = _to_host(pieces)
    if ranks is not None:
        pieces, backends = ranks.gather_pieces(pieces, backends)
    return merge_pieces(pieces), backends


def _ranged(unit: list[Target], per_key: dict | None) -> dict | None:
    """Channel weights / X^T X of ``unit``'s targets, cut to each expert range."""
    if per_key is None:
        return None
    out = {}
    for t in unit:
        if t.key in per_key:
            v = per_key[t.key]
            n, o = t.shape[0], t.expert_offset
            cut = (lambda x: x[o:o + n]) if t.kind == "experts" and (o or n != _lead(v)) else (lambda x: x)
            out[t.key] = type(v)(*(cut(x) for x in _parts(v))) if not isinstance(v, torch.Tensor) else cut(v)
    return out


def _parts(v) -> tuple:
    return tuple(getattr(v, f.name) for f in fields(v))


def _lead(v) -> int:
    return (v if isinstance(v, torch.Tensor) else _parts(v)[0]).shape[0]


def merge_pieces(pieces: list[tuple[int, TensorScales]]) -> dict[str, TensorScales]:
    """Expert ranges of one target concatenated in expert order (one piece: as is)."""
    by_key: dict[str, list[tuple[int, TensorScales]]] = {}
    for offset, scales in pieces:
        by_key.setdefault(scales.key, []).append((offset, scales))
    out = {}
    for key, parts in by_key.items():
        parts = [s for _, s in sorted(parts, key=lambda p: p[0])]
        if len(parts) == 1:
            out[key] = parts[0]
            continue
        joined = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TensorScales)
                  if isinstance(getattr(parts[0], f.name), torch.Tensor)}
        out[key] = replace(parts[0], **joined)
    return out


def _to_host(pieces: list[tuple[int, TensorScales]]) -> list[tuple[int, TensorScales]]:
    """Every tensor of ``pieces`` on the CPU: from a GPU into pinned memory, queued, then one wait. A layer's
    codes are hundreds of MB, and pageable copies of them ran at ~2 GB/s (3.1 s of a 12-layer Qwen3-30B-A3B
    job on an H200); pinned blocks come from torch's caching host allocator, so a layer reuses earlier ones."""
    out, queued = [], False
    for offset, scales in pieces:
        host = {}
        for f in fields(scales):
            t = getattr(scales, f.name)
            if isinstance(t, torch.Tensor):
                if t.device.type == "cuda":
                    host[f.name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                    queued = True
                else:
                    host[f.name] = t
        out.append((offset, replace(scales, **host)))
    if queued:
        torch.cuda.current_stream().synchronize()
    return out


def _channel_weights(job: Job, targets: list[Target], stats: ActivationStats, of) -> dict:
    """weighted_mse's channel weights (``of=hessians``: gptq's X^T X) of the NVFP4 ``targets``."""
    keys = [t.key for t in targets if job.schemes[t.key].weights == "nvfp4"]
    try:
        return of(job.plan, stats.channels, job.containers, keys, job.recipe.calibration.min_tokens)
    except KeyError as err:
        raise CalibrationError(f"{job.recipe.weights.method}: {err.args[0]}; calibrate with data that reaches every "
                               "target, or exclude the target in the recipe") from None


def with_input_scales(job: Job, targets: list[Target], tensors: dict, stats: ActivationStats,
                       expert_amax: dict) -> dict:
    """``tensors`` with the input scales of ``targets`` (groups never span decoder layers). Under torchrun,
    ranks other than 0 hold no tensors and skip this."""
    targets = [t for t in targets if t.key in tensors]
    linear = linear_input_amax(job.plan, stats, [t.key for t in targets if t.kind == "linear"])
    out = dict(tensors)
    for t in targets:
        if t.kind == "linear":
            amax = linear[t.key]
        else:
            if t.module_path not in expert_amax:
                raise CalibrationError(f"{t.module_path}: no calibration token reached this experts container; "
                                       "check that the model's forward reaches it")
            gate_up, down = expert_amax[t.module_path]
            amax = gate_up if t.param_name == job.containers[t.module_path].layout.gate_up else down
        out[t.key] = replace(tensors[t.key], input_scale=input_scale(amax, job.schemes[t.key].activations))
    return out
