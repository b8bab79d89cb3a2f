"""compressed-tensors format (``nvfp4-pack-quantized`` / ``float-quantized``): QuantState -> tensors + config.

Tensors per quantized linear ``<m>`` (on-disk module name, experts per expert):

    ====================================  ==============  =============  =====================================
    tensor                                dtype           shape          value
    ====================================  ==============  =============  =====================================
    NVFP4 ``<m>.weight_packed``           uint8           [out, in/2]    E2M1 codes, element 2j in LOW nibble
    NVFP4 ``<m>.weight_scale``            float8_e4m3fn   [out, in/16]   block scales (same bytes as ModelOpt)
    NVFP4 ``<m>.weight_global_scale``     float32         [1]            1 / weight_scale_2 = (6*448) / amax
    NVFP4 ``<m>.input_global_scale``      float32         [1]            1 / input_scale; absent for W4A16
    FP8   ``<m>.weight``                  float8_e4m3fn   [out, in]      e4m3(w / weight_scale)
    FP8   ``<m>.weight_scale``            float32         [1]            amax / 448 (CT writes the model dtype;
                                                                         float32 keeps our exact scale and vLLM
                                                                         creates float32 parameters)
    FP8   ``<m>.input_scale``             float32         [1]            act_amax / 448; absent for W8A16
    KV    ``<attn>.k_scale``              float32         [1]            k amax / 448
    KV    ``<attn>.v_scale``              float32         [1]            v amax / 448
    ====================================  ==============  =============  =====================================

Decoding convention (what the verifier and the library compute): ``code * (fp8_scale / weight_global_scale)``
(compressed-tensors ``quantization/lifecycle/forward_helpers.py`` ``_dequantize``). The global scale is the
float32 reciprocal of our ``weight_scale_2``; block scale bytes and codes are identical to the ModelOpt export
(CT's own ``entrypoints/convert/converters/modelopt_nvfp4.py`` converts ModelOpt the same way).

Sources (full citations in docs/checkpoint-formats.md section 2):
  * names/dtypes/shapes: compressed-tensors 0.20.0 ``compressors/nvfp4/base.py``
    ``NVFP4PackedCompressor.compression_param_names`` / ``compress``; ``quantization/lifecycle/initialize.py``
    ``initialize_qparams`` (TENSOR_GROUP -> ``<base>_global_scale`` float32 ``[1]``; ``dynamic="local"`` inputs
    register no ``input_scale``); vLLM ``compressed_tensors_moe_w4a4_nvfp4.py`` ``create_weights``
    (``w13_weight_packed``, ``w13_weight_global_scale`` [E, 2], ``w13_input_global_scale`` [E, 2]).
  * nibble order: compressed-tensors ``compressors/nvfp4/helpers.py`` ``pack_fp4_to_uint8``
    (``indices[:, 0] | indices[:, 1] << 4``) and ``unpack_fp4_from_uint8`` (low nibble first).
  * config: ``compressors/model_compressors/model_compressor.py`` ``ModelCompressor.update_config`` and
    ``QuantizationConfig.model_dump`` (ran, 0.20.0, presets NVFP4 / NVFP4A16 / FP8).
  * KV names ``self_attn.k_scale`` / ``v_scale``: ``initialize.py`` ``initialize_attn_qparams``; vLLM
    ``compressed_tensors.py`` ``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme``.
  * ignore list: vLLM 0.26.0 (commit ``ffd46bfab``) ``compressed_tensors_moe/compressed_tensors_moe.py``
    ``CompressedTensorsMoEMethod.get_moe_method`` decides a whole FusedMoE layer by probing
    ``<prefix>.0.gate_proj``, ``.0.up_proj`` and ``.0.down_proj`` against ``ignore`` (``utils.py``
    ``should_ignore_layer``: equality or ``re:``), whatever the checkpoint's projection names; Mixtral's
    FusedMoE is ``<layer>.block_sparse_moe.experts`` with on-disk ``w1/w2/w3`` (``models/mixtral.py``).
    ``_engine_ignore`` adds those three probe names for each excluded experts container.
  * gate/up global scales: vLLM ``CompressedTensorsW4A4Nvfp4MoEMethod.process_weights_after_loading`` keeps
    ``w13_weight_global_scale[:, 0]`` only (warns if w1 != w3): ours are equal by construction.
"""

from __future__ import annotations

import torch

from moequant.export import common
from moequant.export.writer import TensorSpec, natural_key
from moequant.scales import QuantState

FORMAT = "compressed-tensors"
CT_VERSION = "0.20.0"  # the compressed-tensors release whose serialization this module reproduces


def _inverse(x: torch.Tensor) -> torch.Tensor:
    return torch.reciprocal(x.to(torch.float32))


def _nvfp4_specs(name: str, rec, target) -> list[TensorSpec]:
    m = common.module_name(name)
    rows = common.weight_rows(target, rec)
    specs = [
        TensorSpec(f"{m}.weight_packed", common.packed_shape(target, rec), torch.uint8,
                   lambda: common.weight_codes(rec)),
        TensorSpec(f"{m}.weight_scale", (rows, common.block_cols(target)), torch.float8_e4m3fn,
                   lambda: rec.block_scale),
        common.scalar_spec(f"{m}.weight_global_scale", _inverse(rec.global_scale), (1,)),
    ]
    if rec.input_scale is not None:
        specs.append(common.scalar_spec(f"{m}.input_global_scale", _inverse(rec.input_scale), (1,)))
    return specs


def _fp8_specs(name: str, rec, target) -> list[TensorSpec]:
    m = common.module_name(name)
    specs = [
        TensorSpec(f"{m}.weight", (common.weight_rows(target, rec), target.shape[-1]), torch.float8_e4m3fn,
                   lambda: common.weight_codes(rec)),
        common.scalar_spec(f"{m}.weight_scale", rec.global_scale, (1,)),
    ]
    if rec.input_scale is not None:
        specs.append(common.scalar_spec(f"{m}.input_scale", rec.input_scale, (1,)))
    return specs


def tensor_specs(state: QuantState) -> list[TensorSpec]:
    """Every quantized tensor and KV scale of the checkpoint (unquantized tensors come from ``common``)."""
    scheme = common.scheme_of(state)
    targets = {t.key: t for t in state.plan.targets}
    specs = []
    for name, rec in state.records().items():
        target = targets[rec.target]
        if scheme == "nvfp4":
            specs.extend(_nvfp4_specs(name, rec, target))
        else:
            specs.extend(_fp8_specs(name, rec, target))
    return specs + kv_specs(state)


def kv_specs(state: QuantState) -> list[TensorSpec]:
    specs = []
    for path in common.kv_paths(state):
        kv = state.kv_cache[path]
        specs.append(common.scalar_spec(f"{path}.k_scale", kv.k_scale, (1,)))
        specs.append(common.scalar_spec(f"{path}.v_scale", kv.v_scale, (1,)))
    return specs


def _nvfp4_args(dynamic) -> dict:
    args = {"dynamic": dynamic, "group_size": 16, "num_bits": 4, "scale_dtype": "torch.float8_e4m3fn",
            "strategy": "tensor_group", "symmetric": True, "type": "float"}
    if dynamic == "local":
        args["observer"] = "static_minmax"
    return args


def _fp8_args(observer: bool) -> dict:
    args = {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": "tensor", "symmetric": True,
            "type": "float"}
    if observer:
        args["observer"] = "static_minmax"
    return args


VLLM_MOE_PROBES = ("gate_proj", "up_proj", "down_proj")  # what vLLM asks the ignore list for, under ``<prefix>.0.``


def _engine_ignore(ignore: list[str]) -> list[str]:
    """``ignore`` plus vLLM's FusedMoE probe names ``<container>.0.gate_proj/up_proj/down_proj`` for every excluded
    experts container listed by its per-expert modules ``<container>.<e>.<proj>`` (``common.excluded_modules``)
    under other projection names (Mixtral's ``w1/w2/w3``). Without them vLLM builds that layer as quantized and
    fails on its float weights. The added names name no on-disk tensor; compressed-tensors 0.20.0
    (``utils/match.py`` ``match_named_modules``) only skips modules an ignore entry matches, so there they are inert."""
    containers = {}
    for entry in ignore:
        container, index, proj = (entry.rsplit(".", 2) + ["", ""])[:3]
        if index == "0" and container.rpartition(".")[2] == "experts":
            containers.setdefault(container, set()).add(proj)
    extra = [f"{c}.0.{p}" for c, projs in containers.items() if not projs & set(VLLM_MOE_PROBES)
             for p in VLLM_MOE_PROBES]
    return list(ignore) + sorted(set(extra) - set(ignore), key=natural_key)


def quantization_config(state: QuantState, ignore: list[str]) -> dict:
    """config.json ``quantization_config`` exactly as ``ModelCompressor.update_config`` (0.20.0) writes it."""
    scheme = common.scheme_of(state)
    has_inputs = common.input_scales_present(state)
    fmt = "nvfp4-pack-quantized" if scheme == "nvfp4" else "float-quantized"
    if scheme == "nvfp4":
        weights, inputs = _nvfp4_args(False), (_nvfp4_args("local") if has_inputs else None)
    else:  # without input scales: W8A16 (vLLM compressed_tensors_w8a16_fp8.py)
        weights, inputs = _fp8_args(False), (_fp8_args(True) if has_inputs else None)
    kv = _fp8_args(False) if state.kv_scheme is not None else None
    group = {"format": fmt, "input_activations": inputs, "output_activations": None, "targets": ["Linear"],
             "weights": weights}
    return {
        "config_groups": {"group_0": group}, "format": fmt, "global_compression_ratio": None,
        "ignore": _engine_ignore(ignore), "kv_cache_scheme": kv, "moe_sparsity_config": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {}, "version": CT_VERSION,
    }
