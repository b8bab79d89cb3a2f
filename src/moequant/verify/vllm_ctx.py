"""Shared state of the vLLM contract checks: the decision vLLM makes per module and the per-tensor checks.

See ``engine_vllm`` for the vLLM 0.26.0 files and commit these rules come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moequant.verify.checks import QUANT_SUFFIXES, Inventory
from moequant.verify.decode import Checkpoint
from moequant.verify.report import VerifyResult
from moequant.verify.vllm_layout import Layout
from moequant.verify.vllm_match import CtRules, ModelOptRules
from moequant.verify.vllm_schemes import FLOATS, SCALAR, QuantConfig, Scheme


@dataclass
class Ctx:
    ckpt: Checkpoint
    inv: Inventory
    layout: Layout
    qc: QuantConfig
    result: VerifyResult
    modelopt: ModelOptRules | None
    ct: CtRules | None

    def fail(self, check: str, tensor: str, message: str) -> None:
        self.result.fail(check, tensor, message)

    def scalar(self, name: str) -> float:
        return float(self.ckpt.get(name).to(torch.float32).reshape(-1)[0])

    def decide(self, prefix: str, cls: str, quantizable: bool = True) -> tuple[Scheme | None, str]:
        """(scheme vLLM builds ``prefix`` with or None, why); ``MatchError`` when vLLM raises deciding."""
        if not quantizable:
            return None, "vLLM builds it with quant_config=None"
        if self.modelopt is not None:
            entry = self.modelopt.excluded_by(prefix)
            return (None, f"exclude entry {entry} matches it") if entry else \
                (self.qc.scheme, "no exclude entry matches it under vLLM's rules")
        target = self.ct.experts_target(prefix) if cls == "RoutedExperts" else self.ct.target(prefix, cls)
        if target is None:
            ignored = self.ct.ignored_by(f"{prefix}.0.gate_proj" if cls == "RoutedExperts" else prefix)
            return None, (f"ignore entry {ignored!r} matches it" if ignored else "no config-group target matches it")
        scheme = self.qc.groups[target if target in self.qc.groups else "Linear"]  # "RoutedExperts" aliases "Linear"
        return scheme, f"config-group target {target!r} matches it and no ignore entry does"


def disk_state(inv: Inventory, disk: str) -> str:
    tensors = inv.modules.get(disk, {})
    if QUANT_SUFFIXES & set(tensors):
        return "quantized"
    return "float" if "weight" in tensors else "missing"


def placeholder(scheme: Scheme | None, suffix: str, moe: bool) -> str:
    if scheme is None or scheme.name == "nvfp4" or suffix == "weight":
        return "uninitialised (torch.empty); vLLM does not check quantized models for missing weights"
    return "at 1.0 (torch.ones), not calibrated" if moe else "at its placeholder, the float32 minimum -3.4e38"


def check_tensors(ctx: Ctx, disk: str, scheme: Scheme | None, shape: tuple[int, int], moe: bool,
                  extras: tuple[str, ...] = (), hint: str = "") -> bool:
    """Tensor set, dtypes, shapes and scalar values of one on-disk module as vLLM's layer for it loads them."""
    out, inp = shape
    want = scheme.tensors(out, inp) if scheme else {"weight": (FLOATS, (out, inp))}
    allowed = (scheme.optional(moe) if scheme else {"bias"}) | set(extras)
    tensors, ok = ctx.inv.modules.get(disk, {}), True
    for suffix, (dtypes, size) in want.items():
        name, info = f"{disk}.{suffix}", tensors.get(suffix)
        if info is None:
            check = "vllm_input_scale" if scheme and suffix == scheme.names["input"] else "vllm_tensor"
            ctx.fail(check, name, f"absent: vLLM leaves this parameter {placeholder(scheme, suffix, moe)}")
            ok = False
        elif info.dtype not in dtypes:
            ctx.fail("vllm_tensor", name, f"dtype {info.dtype}, vLLM's parameter is {dtypes[0]}: the loader copies "
                     "values with a cast, not the stored bytes")
            ok = False
        elif size == SCALAR and math.prod(info.shape) != 1:
            ctx.fail("vllm_tensor", name, f"shape {list(info.shape)}: vLLM loads one value per shard here and fails")
            ok = False
        elif size != SCALAR and info.shape != size:
            ctx.fail("vllm_tensor", name, f"shape {list(info.shape)}, vLLM's parameter is {list(size)}: the load "
                     "fails on the size mismatch")
            ok = False
        elif size == SCALAR and not positive(ctx.scalar(name)):
            role = "input" if suffix.startswith("input") else "weight global"
            ctx.fail("vllm_input_scale" if role == "input" else "vllm_scale", name,
                     f"{ctx.scalar(name)}: vLLM uses this {role} scale as is; it must be finite and > 0")
            ok = False
    for suffix in sorted(set(tensors) - set(want) - allowed):
        ctx.fail("vllm_tensor", f"{disk}.{suffix}", f"vLLM's {'FusedMoE' if moe else 'layer'} for it has no such "
                 f"parameter: the load raises on it{hint}")
        ok = False
    return ok


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def mismatch(ctx: Ctx, where: str, scheme: Scheme | None, why: str, quantized: list[str], floats: list[str],
              what: str) -> bool:
    """The vllm_exclude failure when vLLM's decision and the disk disagree; True if they agree."""
    if scheme is None and quantized:
        ctx.fail("vllm_exclude", where, f"{len(quantized)} {what} quantized on disk (e.g. {quantized[0]}), but {why}: "
                 "vLLM builds it unquantized and the load fails on the quantized tensors")
        return False
    if scheme is not None and floats:
        ctx.fail("vllm_exclude", where, f"{len(floats)} {what} unquantized on disk (e.g. {floats[0]}), but {why}: "
                 f"vLLM builds it {scheme.name} and the load fails on the float weight")
        return False
    return True
