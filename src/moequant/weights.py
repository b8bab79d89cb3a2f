"""Weights + Plan -> calibrated weight scales for every linear and every expert (data-free).

Every weight scale comes from the weight itself: no calibration token is needed, so an expert that no token
reaches is calibrated exactly like the others. Order of operations, per group:
  1. amax of each member (per expert for fused experts), NaN/inf rejected naming the on-disk tensor;
  2. one global scale for the group (max of the members' amax) -- fixed BEFORE the block-scale search;
  3. block scales searched ("mse") or computed ("max") against that global scale, so the searched scales are
     the shipped scales.
Options beyond "max"/"mse" (``_searched_scales``): "weighted_mse" (``formats.weighted_mse``, needs per-target
channel weights from activation calibration), "gptq" (weighted_mse's scales, then GPTQ's codes under them:
``gptq_step``; needs each target's X^T X too), ``global_search`` (``formats.global_search``: the group's global
scale is searched, still one per group) and ``four_over_six`` (``formats.four_over_six``, with "max" only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moequant import kernels
from moequant.formats import fp8, nvfp4
from moequant.formats.fp8 import fp8_tensor_scale, quantize_fp8_tensor, dequantize_fp8_tensor
from moequant.formats.global_search import search_global
from moequant.formats.nvfp4 import (MAX_ABS, WeightError, check_weight, global_scale_from_amax, storage_order,
                                    tensor_amax)
from moequant.gptq_step import GptqInput, gptq_group
from moequant.plan import Plan, Target, disk_name_of, disk_position
from moequant.scales import QuantState, TensorScales

METHODS = ("mse", "max", "weighted_mse", "gptq")


def canonical_weight(model: nn.Module, target: Target) -> torch.Tensor:
    """The ``[N, K]`` / ``[E, N, K]`` view of a target's parameter (no copy); an expert range's experts only."""
    p = model.get_submodule(target.module_path).get_parameter(target.param_name)
    if target.kind == "experts" and (target.expert_offset or target.shape[0] != p.shape[0]):
        p = p[target.expert_offset:target.expert_offset + target.shape[0]]
    return p.transpose(-1, -2) if target.transposed else p


def check_target_weight(target: Target, w: torch.Tensor) -> None:
    """``check_weight`` with the message naming the on-disk tensor that holds the first bad value (NaN / inf,
    or a magnitude above ``MAX_ABS``); shape and dtype errors concern the whole target and keep its key."""
    try:
        check_weight(w, target.key)
    except WeightError as err:
        finite = torch.isfinite(w)
        bad = ~finite if not bool(finite.all()) else w.abs() > MAX_ABS
        if not bool(bad.any()):
            raise
        index = bad.nonzero()[0].tolist()
        name, local = disk_position(target, index)
        raise WeightError(str(err).replace(target.key, name, 1).replace(f"index {index}", f"index {local}")) from None


def check_target_amax(target: Target, amax: torch.Tensor, scheme: str) -> None:
    """Refuse a non-zero tensor (or expert) too small for its scheme's scales to stay normal float32
    (``formats.nvfp4.MIN_WEIGHT_AMAX`` / ``formats.fp8.MIN_WEIGHT_AMAX``, derived there), naming its on-disk
    tensors; an all-zero tensor is fine (documented scales, decodes to zeros)."""
    low = nvfp4.MIN_WEIGHT_AMAX if scheme == "nvfp4" else fp8.MIN_WEIGHT_AMAX
    tiny = (amax > 0) & (amax < low)
    if not bool(tiny.any()):
        return
    where = tiny.nonzero()[0].tolist() if amax.ndim else []
    name = disk_name_of(target, where[0]) if where else ", ".join(s.name for s in target.slices)
    raise WeightError(f"{name}: largest magnitude {float(amax[tuple(where)]):.3g} is below {low:.3g}, the smallest "
                      f"{scheme} represents with normal float32 scales: the tensor is all but zero; exclude "
                      f"{target.module_path} in the recipe (exclude: [...]) or set the tensor to zero")


_CHUNK_ELEMENTS = 1 << 24  # per-expert reductions run over chunks of experts: fp32 temporaries <= 64 MiB


def _expert_chunks(w: torch.Tensor) -> list[torch.Tensor]:
    per = max(1, _CHUNK_ELEMENTS // max(1, w.numel() // max(1, w.shape[0])))
    return [w[i:i + per] for i in range(0, max(1, w.shape[0]), per)]


def weight_amax(target: Target, w: torch.Tensor) -> torch.Tensor:
    if target.kind != "experts":
        return tensor_amax(w, 0)
    return torch.cat([tensor_amax(c, 1) for c in _expert_chunks(w)])  # a max is exact: same bits as unchunked


def group_amax(plan: Plan, amax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per target, the amax its global scale is built from: the max over its group's members."""
    shared = {}
    for t in plan.targets:
        if t.group is not None:
            shared[t.group] = torch.maximum(shared[t.group], amax[t.key]) if t.group in shared else amax[t.key]
    return {t.key: shared[t.group] if t.group is not None else amax[t.key] for t in plan.targets}


def _per_expert_sum(x: torch.Tensor, kind: str) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(-1) if kind == "experts" else x.sum()


def _squares(w: torch.Tensor) -> torch.Tensor:
    """``w`` squared in float32, in storage order: one float32 copy squared in place (``copy=True``: a float32
    weight is never squared in place)."""
    return storage_order(w).to(torch.float32, copy=True).square_()


def _sq_norm(w: torch.Tensor, kind: str) -> torch.Tensor:
    """Sum of squares (per expert), read in storage order: a float32 sum whose last bits depend on the order,
    for the report's relative errors only."""
    if kind != "experts":
        return _per_expert_sum(_squares(w), kind)
    return torch.cat([_per_expert_sum(_squares(c), kind) for c in _expert_chunks(w)])


def _nvfp4_scales(target: Target, w, amax, shared_amax, method, backend) -> tuple[TensorScales, str]:
    gs = global_scale_from_amax(shared_amax)
    block, sq_err, sq_err_max, codes, used = kernels.search_scales_and_codes(w, gs, method, backend)
    return _tensor_scales(target, w, amax, gs, block, sq_err, sq_err_max, method, codes), used


def _tensor_scales(t: Target, w, amax, gs, block, sq_err, sq_err_max, label: str, codes=None) -> TensorScales:
    """TensorScales from per-block plain errors at the chosen scales and at "max"'s (summed per expert), with
    the packed codes of those scales (``codes``, or packed here, where the weight is: the export only writes
    them)."""
    return TensorScales(t.key, "nvfp4", label, amax, gs, block, _per_expert_sum(sq_err, t.kind),
                        _per_expert_sum(sq_err_max, t.kind), _sq_norm(w, t.kind),
                        codes=kernels.pack_nvfp4(w, gs, block) if codes is None else codes)


def _fp8_scales(target: Target, w, amax, shared_amax) -> TensorScales:
    scale = fp8_tensor_scale(shared_amax)
    s = scale.reshape(-1, 1, 1) if target.kind == "experts" else scale
    codes = quantize_fp8_tensor(w, s)
    deq = dequantize_fp8_tensor(codes, s)
    err = _per_expert_sum((w.to(torch.float32) - deq).square(), target.kind)
    norm = _per_expert_sum(w.to(torch.float32).square(), target.kind)
    return TensorScales(target.key, "fp8", "max", amax, scale, None, err, err, norm, codes=codes)


@torch.no_grad()
def calibrate_weights(
    model: nn.Module, plan: Plan | None = None, scheme: str | None = None, method: str = "mse",
    backend: str = "auto", progress: bool = False, channel_weights: dict[str, torch.Tensor] | None = None,
    global_search: bool = False, four_over_six: bool = False, hessians: dict[str, GptqInput] | None = None,
    act_order: bool = False,
) -> QuantState:
    """Weight scales of every target of ``plan`` (default: ``discover(model)``), no data needed.

    ``scheme`` overrides every target's scheme ("nvfp4" or "fp8"); ``method`` is the NVFP4 block-scale
    method ("mse": exact 126-candidate search; "max"). ``backend``: see ``moequant.kernels``.
    The model is only read. Deterministic: the same weights give the same bytes.
    ``channel_weights`` (target key -> ``[K]`` / ``[E, K]`` mean squared activations) feed "weighted_mse" and
    "gptq"; ``hessians`` (target key -> ``gptq_step.GptqInput``) feed "gptq", ``act_order`` its column order;
    ``global_search`` / ``four_over_six``: see the module docstring.
    """
    from moequant.discover import discover  # local: discover imports transformers-specific helpers

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    plan = plan if plan is not None else discover(model)
    weights = {t.key: canonical_weight(model, t) for t in plan.targets}
    for t in plan.targets:
        check_target_weight(t, weights[t.key]) if (scheme or t.scheme) == "nvfp4" else _check_fp8(t, weights[t.key])
    amax = {t.key: weight_amax(t, weights[t.key]) for t in plan.targets}
    for t in plan.targets:
        check_target_amax(t, amax[t.key], scheme or t.scheme)
    shared = group_amax(plan, amax)
    tensors, used = {}, set()
    if method in ("weighted_mse", "gptq") or global_search or four_over_six:
        options = _Options(method, backend, channel_weights or {}, global_search, four_over_six, hessians or {},
                           act_order)
        nvfp4 = [t for t in plan.targets if (scheme or t.scheme) == "nvfp4"]
        used.update(_searched_scales(nvfp4, weights, amax, shared, options, tensors))
    for t in _progress(plan.targets, progress, "weight scales"):
        w = weights[t.key]
        if t.key in tensors:
            continue
        if (scheme or t.scheme) == "nvfp4":
            tensors[t.key], backend_used = _nvfp4_scales(t, w, amax[t.key], shared[t.key], method, backend)
            used.add(backend_used)
        else:
            tensors[t.key] = _fp8_scales(t, w, amax[t.key], shared[t.key])
    return QuantState(plan, tensors, ",".join(sorted(used)) or "torch", method)


@dataclass(frozen=True)
class _Options:
    method: str
    backend: str
    channel_weights: dict
    global_search: bool
    four_over_six: bool
    hessians: dict
    act_order: bool = False

    @property
    def label(self) -> str:
        base = "four_over_six" if self.four_over_six else self.method
        return base + ("+global" if self.global_search else "")


def _searched_scales(targets: list[Target], weights, amax, shared, options: _Options, out: dict) -> set[str]:
    """NVFP4 scales of ``targets`` with the options, one group at a time (a group shares its global scale)."""
    if options.four_over_six and options.method != "max":
        raise ValueError("four_over_six goes with method 'max' only: the exact searches already scan its candidates")
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.group if t.group is not None else "target:" + t.key, []).append(t)
    if options.method in ("weighted_mse", "gptq") and not options.global_search:  # scales, errors: one search
        used = set()
        for members in groups.values():
            for t in members:
                w = weights[t.key]
                gs = global_scale_from_amax(shared[t.key])
                *found, b = kernels.search_weighted_with_errors(w, gs, _channel_weights_of(t, options, w.device),
                                                                options.backend)
                used.add(b)
                out[t.key] = _tensor_scales(t, w, amax[t.key], gs, *found, options.label)
            used |= _gptq_codes(members, weights, options, out)
        return used
    method = "weighted_mse" if options.method == "gptq" else options.method  # gptq: its scales are weighted_mse's
    search = kernels.block_search("four_over_six" if options.four_over_six else method, options.backend)
    gptq_used: set[str] = set()
    for members in groups.values():
        pairs = [(weights[t.key], _channel_weights_of(t, options, weights[t.key].device)) for t in members]
        base = global_scale_from_amax(shared[members[0].key])
        if options.global_search:
            gs, found = search_global(pairs, base, search)
        else:
            gs, found = base, [search(w, base, h) for w, h in pairs]
        for t, (block, _) in zip(members, found):
            out[t.key] = _scales_at(t, weights[t.key], amax[t.key], gs, block, options)
        gptq_used |= _gptq_codes(members, weights, options, out)
    return set(search.backends) | gptq_used


def _channel_weights_of(t: Target, options: _Options, device: torch.device) -> torch.Tensor | None:
    if options.method not in ("weighted_mse", "gptq"):
        return None
    if t.key not in options.channel_weights:
        raise ValueError(f"{t.key}: {options.method} needs its channel weights (mean squared activations); "
                         "they come from activation calibration (moequant.quantize with calibration data)")
    return options.channel_weights[t.key].to(device)


def _gptq_codes(members: list[Target], weights: dict, options: _Options, out: dict) -> set[str]:
    """With "gptq": GPTQ's codes under the scales just searched for a group's ``members`` (``gptq_step``; linears
    reading one input run as one call), replacing ``out``'s entries, and the backend used; else nothing."""
    if options.method != "gptq":
        return set()
    for t in members:
        if t.key not in options.hessians:
            raise ValueError(f"{t.key}: gptq needs its inputs' X^T X; it comes from activation calibration "
                             "(moequant.quantize with calibration data)")
    used = kernels.resolve_backend(options.backend, weights[members[0].key].device)
    done = gptq_group(members, [weights[t.key] for t in members], [out[t.key] for t in members],
                      [options.hessians[t.key] for t in members], used, options.act_order)
    out.update({t.key: scales for t, scales in zip(members, done)})
    return {used}


def _scales_at(t: Target, w, amax, gs, block, options: _Options) -> TensorScales:
    """TensorScales with plain (unweighted) errors at the chosen scales and at "max" under the same global."""
    _, sq_err_max, _ = kernels.search_block_scales_with_errors(w, gs, "max", options.backend)
    return _tensor_scales(t, w, amax, gs, block, kernels.weight_squared_error(w, gs, block), sq_err_max,
                          options.label)


def _check_fp8(target: Target, w: torch.Tensor) -> None:
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        name = disk_name_of(target, (~finite).nonzero()[0].tolist())
        raise WeightError(f"{name}: non-finite value(s) (NaN or inf) in the weight; fix the checkpoint")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor")
