"""vLLM 0.26.0 contract for KV-cache scales: where vLLM's renaming puts each on-disk ``*_scale`` of the KV cache.

``AutoWeightsLoader`` first applies ``QuantizationConfig.get_cache_scale_mapper`` (``base_config.py``, the same
for ModelOpt and compressed-tensors): the regex renames below, in order, each applied when it matches. The result
must be ``<attention>.k_scale`` / ``v_scale`` of an attention layer (``<layer>.self_attn.attn``); a name that ends
elsewhere is skipped (``*_scale`` suffixes are ignorable) or makes the load raise, and the layer keeps scale 1.0.
DeepSeek MLA then goes through ``maybe_remap_kv_scale_name`` (``model_loader/weight_utils.py``), which looks for
``<name with .attn.k_scale -> .attn.attn.k_scale>``; its attention is ``self_attn.mla_attn.mla_attn``, so every
KV scale is dropped with a warning (read, not run). Per layer (``kv_cache.py``): both k and v positive are used,
k alone is copied to v, v alone trips an assertion, and a scale must be one value (per-tensor).
"""

from __future__ import annotations

import math
import re

import torch

from moequant.verify.decode import Checkpoint
from moequant.verify.report import VerifyResult
from moequant.verify.vllm_layout import Layout

CACHE_SCALE_RENAMES = (
    (re.compile(r"\.kv_scale$"), r".attn.k_scale"),
    (re.compile(r"\.self_attn\.[kv]_proj\.([kv])_scale$"), r".self_attn.attn.\1_scale"),
    (re.compile(r"\.self_attn\.qk(?:qk)?v_proj\.([kv])_scale$"), r".self_attn.attn.\1_scale"),
    (re.compile(r"\.mixer\.[kv]_proj\.([kv])_scale$"), r".mixer.attn.\1_scale"),
    (re.compile(r"\.self_attn\.q\.scale$"), r".self_attn.attn.q_scale"),
    (re.compile(r"\.self_attn\.([kv])_cache\.scale$"), r".self_attn.attn.\1_scale"),
    (re.compile(r"(?<!\.attn)\.([qkv])_scale$"), r".attn.\1_scale"),
)
KV_NAME = re.compile(r"(\.[qkv]_scale|\.kv_scale|\.[qkv]\.scale|\.[kv]_cache\.scale)$")


def vllm_kv_name(name: str) -> str:
    for pattern, repl in CACHE_SCALE_RENAMES:
        if pattern.search(name):
            name = pattern.sub(repl, name)
    return name


def check_kv(ckpt: Checkpoint, layout: Layout, result: VerifyResult) -> None:
    found: dict[str, dict[str, str]] = {a: {} for a in layout.attention}
    dropped = []
    for name in sorted(n for n in ckpt.tensors if KV_NAME.search(n)):
        mapped = vllm_kv_name(name)
        if layout.mla:
            dropped.append((name, mapped))
            continue
        attention, _, param = mapped.rpartition(".")
        if attention not in found or param not in ("k_scale", "v_scale", "q_scale"):
            result.fail("vllm_kv", name, f"vLLM renames it to {mapped}, which is no KV-cache scale of this model: "
                        "the load skips it or raises, and the layer's KV cache keeps scale 1.0")
            continue
        found[attention][param] = name
        _value(ckpt, name, result)
    if dropped:
        name, mapped = dropped[0]
        result.warnings.append(
            f"{len(dropped)} KV-cache scale(s) (e.g. {name}): vLLM {layout.arch} renames them to {mapped}, then "
            f"maybe_remap_kv_scale_name looks for {mapped.replace('.attn.', '.attn.attn.', 1)}, which the MLA "
            "attention (self_attn.mla_attn.mla_attn) lacks: dropped with a warning, the cache uses scale 1.0 "
            "(read from vLLM 0.26.0's source, not run)")
        return
    _per_layer(found, result)


def _value(ckpt: Checkpoint, name: str, result: VerifyResult) -> None:
    x = ckpt.get(name).to(torch.float32).reshape(-1)
    if x.numel() != 1:
        result.fail("vllm_kv", name, f"{x.numel()} values: vLLM raises 'Only support per-tensor scaling factor "
                    "for fp8 KV cache'")
    elif not (math.isfinite(float(x[0])) and float(x[0]) > 0):
        result.fail("vllm_kv", name, f"{float(x[0])}: vLLM uses 1.0 when k and v are both negative and asserts "
                    "k_scale > 0 otherwise; it must be finite and > 0")


def _per_layer(found: dict[str, dict[str, str]], result: VerifyResult) -> None:
    with_scales = [a for a, kv in found.items() if kv]
    for attention, kv in found.items():
        if "v_scale" in kv and "k_scale" not in kv:
            result.fail("vllm_kv", kv["v_scale"], "v_scale without k_scale: vLLM asserts k_scale > 0 after loading")
        elif not kv and with_scales:
            result.fail("vllm_kv", f"{attention}.k_scale", f"no KV-cache scales for this layer while "
                        f"{len(with_scales)} other(s) have them: vLLM uses 1.0 here")
