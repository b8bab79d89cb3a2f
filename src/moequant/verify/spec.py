"""Parse a checkpoint's quantization config (ModelOpt-HF or compressed-tensors) into what the checks need.

Required keys, per the loaders (docs/checkpoint-formats.md sections 1.2, 1.4, 2.3):
  ModelOpt: hf_quant_config.json ``producer.{name,version}``, ``quantization.{quant_algo,
  kv_cache_quant_algo (may be null), exclude_modules, group_size (NVFP4 algos)}`` (vLLM
  ``ModelOptNvFp4Config._from_config`` raises without them); config.json ``quantization_config`` with
  ``quant_method`` "modelopt", the same ``quant_algo``, ``ignore`` equal to ``exclude_modules``.
  compressed-tensors: ``quant_method`` "compressed-tensors", ``format``, ``quantization_status`` "compressed",
  ``version``, ``config_groups`` whose weights are float/4 bits/tensor_group/16/symmetric (NVFP4) or
  float/8 bits/tensor (FP8) with ``dynamic`` false (vLLM ``_is_fp4a4_nvfp4`` / ``_is_fp8_w8a8``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moequant.verify.decode import Checkpoint
from moequant.verify.report import VerifyResult

MODELOPT_ALGOS = {"NVFP4": ("nvfp4", True), "W4A16_NVFP4": ("nvfp4", False), "FP8": ("fp8", True)}


@dataclass
class FormatSpec:
    format: str                         # "modelopt" | "compressed-tensors"
    default_scheme: str                 # "nvfp4" | "fp8"
    static_inputs: bool                 # input scales expected on every quantized linear
    exclude: list[str] = field(default_factory=list)
    kv: bool = False                    # config declares FP8 KV cache


def _require(result: VerifyResult, where: str, data: dict, keys: tuple[str, ...]) -> bool:
    missing = [k for k in keys if k not in data]
    for k in missing:
        result.fail("config_keys", where, f"required key {k!r} is missing")
    return not missing


def _modelopt(ckpt: Checkpoint, qc: dict, result: VerifyResult) -> FormatSpec | None:
    hf = ckpt.json("hf_quant_config.json")
    if hf is None:
        result.fail("config_keys", "hf_quant_config.json", "missing (TensorRT-LLM and older vLLM read it)")
        return None
    if not _require(result, "hf_quant_config.json", hf, ("producer", "quantization")):
        return None
    _require(result, "hf_quant_config.json:producer", hf["producer"], ("name", "version"))
    q = hf["quantization"]
    if not _require(result, "hf_quant_config.json:quantization", q,
                    ("quant_algo", "kv_cache_quant_algo", "exclude_modules")):
        return None
    algo = str(q["quant_algo"]).upper()
    if algo not in MODELOPT_ALGOS:
        result.fail("config_keys", "hf_quant_config.json", f"quant_algo {algo!r} not one of {sorted(MODELOPT_ALGOS)}")
        return None
    scheme, static_inputs = MODELOPT_ALGOS[algo]
    if scheme == "nvfp4" and q.get("group_size") != 16:
        result.fail("config_keys", "hf_quant_config.json",
                    f"group_size must be 16 for {algo}, got {q.get('group_size')!r}")
    if str(qc.get("quant_algo", "")).upper() != algo:
        result.fail("config_keys", "config.json",
                    f"quantization_config.quant_algo {qc.get('quant_algo')!r} != {algo!r}")
    if sorted(qc.get("ignore", [])) != sorted(q["exclude_modules"]):
        result.fail("exclude_list", "config.json", "quantization_config.ignore differs from exclude_modules")
    kv = q["kv_cache_quant_algo"] is not None
    if kv != isinstance(qc.get("kv_cache_scheme"), dict):
        result.fail("config_keys", "config.json", "kv_cache_scheme disagrees with kv_cache_quant_algo")
    return FormatSpec("modelopt", scheme, static_inputs, list(q["exclude_modules"]), kv)


def _ct_weights(result: VerifyResult, name: str, group: dict) -> str | None:
    w = group.get("weights") or {}
    nvfp4 = dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True, dynamic=False)
    fp8 = dict(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    for scheme, want in (("nvfp4", nvfp4), ("fp8", fp8)):
        if all(w.get(k) == v for k, v in want.items()):
            return scheme
    result.fail("config_keys", f"config.json:config_groups.{name}", f"weights {w} are neither NVFP4 nor FP8 per-tensor")
    return None


def _ct_inputs(result: VerifyResult, name: str, group: dict, scheme: str) -> bool:
    a = group.get("input_activations")
    if a is None:
        return False
    want = "local" if scheme == "nvfp4" else False
    if a.get("dynamic") != want:
        result.fail("config_keys", f"config.json:config_groups.{name}",
                     f"input_activations.dynamic must be {want!r} for {scheme}, got {a.get('dynamic')!r}")
    return True


def _compressed_tensors(qc: dict, result: VerifyResult) -> FormatSpec | None:
    if not _require(result, "config.json:quantization_config", qc,
                    ("config_groups", "format", "quantization_status", "version", "ignore")):
        return None
    if qc["quantization_status"] != "compressed":
        result.fail("config_keys", "config.json", f"quantization_status {qc['quantization_status']!r} != 'compressed'")
    schemes, inputs = set(), set()
    for name, group in qc["config_groups"].items():
        scheme = _ct_weights(result, name, group)
        if scheme is not None:
            schemes.add(scheme)
            inputs.add(_ct_inputs(result, name, group, scheme))
    if not schemes:
        return None
    kv = qc.get("kv_cache_scheme")
    if kv is not None and (kv.get("num_bits"), kv.get("type"), kv.get("strategy")) != (8, "float", "tensor"):
        result.fail("config_keys", "config.json",
                    f"kv_cache_scheme {kv} is not FP8 per-tensor (vLLM accepts only that)")
    default = "nvfp4" if "nvfp4" in schemes else "fp8"
    return FormatSpec("compressed-tensors", default, inputs == {True}, list(qc["ignore"]), kv is not None)


def parse_spec(ckpt: Checkpoint, result: VerifyResult) -> FormatSpec | None:
    config = ckpt.json("config.json")
    if config is None:
        result.fail("config_keys", "config.json", "missing")
        return None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or "quant_method" not in qc:
        result.fail("config_keys", "config.json", "no quantization_config.quant_method")
        return None
    method = str(qc["quant_method"])
    if method.startswith("modelopt"):
        result.format = "modelopt"
        return _modelopt(ckpt, qc, result)
    if method == "compressed-tensors":
        result.format = "compressed-tensors"
        return _compressed_tensors(qc, result)
    result.fail("config_keys", "config.json", f"quant_method {method!r} is neither 'modelopt' nor 'compressed-tensors'")
    return None


def text_config(config: dict) -> dict:
    return config.get("text_config") or config


def expected_experts(config: dict) -> int | None:
    """Routed experts per MoE layer, from config.json (None for a dense model or an unknown key)."""
    text = text_config(config)
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"):
        value = text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
