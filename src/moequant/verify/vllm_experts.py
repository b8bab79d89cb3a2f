"""vLLM 0.26.0 contract for one FusedMoE layer: per-expert tensors, w1/w3 global scales, input scales.

vLLM loads every ``<prefix>.<e>.<gate|up|down>.<suffix>`` (Mixtral: ``w1|w3|w2``) into ``w13_<suffix>`` /
``w2_<suffix>`` rows of expert ``e`` (``routed_experts.py`` ``build_expert_params_mapping``, ``weight_loader``);
names with an expert index >= the expert count, or another projection name, match no mapping entry and are
silently not loaded. One quantization method covers all experts of the layer. NVFP4: the w1 and w3 global scales
sit in ``w13_weight_scale_2[e, 0:2]`` (compressed-tensors ``w13_weight_global_scale``) and vLLM keeps column 0
(w1) for both, warning when they differ (``process_weights_after_loading`` of ``ModelOptNvFp4FusedMoE`` /
``CompressedTensorsW4A4Nvfp4MoEMethod``); input scales are kept per expert and per w1/w3 until the backend
reduces them (``oracle/nvfp4.py``, ``flashinfer_fp4_moe.py``). FP8: w1/w3 weight scales differing are
requantized to the max (``process_fp8_weight_tensor_strategy_moe``); compressed-tensors raises when w1 and w3
input scales differ; ModelOpt keeps one input-scale slot per expert (the value read last wins).
"""

from __future__ import annotations

import re

from moequant.verify.vllm_ctx import Ctx, check_tensors, disk_state, mismatch
from moequant.verify.vllm_layout import Experts
from moequant.verify.vllm_match import MatchError
from moequant.verify.vllm_schemes import Scheme


def _unmapped(ctx: Ctx, ex: Experts) -> None:
    """On-disk modules under the experts prefix that vLLM's expert mapping does not cover."""
    pattern = re.compile(re.escape(ex.prefix) + r"\.(\d+)\.([^.]+)$")
    for module in sorted(ctx.inv.modules):
        if not module.startswith(ex.prefix + "."):
            continue
        m = pattern.match(module)
        if m is None:
            ctx.fail("vllm_tensor", module, "not a per-expert module '<experts>.<e>.<proj>': this contract checks "
                     "per-expert checkpoints only (vLLM reads fused 3-D expert tensors through another mapping)")
        elif int(m[1]) >= ex.num or m[2] not in ex.names:
            ctx.fail("vllm_tensor", module, f"vLLM maps experts 0..{ex.num - 1} with projections {list(ex.names)}: "
                     "no mapping entry matches this module, so its tensors are silently not loaded")


def check_experts(ctx: Ctx, ex: Experts) -> tuple[float, str] | None:
    """All checks of one FusedMoE layer; returns (largest max-over-experts / own input scale, where) if known."""
    _unmapped(ctx, ex)
    try:
        scheme, why = ctx.decide(ex.prefix, "RoutedExperts")
    except MatchError as err:
        ctx.fail("vllm_exclude", ex.prefix, str(err))
        return None
    disks = {(e, p): f"{ex.prefix}.{e}.{p}" for e in range(ex.num) for p in ex.names}
    states = {k: disk_state(ctx.inv, d) for k, d in disks.items()}
    for k, state in states.items():
        if state == "missing":
            ctx.fail("vllm_tensor", f"{disks[k]}.weight", f"absent: vLLM leaves expert {k[0]}'s rows of the "
                     "FusedMoE weights uninitialised (torch.empty); no error is raised")
    quantized = [disks[k] for k, s in states.items() if s == "quantized"]
    floats = [disks[k] for k, s in states.items() if s == "float"]
    if not mismatch(ctx, ex.prefix, scheme, why + " (vLLM quantizes a FusedMoE layer whole or not at all)",
                    quantized, floats, "expert projection(s)"):
        return None
    shapes = ex.shapes()
    good = {k: check_tensors(ctx, d, scheme, shapes[k[1]], moe=True) for k, d in disks.items()
            if states[k] != "missing"}
    if scheme is None:
        return None
    gate, _, up = ex.names
    for e in range(ex.num):
        if good.get((e, gate)) and good.get((e, up)):
            _w13(ctx, scheme, disks[(e, gate)], disks[(e, up)])
    return _spread(ctx, ex, scheme, disks, good) if scheme.inputs else None


def _w13(ctx: Ctx, scheme: Scheme, gate: str, up: str) -> None:
    g_name, u_name = f"{gate}.{scheme.names['global']}", f"{up}.{scheme.names['global']}"
    g, u = ctx.scalar(g_name), ctx.scalar(u_name)
    if g != u and scheme.name == "nvfp4":
        ratio = scheme.dequant_factor(g) / scheme.dequant_factor(u)
        ctx.fail("vllm_w13_scale", u_name, f"{u} != {g} of {g_name}: vLLM warns that w1 and w3 global scales must "
                 f"match and uses the gate's (w1) scale for both: this expert's up weights come out x{ratio:.4g}")
    elif g != u:
        ctx.result.warnings.append(f"{up}: FP8 weight scale differs from the gate's; vLLM requantizes both halves "
                                   "to the larger (one extra rounding)")
    if not scheme.inputs:
        return
    gi_name, ui_name = f"{gate}.{scheme.names['input']}", f"{up}.{scheme.names['input']}"
    gi, ui = ctx.scalar(gi_name), ctx.scalar(ui_name)
    if gi == ui:
        return
    if scheme.name == "fp8" and scheme.fmt == "compressed-tensors":
        ctx.fail("vllm_input_scale", ui_name, f"{ui} != {gi} of {gi_name}: vLLM raises 'input_scales of w1 and w3 "
                 "of a layer must be equal' while loading")
    elif scheme.name == "fp8":
        ctx.result.warnings.append(f"{up}: input scale differs from the gate's; vLLM ModelOpt FP8 keeps one slot "
                                   "per expert, the value read last wins")
    else:
        ctx.result.warnings.append(f"{up}: input scale differs from the gate's; every vLLM NVFP4 MoE backend that "
                                   "reads input scales takes the max of the two")


def _spread(ctx: Ctx, ex: Experts, scheme: Scheme, disks: dict, good: dict) -> tuple[float, str] | None:
    """max over experts / smallest expert's own, for the w13 and w2 input scales (activation-amax domain)."""
    gate, down, up = ex.names
    worst = None
    for projs, label in (((gate, up), "w13"), ((down,), "w2")):
        amax = []
        for e in range(ex.num):
            if not all(good.get((e, p)) for p in projs):
                return worst
            stored = [ctx.scalar(f"{disks[(e, p)]}.{scheme.names['input']}") for p in projs]
            amax.append(max(scheme.dequant_factor(v) for v in stored))
        ratio = max(amax) / min(amax)
        if worst is None or ratio > worst[0]:
            worst = (ratio, f"{ex.prefix} {label}")
    return worst
