"""What vLLM 0.26.0 reads from a checkpoint's quantization config, and which tensors each scheme asks for.

From vLLM 0.26.0 (PyPI wheel, commit ``ffd46bfab``): ``get_quant_config`` (``model_loader/weight_utils.py``)
prefers config.json ``quantization_config`` over ``hf_quant_config.json``; ModelOpt ``from_config``
(``layers/quantization/modelopt.py``) reads ``quant_algo``, ``ignore`` and ``kv_cache_scheme`` from the flat form,
``quantization.{quant_algo, exclude_modules, group_size, kv_cache_quant_algo}`` from the nested one (NVFP4 then
requires all three of group_size / kv_cache_quant_algo / exclude_modules). compressed-tensors reads
``config_groups`` / ``ignore`` / ``format`` (``compressed_tensors.py``). Parameters each method registers
(``create_weights``): ModelOpt NVFP4 ``weight`` uint8 [N, K/2], ``weight_scale`` e4m3 [N, K/16], ``weight_scale_2``
and ``input_scale`` float32 per shard (W4A16 keeps ``input_scale`` as an unused placeholder); ModelOpt FP8
``weight`` e4m3 [N, K], ``weight_scale`` / ``input_scale`` per shard; compressed-tensors NVFP4 ``weight_packed``,
``weight_scale``, ``weight_global_scale``, ``input_global_scale`` (W4A4 only); compressed-tensors FP8 ``weight``,
``weight_scale``, ``input_scale`` (static inputs only). A scalar loads from a 0-d or one-element tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moequant.verify.decode import Checkpoint
from moequant.errors import MoequantError

FLOATS = (torch.float32, torch.bfloat16, torch.float16)   # widen exactly into vLLM's float32 scale parameters
SCALAR = "scalar"
MODELOPT_ALGOS = {"NVFP4": ("nvfp4", True), "W4A16_NVFP4": ("nvfp4", False), "FP8": ("fp8", True)}
MODELOPT_KNOWN = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION")


class SchemeError(MoequantError, ValueError):
    """The quantization config is one vLLM refuses, or one this contract does not encode."""


@dataclass(frozen=True)
class Scheme:
    name: str      # "nvfp4" | "fp8"
    fmt: str       # "modelopt" | "compressed-tensors"
    inputs: bool   # static input scales are read (W4A4 / W8A8 static)

    @property
    def names(self) -> dict[str, str]:
        """Role -> on-disk suffix."""
        if self.name == "fp8":
            return {"data": "weight", "global": "weight_scale", "input": "input_scale"}
        if self.fmt == "modelopt":
            return {"data": "weight", "block": "weight_scale", "global": "weight_scale_2", "input": "input_scale"}
        return {"data": "weight_packed", "block": "weight_scale", "global": "weight_global_scale",
                "input": "input_global_scale"}

    def tensors(self, out: int, inp: int) -> dict[str, tuple[tuple[torch.dtype, ...], tuple[int, ...] | str]]:
        """On-disk suffix -> (accepted dtypes, shape or SCALAR) that vLLM loads into this layer's parameters."""
        n = self.names
        if self.name == "fp8":
            want = {n["data"]: ((torch.float8_e4m3fn,), (out, inp)), n["global"]: (FLOATS, SCALAR)}
        else:
            want = {n["data"]: ((torch.uint8,), (out, inp // 2)),
                    n["block"]: ((torch.float8_e4m3fn,), (out, inp // 16)), n["global"]: (FLOATS, SCALAR)}
        if self.inputs:
            want[n["input"]] = (FLOATS, SCALAR)
        return want

    def optional(self, moe: bool) -> set[str]:
        """Suffixes vLLM has a parameter for but does not need: ModelOpt NVFP4 W4A16 keeps an input_scale slot,
        compressed-tensors NVFP4A16 MoE an input_global_scale slot."""
        if self.name != "nvfp4":
            return {"bias"}
        if self.fmt == "modelopt":
            return {"bias", "input_scale"}
        return {"bias", "input_global_scale"} if moe else {"bias"}

    def dequant_factor(self, value: float) -> float:
        """The weight multiplier a stored global scale stands for (compressed-tensors stores its inverse)."""
        return value if self.fmt == "modelopt" or self.name == "fp8" else 1.0 / value


@dataclass
class QuantConfig:
    fmt: str
    scheme: Scheme | None                  # ModelOpt: one scheme for every quantized module
    entries: list[str]                     # exclude (ModelOpt) / ignore (compressed-tensors)
    groups: dict[str, Scheme]              # compressed-tensors target -> scheme


def _modelopt(qc: dict, nested: bool) -> QuantConfig:
    section = qc["quantization"] if nested else qc
    algo = str(section.get("quant_algo") or "").upper()
    if not algo:
        raise SchemeError("no quant_algo: vLLM raises \"Missing 'quant_algo' in quantization config\"")
    if algo not in MODELOPT_KNOWN:
        raise SchemeError(f"quant_algo {algo!r}: vLLM raises 'ModelOpt currently only supports {list(MODELOPT_KNOWN)}'")
    if algo not in MODELOPT_ALGOS:
        raise SchemeError(f"quant_algo {algo!r} loads in vLLM but this contract encodes only {sorted(MODELOPT_ALGOS)}")
    missing = [k for k in ("group_size", "kv_cache_quant_algo", "exclude_modules") if k not in section]
    if nested and "NVFP4" in algo and missing:
        raise SchemeError(f"hf_quant_config.json lacks {missing}: vLLM raises 'NVFP4 quantization requires the "
                          "following fields in hf_quant_config.json'")
    entries = section.get("exclude_modules", []) if nested else qc.get("ignore", [])
    if not isinstance(entries, list):
        raise SchemeError(f"exclude list is a {type(entries).__name__}: vLLM raises 'exclude_modules must be a list'")
    group = section.get("group_size")
    if group is not None and algo != "FP8" and str(group) != "16":
        raise SchemeError(f"group_size {group!r}: NVFP4 blocks are 16 elements, the only size vLLM's NVFP4 "
                          "kernels take")
    name, inputs = MODELOPT_ALGOS[algo]
    return QuantConfig("modelopt", Scheme(name, "modelopt", inputs), list(entries), {})


def _ct_scheme(target: str, group: dict) -> Scheme:
    w, a = group.get("weights") or {}, group.get("input_activations")
    key = (w.get("type"), w.get("num_bits"), w.get("strategy"))
    if key == ("float", 4, "tensor_group") and w.get("group_size") == 16 and w.get("symmetric"):
        if a is not None and (a.get("type"), a.get("num_bits"), a.get("strategy")) != ("float", 4, "tensor_group"):
            raise SchemeError(f"target {target!r}: NVFP4 weights with {a} inputs; vLLM raises 'For NVFP4 weights, "
                              "input quantization must also be NVFP4 format or None'")
        return Scheme("nvfp4", "compressed-tensors", a is not None)
    if key == ("float", 8, "tensor"):
        return Scheme("fp8", "compressed-tensors", a is not None and a.get("dynamic") is False)
    raise SchemeError(f"target {target!r}: weights {w} are neither NVFP4 nor FP8 per-tensor, the schemes this "
                      "contract encodes")


def _compressed_tensors(qc: dict) -> QuantConfig:
    groups: dict[str, Scheme] = {}
    for name, group in (qc.get("config_groups") or {}).items():
        targets = group.get("targets") or []
        if len(targets) == 1 and targets[0].endswith("Attention"):
            continue  # vLLM skips attention-only groups (KV cache quantization is separate)
        for target in targets:
            groups[target] = _ct_scheme(target, group)
    if not groups:
        raise SchemeError("no config_groups with weight targets: vLLM would quantize nothing")
    ignore = qc.get("ignore", [])
    if not isinstance(ignore, list):
        raise SchemeError(f"ignore is a {type(ignore).__name__}, not a list")
    return QuantConfig("compressed-tensors", None, list(ignore), groups)


def read_quant_config(ckpt: Checkpoint, config: dict) -> tuple[QuantConfig, str]:
    """(what vLLM parses, the file it came from); ``SchemeError`` says what vLLM would do instead of loading."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        method = str(qc.get("quant_method", ""))
        if method.lower().startswith("modelopt"):
            return _modelopt(qc, "quantization" in qc), "config.json"
        if method == "compressed-tensors":
            return _compressed_tensors(qc), "config.json"
        raise SchemeError(f"quant_method {method!r} is neither modelopt nor compressed-tensors")
    hf = ckpt.json("hf_quant_config.json")
    if isinstance(hf, dict) and isinstance(hf.get("quantization"), dict):
        raise SchemeError("config.json has no quantization_config: vLLM loads the model as unquantized unless run "
                          "with --quantization modelopt/modelopt_fp4 (then it reads hf_quant_config.json)")
    raise SchemeError("config.json has no quantization_config: vLLM loads the model as unquantized")
