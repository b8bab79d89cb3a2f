"""ModelOpt-HF ("unified HF") format: QuantState + model -> tensors + ``hf_quant_config.json`` + config.

Tensors per quantized linear ``<m>`` (``<m>`` = on-disk module name; experts per expert, e.g.
``model.layers.3.mlp.experts.7.up_proj``, Mixtral ``model.layers.3.block_sparse_moe.experts.7.w3``):

    ===============================  ==============  =============  ==========================================
    tensor                           dtype           shape          value
    ===============================  ==============  =============  ==========================================
    NVFP4 ``<m>.weight``             uint8           [out, in/2]    E2M1 codes, element 2j in the LOW nibble
    NVFP4 ``<m>.weight_scale``       float8_e4m3fn   [out, in/16]   block scales, plain row-major (no swizzle)
    NVFP4 ``<m>.weight_scale_2``     float32         [] (0-d)       global scale amax / (6*448), group-shared
    NVFP4 ``<m>.input_scale``        float32         [] (0-d)       act_amax / (6*448); absent for W4A16_NVFP4
    FP8   ``<m>.weight``             float8_e4m3fn   [out, in]      e4m3(w / weight_scale), saturating
    FP8   ``<m>.weight_scale``       float32         [] (0-d)       amax / 448, group-shared
    FP8   ``<m>.input_scale``        float32         [] (0-d)       act_amax / 448
    KV    ``<attn>.k_proj.k_scale``  float32         [] (0-d)       k amax / 448 (1.0 for "fp8-cast")
    KV    ``<attn>.v_proj.v_scale``  float32         [] (0-d)       v amax / 448 (1.0 for "fp8-cast")
    ===============================  ==============  =============  ==========================================

Sources (see docs/checkpoint-formats.md sections 0, 1 and 3 for the full citations):
  * tensor names, dtypes, 0-d scalars: ModelOpt ``modelopt/torch/export/unified_export_hf.py``
    ``_export_quantized_weight`` (``.squeeze()`` on weight_scale_2 / input_scale); vLLM
    ``model_executor/layers/quantization/modelopt.py`` ``ModelOptNvFp4LinearMethod.create_weights``
    (weight uint8 [N, K/2], weight_scale fp8 [N, K/16], weight_scale_2 / input_scale float32 per shard).
  * nibble order: ModelOpt ``qtensor/nvfp4_tensor.py`` ``(q[..., 1::2] << 4) | q[..., 0::2]``; vLLM
    ``utils/nvfp4_emulation_utils.py`` ``break_fp4_bytes`` (low nibble first).
  * KV names: ModelOpt ``export/quant_utils.py`` ``_KV_CACHE_REPLACEMENTS`` (``k_bmm_quantizer._amax`` ->
    ``k_proj.k_scale``); vLLM ``model_loader/weight_utils.py`` ``maybe_remap_kv_scale_name``.
  * hf_quant_config.json keys: ModelOpt ``unified_export_hf.py`` ``_write_hf_export_config``; vLLM
    ``ModelOptNvFp4Config._from_config`` requires ``group_size``, ``kv_cache_quant_algo``, ``exclude_modules``.
  * config.json ``quantization_config`` (flat form): ModelOpt ``convert_hf_config.py``
    ``convert_hf_quant_config_format``; vLLM ``ModelOptQuantConfigBase.from_config`` (``quant_algo``,
    ``ignore``, ``kv_cache_scheme`` type float / 8 bits -> FP8, ``group_size`` defaults to 16).
  * gate/up and q/k/v must carry identical ``weight_scale_2`` and ``input_scale``: vLLM takes column 0 / the max
    and warns (``ModelOptNvFp4FusedMoE.process_weights_after_loading``), TensorRT-LLM asserts
    (``linear.py`` ``NVFP4LinearMethod.load_weight_scales``). The plan's groups guarantee it by construction.
"""

from __future__ import annotations

import torch

from moequant.export import common
from moequant.export.writer import TensorSpec
from moequant.scales import QuantState

FORMAT = "modelopt"


def quant_algo(state: QuantState) -> str:
    """``NVFP4`` (W4A4), ``W4A16_NVFP4`` (no input scales calibrated) or ``FP8``."""
    scheme = common.scheme_of(state)
    has_inputs = common.input_scales_present(state)
    if scheme == "fp8":
        if not has_inputs:
            raise common.ExportError(
                "FP8 (W8A8) ModelOpt checkpoints need static input scales (vLLM ModelOptFp8LinearMethod reads "
                "input_scale); run activation calibration before exporting"
            )
        return "FP8"
    return "NVFP4" if has_inputs else "W4A16_NVFP4"


def _record_specs(state: QuantState, algo: str) -> list[TensorSpec]:
    specs = []
    targets = {t.key: t for t in state.plan.targets}
    for name, rec in state.records().items():
        target, m = targets[rec.target], common.module_name(name)
        rows = common.weight_rows(target, rec)
        if algo == "FP8":
            specs.append(TensorSpec(f"{m}.weight", (rows, target.shape[-1]), torch.float8_e4m3fn,
                                    lambda r=rec: common.weight_codes(r)))
            specs.append(common.scalar_spec(f"{m}.weight_scale", rec.global_scale, ()))
        else:
            specs.append(TensorSpec(f"{m}.weight", common.packed_shape(target, rec), torch.uint8,
                                    lambda r=rec: common.weight_codes(r)))
            specs.append(TensorSpec(f"{m}.weight_scale", (rows, common.block_cols(target)),
                                    torch.float8_e4m3fn, lambda r=rec: r.block_scale))
            specs.append(common.scalar_spec(f"{m}.weight_scale_2", rec.global_scale, ()))
        if rec.input_scale is not None and algo != "W4A16_NVFP4":
            specs.append(common.scalar_spec(f"{m}.input_scale", rec.input_scale, ()))
    return specs


def kv_specs(state: QuantState) -> list[TensorSpec]:
    specs = []
    for path in common.kv_paths(state):
        kv = state.kv_cache[path]
        specs.append(common.scalar_spec(f"{path}.k_proj.k_scale", kv.k_scale, ()))
        specs.append(common.scalar_spec(f"{path}.v_proj.v_scale", kv.v_scale, ()))
    return specs


def tensor_specs(state: QuantState) -> list[TensorSpec]:
    """Every quantized tensor and KV scale of the checkpoint (unquantized tensors come from ``common``)."""
    return _record_specs(state, quant_algo(state)) + kv_specs(state)


def _activation_args(algo: str) -> dict | None:
    if algo == "NVFP4":
        return {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    if algo == "FP8":
        return {"dynamic": False, "num_bits": 8, "type": "float"}
    return None


def configs(state: QuantState, exclude: list[str], producer: dict) -> tuple[dict, dict]:
    """(``hf_quant_config.json`` content, config.json ``quantization_config``), as ModelOpt 0.47 writes them."""
    algo = quant_algo(state)
    kv_algo = "FP8" if state.kv_scheme is not None else None
    quantization = {"quant_algo": algo, "kv_cache_quant_algo": kv_algo, "exclude_modules": list(exclude)}
    weights = {"dynamic": False, "num_bits": 8, "type": "float"}
    if algo != "FP8":
        quantization["group_size"] = 16
        weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    group = {"weights": weights, "targets": ["Linear"]}
    if _activation_args(algo) is not None:
        group["input_activations"] = _activation_args(algo)
    flat = {"config_groups": {"group_0": group}, "ignore": list(exclude), "quant_algo": algo,
            "producer": dict(producer), "quant_method": "modelopt"}
    if kv_algo is not None:
        flat["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    return {"producer": dict(producer), "quantization": quantization}, flat
