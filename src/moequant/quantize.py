"""Weights + Plan -> calibrated weight scales for every linear and every expert (data-free).

Every weight scale comes from the weight itself: no calibration token is needed, so an expert that no token
reaches is calibrated exactly like the others. Order of operations, per group:
  1. amax of each member (per expert for fused experts), NaN/inf rejected naming the on-disk tensor;
  2. one global scale for the group (max of the members' amax) -- fixed BEFORE the block-scale search;
  3. block scales searched ("mse") or computed ("max") against that global scale, so the searched scales are
     the shipped scales.
"""

from __future__ import annotations

import torch
from torch import nn

from moequant import kernels
from moequant.formats.fp8 import fp8_tensor_scale, quantize_fp8_tensor, dequantize_fp8_tensor
from moequant.formats.nvfp4 import WeightError, check_weight, global_scale_from_amax, tensor_amax
from moequant.plan import Plan, Target
from moequant.state import QuantState, TensorScales

METHODS = ("mse", "max")


def canonical_weight(model: nn.Module, target: Target) -> torch.Tensor:
    """The ``[N, K]`` / ``[E, N, K]`` view of a target's parameter (no copy)."""
    p = model.get_submodule(target.module_path).get_parameter(target.param_name)
    return p.transpose(-1, -2) if target.transposed else p


def _disk_name_of(target: Target, index: list[int]) -> str:
    """On-disk tensor name holding canonical element ``index`` (for error messages)."""
    expert = index[0] if target.kind == "experts" else None
    row = index[-2]
    for s in target.slices:
        start, stop, step = s.rows
        if (s.expert is None or s.expert == expert) and start <= row < stop and (row - start) % step == 0:
            return s.name + (f" (expert {expert})" if s.expert is None and expert is not None else "")
    return target.key


def check_target_weight(target: Target, w: torch.Tensor) -> None:
    """``check_weight`` with the message naming the on-disk tensor that holds the first bad value."""
    try:
        check_weight(w, target.key)
    except WeightError as err:
        finite = torch.isfinite(w)
        if bool(finite.all()):
            raise
        name = _disk_name_of(target, (~finite).nonzero()[0].tolist())
        raise WeightError(str(err).replace(target.key, name, 1)) from None


_CHUNK_ELEMENTS = 1 << 26  # per-expert reductions run over chunks of experts: fp32 temporaries <= 256 MiB


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


def _sq_norm(w: torch.Tensor, kind: str) -> torch.Tensor:
    if kind != "experts":
        return _per_expert_sum(w.to(torch.float32).square(), kind)
    return torch.cat([_per_expert_sum(c.to(torch.float32).square(), kind) for c in _expert_chunks(w)])


def _nvfp4_scales(target: Target, w, amax, shared_amax, method, backend) -> tuple[TensorScales, str]:
    gs = global_scale_from_amax(shared_amax)
    block, sq_err, used = kernels.search_block_scales_with_errors(w, gs, method, backend)
    err = _per_expert_sum(sq_err, target.kind)
    if method != "max":
        _, sq_err_max, _ = kernels.search_block_scales_with_errors(w, gs, "max", backend)
        err_max = _per_expert_sum(sq_err_max, target.kind)
    else:
        err_max = err
    norm = _sq_norm(w, target.kind)
    return TensorScales(target.key, "nvfp4", method, amax, gs, block, err, err_max, norm), used


def _fp8_scales(target: Target, w, amax, shared_amax) -> TensorScales:
    scale = fp8_tensor_scale(shared_amax)
    s = scale.reshape(-1, 1, 1) if target.kind == "experts" else scale
    deq = dequantize_fp8_tensor(quantize_fp8_tensor(w, s), s)
    err = _per_expert_sum((w.to(torch.float32) - deq).square(), target.kind)
    norm = _per_expert_sum(w.to(torch.float32).square(), target.kind)
    return TensorScales(target.key, "fp8", "max", amax, scale, None, err, err, norm)


@torch.no_grad()
def calibrate_weights(
    model: nn.Module, plan: Plan | None = None, scheme: str | None = None, method: str = "mse",
    backend: str = "auto", progress: bool = False,
) -> QuantState:
    """Weight scales of every target of ``plan`` (default: ``discover(model)``), no data needed.

    ``scheme`` overrides every target's scheme ("nvfp4" or "fp8"); ``method`` is the NVFP4 block-scale
    method ("mse": exact 126-candidate search; "max"). ``backend``: see ``moequant.kernels``.
    The model is only read. Deterministic: the same weights give the same bytes.
    """
    from moequant.discover import discover  # local: discover imports transformers-specific helpers

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    plan = plan if plan is not None else discover(model)
    weights = {t.key: canonical_weight(model, t) for t in plan.targets}
    for t in plan.targets:
        check_target_weight(t, weights[t.key]) if (scheme or t.scheme) == "nvfp4" else _check_fp8(t, weights[t.key])
    amax = {t.key: weight_amax(t, weights[t.key]) for t in plan.targets}
    shared = group_amax(plan, amax)
    tensors, used = {}, set()
    for t in _progress(plan.targets, progress, "weight scales"):
        w = weights[t.key]
        if (scheme or t.scheme) == "nvfp4":
            tensors[t.key], backend_used = _nvfp4_scales(t, w, amax[t.key], shared[t.key], method, backend)
            used.add(backend_used)
        else:
            tensors[t.key] = _fp8_scales(t, w, amax[t.key], shared[t.key])
    return QuantState(plan, tensors, ",".join(sorted(used)) or "torch", method)


def _check_fp8(target: Target, w: torch.Tensor) -> None:
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        name = _disk_name_of(target, (~finite).nonzero()[0].tolist())
        raise WeightError(f"{name}: non-finite value(s) (NaN or inf) in the weight; fix the checkpoint")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor")
