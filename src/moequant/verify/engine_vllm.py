"""Loader contract for vLLM 0.26.0: would vLLM load this checkpoint into the model it builds, and load it right?

Read from vLLM 0.26.0 as released on PyPI (``vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl``, whose
``vllm/_version.py`` records commit ``ffd46bfab``), files under ``vllm/model_executor/``:
``layers/quantization/modelopt.py`` (ModelOptNvFp4Config / ModelOptFp8Config, is_layer_excluded,
apply_vllm_mapper, ModelOptNvFp4FusedMoE), ``layers/quantization/utils/quant_utils.py`` (is_layer_skipped),
``layers/quantization/compressed_tensors/{compressed_tensors.py, utils.py, compressed_tensors_moe/
compressed_tensors_moe.py, compressed_tensors_moe/compressed_tensors_moe_w4a4_nvfp4.py}`` (should_ignore_layer,
find_matched_target, get_moe_method), ``layers/fused_moe/routed_experts.py`` (weight_loader,
build_expert_params_mapping), ``layers/fused_moe/oracle/nvfp4.py`` and ``layers/quantization/utils/
flashinfer_fp4_moe.py`` (what each MoE backend does with input scales), ``layers/quantization/base_config.py``
(get_cache_scale_mapper), ``model_loader/weight_utils.py`` (maybe_remap_kv_scale_name, get_quant_config),
``model_loader/default_loader.py`` (no missing-weight check for quantized models), ``models/{llama, mixtral,
qwen2_moe, qwen3_moe, deepseek_v2}.py`` (modules, fused shards, expert names, routers built without quant_config).
Nothing is imported from vLLM; the rules are restated here and in ``vllm_match`` / ``vllm_layout`` / ``vllm_schemes``.

Checks (each failure names the on-disk tensor or config entry and what vLLM would do):
  vllm_config   the quantization config vLLM reads (config.json first) parses and is NVFP4 / FP8 per-tensor;
  vllm_model    the architecture is one whose vLLM loader is encoded here (Llama, Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3);
  vllm_exclude  per vLLM module, vLLM's exclude/ignore decision equals what is on disk: no quantized module
                loaded as unquantized, no unquantized one built quantized, a FusedMoE all-or-nothing, routers
                that vLLM never quantizes kept unquantized;
  vllm_tensor   every tensor vLLM's loader asks for exists with its dtype and shape; none it has no parameter for;
  vllm_scale    global (and FP8 weight) scales finite and > 0; fused shards (q/k/v, gate/up, q_a/kv_a) share the
                NVFP4 global scale (vLLM keeps the max for all shards);
  vllm_w13_scale  per expert, w1 (gate) and w3 (up) global scales equal (vLLM keeps w1's for both);
  vllm_input_scale  input scales present, finite and > 0 for every expert and every quantized linear (W4A4 / W8A8);
  vllm_kv       KV-cache scale names land on an attention layer after vLLM's renaming; k and v per layer.
A missing NVFP4 tensor is not an error in vLLM: its parameter stays ``torch.empty`` (uninitialised memory).
"""

from __future__ import annotations

from moequant.verify.checks import build_inventory
from moequant.verify.decode import Checkpoint, CheckpointError
from moequant.verify.report import VerifyResult
from moequant.verify.vllm_ctx import Ctx, check_tensors, disk_state, mismatch, placeholder
from moequant.verify.vllm_experts import check_experts
from moequant.verify.vllm_kv import check_kv
from moequant.verify.vllm_layout import LayoutError, Linear, build_layout
from moequant.verify.vllm_match import CtRules, MatchError, ModelOptRules, expand_star
from moequant.verify.vllm_schemes import Scheme, SchemeError, read_quant_config

VLLM_VERSION = "0.26.0"


def check_linear(ctx: Ctx, lin: Linear) -> None:
    try:
        scheme, why = ctx.decide(lin.prefix, lin.cls, lin.quantizable)
    except MatchError as err:
        ctx.fail("vllm_exclude", lin.prefix, str(err))
        return
    if lin.tied:
        if scheme is not None:
            ctx.fail("vllm_exclude", "lm_head", f"tied to the unquantized embeddings, but {why}: vLLM builds a "
                     f"{scheme.name} lm_head that has no weights of its own")
        return
    states = {s.disk: disk_state(ctx.inv, s.disk) for s in lin.shards}
    for disk, state in states.items():
        if state == "missing":
            ctx.fail("vllm_tensor", f"{disk}.weight",
                     f"absent: vLLM leaves {lin.prefix} {placeholder(None, 'weight', False)}")
    quantized = [d for d, s in states.items() if s == "quantized"]
    floats = [d for d, s in states.items() if s == "float"]
    if not mismatch(ctx, lin.prefix, scheme, why, quantized, floats, "shard(s)"):
        return
    good = [check_tensors(ctx, s.disk, scheme, (s.out, s.inp), False, lin.extras, lin.hint)
            for s in lin.shards if states[s.disk] != "missing"]
    if scheme is not None and len(lin.shards) > 1 and all(good) and len(good) == len(lin.shards):
        _fused_scales(ctx, lin, scheme)


def _fused_scales(ctx: Ctx, lin: Linear, scheme: Scheme) -> None:
    names = [f"{s.disk}.{scheme.names['global']}" for s in lin.shards]
    values = [ctx.scalar(n) for n in names]
    if len(set(values)) > 1 and scheme.name == "nvfp4":
        kept = max(values)  # vLLM: weight_scale_2.max() / weight_global_scale.max()
        for name, v in zip(names, values, strict=True):
            if v != kept:
                ratio = scheme.dequant_factor(kept) / scheme.dequant_factor(v)
                ctx.fail("vllm_scale", name, f"{v} != {kept} of another shard: vLLM fuses {lin.prefix}, keeps the max "
                         f"stored value for every shard and warns; this shard's weights come out x{ratio:.4g}")
    elif len(set(values)) > 1:
        ctx.result.warnings.append(f"{lin.prefix}: FP8 weight scales differ across shards; vLLM requantizes them "
                                   "to the largest (one extra rounding)")
    if scheme.inputs:
        inputs = {ctx.scalar(f"{s.disk}.{scheme.names['input']}") for s in lin.shards}
        if len(inputs) > 1:
            ctx.result.warnings.append(f"{lin.prefix}: input scales differ across fused shards; vLLM uses their max")


def check_vllm(ckpt: Checkpoint, result: VerifyResult) -> None:
    """Append vLLM-contract failures (checks ``vllm_*``) and warnings for the checkpoint to ``result``."""
    try:
        config = ckpt.json("config.json") or {}
        layout = build_layout(config)
    except (LayoutError, CheckpointError) as err:
        result.fail("vllm_model", "config.json", str(err))
        return
    try:
        qc, source = read_quant_config(ckpt, config)
    except SchemeError as err:
        result.fail("vllm_config", "config.json:quantization_config", str(err))
        return
    entries = expand_star(qc.entries) if qc.fmt == "modelopt" and layout.expands_star else qc.entries
    ctx = Ctx(ckpt, build_inventory(ckpt), layout, qc, result,
              ModelOptRules(entries, layout.packed) if qc.fmt == "modelopt" else None,
              CtRules(qc.entries, list(qc.groups), layout.packed) if qc.fmt != "modelopt" else None)
    for lin in layout.linears:
        check_linear(ctx, lin)
    spread = [check_experts(ctx, ex) for ex in layout.experts]
    check_kv(ckpt, layout, result)
    result.stats["vllm_modules"] = len(layout.linears) + len(layout.experts)
    _spread_note(result, [s for s in spread if s is not None])
    result.warnings.append(f"vLLM {VLLM_VERSION} contract ({layout.arch}, quantization config from {source}): "
                           "read from vLLM's source, not run")


def _spread_note(result: VerifyResult, spread: list[tuple[float, str]]) -> None:
    if spread:
        ratio, where = max(spread)
        result.warnings.append(f"per-expert input scales: the largest over experts is up to x{ratio:.3g} an expert's "
                               f"own ({where}); vLLM's FlashInfer/CuteDSL/emulation NVFP4 MoE backends and its FP8 "
                               "MoE quantize every expert's input with that max, CUTLASS keeps them per expert, "
                               "Marlin (Hopper) ignores them")


__all__ = ["VLLM_VERSION", "check_vllm"]
