"""The verifier's checks, each appending ``Failure(check, tensor, message)`` to a ``VerifyResult``.

Structure is read from tensor names and shapes only (the engines fuse by name, so the checks do too):
  * a module is *quantized* when it carries any quantization tensor (``weight_scale``, ``weight_scale_2``,
    ``input_scale``, ``weight_packed``, ``weight_global_scale``, ``input_global_scale``);
  * an *unquantized linear* is any other module with a 2-D floating ``weight`` whose last name component does
    not contain "embed" (routers, ``shared_expert_gate``, ``lm_head``, excluded attention ...);
  * fused groups are siblings the engines fuse: q/k/v_proj, gate/up_proj, Mixtral w1/w3, DeepSeek
    q_a_proj + kv_a_proj_with_mqa (vLLM ``packed_modules_mapping`` / ``stacked_params_mapping``);
  * experts are modules ``<parent>.experts.<e>.<proj>``; the expected count comes from config.json.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from moequant.verify.decode import Checkpoint, TensorInfo, decode_fp8, decode_nvfp4, nvfp4_finite_bound
from moequant.verify.report import VerifyResult
from moequant.verify.spec import FormatSpec

QUANT_SUFFIXES = {"weight_scale", "weight_scale_2", "input_scale", "weight_packed", "weight_global_scale",
                  "input_global_scale"}
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"),
                ("q_a_proj", "kv_a_proj_with_mqa"))
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
EXPERT_RE = re.compile(r"^(?P<parent>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")
LAYER_RE = re.compile(r"^(?P<layer>.*?\.layers\.\d+)\.")


@dataclass
class Inventory:
    modules: dict[str, dict[str, TensorInfo]] = field(default_factory=lambda: defaultdict(dict))
    quantized: list[str] = field(default_factory=list)
    unquantized_linear: list[str] = field(default_factory=list)
    kv: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))  # attention -> k/v -> name


def build_inventory(ckpt: Checkpoint) -> Inventory:
    inv = Inventory()
    for name, info in ckpt.tensors.items():
        if name.endswith((".k_scale", ".v_scale")):
            attention = name[: -len(".k_scale")]
            for proj in (".k_proj", ".v_proj"):
                attention = attention[: -len(proj)] if attention.endswith(proj) else attention
            inv.kv[attention][name[-7]] = name
            continue
        module, _, suffix = name.rpartition(".")
        inv.modules[module][suffix] = info
    for module, tensors in sorted(inv.modules.items()):
        if QUANT_SUFFIXES & set(tensors):
            inv.quantized.append(module)
        elif _is_linear_weight(module, tensors.get("weight")):
            inv.unquantized_linear.append(module)
    return inv


def _is_linear_weight(module: str, info: TensorInfo | None) -> bool:
    return (info is not None and len(info.shape) == 2 and info.dtype in FLOATS
            and "embed" not in module.rsplit(".", 1)[-1])


def tensor_names(spec: FormatSpec, scheme: str) -> dict[str, str]:
    """Role -> suffix for a quantized module: data, block, global, input."""
    if scheme == "fp8":
        return {"data": "weight", "global": "weight_scale", "input": "input_scale"}
    if spec.format == "modelopt":
        return {"data": "weight", "block": "weight_scale", "global": "weight_scale_2", "input": "input_scale"}
    return {"data": "weight_packed", "block": "weight_scale", "global": "weight_global_scale",
            "input": "input_global_scale"}


def _scalar_ok(spec: FormatSpec, shape: tuple[int, ...]) -> bool:
    return shape == (1,) if spec.format == "compressed-tensors" else shape in ((), (1,))


def _expected(spec: FormatSpec, scheme: str) -> dict[str, tuple[tuple[torch.dtype, ...], str]]:
    names = tensor_names(spec, scheme)
    scalar_dtypes = (torch.float32,) if spec.format == "modelopt" or scheme == "nvfp4" else FLOATS
    out = {names["global"]: (scalar_dtypes, "scalar")}
    if scheme == "fp8":
        out[names["data"]] = ((torch.float8_e4m3fn,), "matrix")
    else:
        out[names["data"]] = ((torch.uint8,), "matrix")
        out[names["block"]] = ((torch.float8_e4m3fn,), "matrix")
    if spec.static_inputs:
        out[names["input"]] = (scalar_dtypes, "scalar")
    return out


def check_module_layout(spec: FormatSpec, module: str, tensors: dict[str, TensorInfo], result: VerifyResult) -> bool:
    """Tensor set, dtypes and shapes of one quantized module; True when it can be decoded."""
    scheme = spec.default_scheme
    expected = _expected(spec, scheme)
    allowed = set(expected) | {"bias", tensor_names(spec, scheme)["input"]}  # W4A16 may keep input placeholders
    ok = True
    for suffix, (dtypes, kind) in expected.items():
        info = tensors.get(suffix)
        if info is None:
            result.fail("tensor_set", f"{module}.{suffix}", f"missing ({spec.format} {scheme} needs it)")
            ok = False
        elif info.dtype not in dtypes:
            result.fail("dtype", info.name, f"dtype {info.dtype}, expected {' or '.join(map(str, dtypes))}")
            ok = False
        elif kind == "scalar" and not _scalar_ok(spec, info.shape):
            result.fail("shape", info.name, f"shape {list(info.shape)}, expected a per-tensor scalar")
            ok = False
        elif kind == "matrix" and len(info.shape) != 2:
            result.fail("shape", info.name, f"shape {list(info.shape)}, expected 2-D [out, in]")
            ok = False
    for suffix in sorted(set(tensors) - allowed):
        result.fail("tensor_set", f"{module}.{suffix}", "unexpected tensor on a quantized module")
    if ok and scheme == "nvfp4":
        ok = _check_block_shape(spec, module, tensors, result)
    return ok


def _check_block_shape(spec: FormatSpec, module: str, tensors: dict[str, TensorInfo], result: VerifyResult) -> bool:
    names = tensor_names(spec, "nvfp4")
    packed, block = tensors[names["data"]].shape, tensors[names["block"]].shape
    if packed[0] != block[0] or packed[1] * 2 != block[1] * 16:
        result.fail("shape", f"{module}.{names['block']}",
                    f"block scales {list(block)} do not fit packed weight {list(packed)} (need [out, in/16])")
        return False
    return True


def scale_values(ckpt: Checkpoint, spec: FormatSpec, module: str, result: VerifyResult,
                 maxima: dict[str, torch.Tensor] | None = None) -> bool:
    """All scales of a module finite and > 0 (block scales included). With ``maxima``, an E4M3 block-scale
    tensor that passes leaves its largest value there under "block" (a one-element float8_e4m3fn tensor)."""
    ok = True
    names = tensor_names(spec, spec.default_scheme)
    for role in ("block", "global", "input"):
        name = f"{module}.{names.get(role, '-')}"
        if name not in ckpt.tensors:
            continue
        raw = ckpt.get(name)
        largest = _e4m3_positive_max(raw)
        if largest is not None:  # every value finite and > 0, decided on the bytes
            if maxima is not None and role == "block":
                maxima[role] = largest
            continue
        x = raw.to(torch.float32)
        bad = ~(torch.isfinite(x) & (x > 0))
        if bool(bad.any()):
            first = x[bad].flatten()[0].item()
            result.fail("scale_positive", name, f"{int(bad.sum())} value(s) zero, negative, NaN or inf (e.g. {first})")
            ok = False
    return ok


def _e4m3_positive_max(x: torch.Tensor) -> torch.Tensor | None:
    """For float8_e4m3fn ``x`` whose every value is finite and > 0, its largest value ``[1]``; else None.

    E4M3FN bytes 0x01..0x7E are exactly the finite positive values, in increasing order (0x00 is +0, 0x7F
    NaN, 0x80..0xFF negative, -0 or NaN), so one min/max pass over the bytes decides it."""
    if x.dtype != torch.float8_e4m3fn or not x.numel():
        return None
    data = x.reshape(-1).view(torch.uint8)
    low, high = data.min(), data.max()
    if int(low) < 0x01 or int(high) > 0x7E:
        return None
    return high.reshape(1).view(torch.float8_e4m3fn)


def nvfp4_decodes_finite(ckpt: Checkpoint, spec: FormatSpec, module: str, maxima: dict[str, torch.Tensor]) -> bool:
    """True when the scales alone prove that every decoded value of this NVFP4 module is finite."""
    if spec.default_scheme != "nvfp4" or "block" not in maxima:
        return False
    names = tensor_names(spec, "nvfp4")
    convention = "modelopt" if spec.format == "modelopt" else "ct"
    return nvfp4_finite_bound(maxima["block"], ckpt.get(f"{module}.{names['global']}"), convention)


def decode_module(ckpt: Checkpoint, spec: FormatSpec, module: str) -> torch.Tensor:
    """float32 ``[out, in]`` decoded weight of a quantized module (layout already checked)."""
    names = tensor_names(spec, spec.default_scheme)
    data = ckpt.get(f"{module}.{names['data']}")
    scale = ckpt.get(f"{module}.{names['global']}")
    if spec.default_scheme == "fp8":
        return decode_fp8(data, scale)
    convention = "modelopt" if spec.format == "modelopt" else "ct"
    return decode_nvfp4(data, ckpt.get(f"{module}.{names['block']}"), scale, convention)


def check_fused_groups(ckpt: Checkpoint, spec: FormatSpec, inv: Inventory, result: VerifyResult) -> None:
    """Shards the engines fuse: all quantized or none, identical global AND input scales (bit for bit)."""
    quantized = set(inv.quantized)
    present = set(inv.modules)
    names = tensor_names(spec, spec.default_scheme)
    parents = {m.rpartition(".")[0] for m in present}
    for parent in sorted(parents):
        for group in FUSED_GROUPS:
            members = [f"{parent}.{g}" for g in group if f"{parent}.{g}" in present]
            if len(members) < 2:
                continue
            q = [m for m in members if m in quantized]
            if q and len(q) != len(members):
                result.fail("fused_group_partial", parent, f"engines fuse {members}; only {q} are quantized")
                continue
            for role, check in (("global", "fused_group_global_scale"), ("input", "fused_group_input_scale")):
                _compare_group(ckpt, [f"{m}.{names[role]}" for m in q], check, result)


def _compare_group(ckpt: Checkpoint, names: list[str], check: str, result: VerifyResult) -> None:
    names = [n for n in names if n in ckpt.tensors]
    if len(names) < 2:
        return
    values = [ckpt.get(n).to(torch.float32).reshape(-1) for n in names]
    for name, value in zip(names[1:], values[1:], strict=True):
        if not torch.equal(value, values[0]):
            result.fail(check, name, f"{value.tolist()} != {values[0].tolist()} of {names[0]}: engines fuse these "
                        "shards and keep one value (vLLM warns and mis-scales, TensorRT-LLM asserts)")


def check_experts(inv: Inventory, expected: int | None, result: VerifyResult) -> None:
    """Every MoE layer has all ``expected`` experts, each with the same projections."""
    layers: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for module in inv.modules:
        match = EXPERT_RE.match(module)
        if match:
            layers[match["parent"]][int(match["expert"])].add(match["proj"])
    fused = _fused_expert_parents(inv, expected)
    result.stats["moe_layers"] = len(layers) + len(fused)
    if layers and expected is None:
        result.warnings.append("config.json names no expert count; checking experts against the largest layer")
        expected = max(len(e) for e in layers.values())
    for parent, experts in sorted(layers.items()):
        missing = sorted(set(range(expected)) - set(experts))
        if missing:
            result.fail("experts_complete", parent, f"{len(missing)} of {expected} experts missing: {missing[:16]}")
        projections = set().union(*experts.values())
        for e, projs in sorted(experts.items()):
            if projs != projections:
                result.fail("experts_complete", f"{parent}.{e}", f"lacks {sorted(projections - projs)}")
    _routers_without_experts(inv, set(layers) | fused, expected, result)


def _fused_expert_parents(inv: Inventory, expected: int | None) -> set[str]:
    """``<parent>.experts`` modules holding all experts in 3-D tensors ``[E, ...]`` (GPT-OSS on disk)."""
    return {module for module, tensors in inv.modules.items() if module.endswith(".experts")
            and any(len(t.shape) == 3 and t.shape[0] == expected for t in tensors.values())}


def _routers_without_experts(inv: Inventory, parents: set[str], expected: int | None, result: VerifyResult) -> None:
    """A layer holding a router for ``expected`` experts but no expert tensors lost all its experts."""
    if not expected:
        return
    with_experts = {m["layer"] for p in parents if (m := LAYER_RE.match(p + "."))}
    for module in inv.unquantized_linear:
        info = inv.modules[module]["weight"]
        match = LAYER_RE.match(module)
        if match and info.shape[0] == expected and match["layer"] not in with_experts \
                and module.rsplit(".", 1)[-1] in ("gate", "router"):
            result.fail("experts_complete", module,
                        f"router for {expected} experts but the layer has no expert tensors")


def _plain(entry: str) -> bool:
    return not entry.startswith("re:") and not any(c in entry for c in "*?[")


def _matcher(spec: FormatSpec, entry: str, substring: bool):
    """``module -> bool`` for one exclude entry: ``re:`` a regular expression (from the start), else the exact
    name, or (ModelOpt format) an fnmatch pattern; with ``substring``, ModelOpt's plain entries also match
    inside a name (as vLLM's ModelOpt loader does). Built once per entry: the checks below ask every module."""
    if entry.startswith("re:"):
        return re.compile(entry[3:]).match
    if spec.format != "modelopt":
        return entry.__eq__
    if _plain(entry):   # fnmatch of a pattern without wildcards is equality, which a substring match includes
        return (lambda module: entry in module) if substring else entry.__eq__
    pattern = re.compile(fnmatch.translate(entry))
    return (lambda module: entry in module or pattern.match(module) is not None) if substring else pattern.match


def check_exclude_list(spec: FormatSpec, inv: Inventory, result: VerifyResult, tied_lm_head: bool = False) -> None:
    """The exclude/ignore list names exactly the unquantized linears (and never a quantized one). An entry that
    names no tensor is a warning, except the lm_head of a model with tied word embeddings (never stored)."""
    exact = [_matcher(spec, e, substring=False) for e in spec.exclude]
    for module in inv.unquantized_linear:
        if not any(m(module) for m in exact):
            result.fail("exclude_list", module, "unquantized linear not in the exclude/ignore list: engines would "
                        "build a quantized layer for it and fail to load its weight")
    loose = [(e, _matcher(spec, e, substring=True)) for e in spec.exclude]
    for module in inv.quantized:
        hit = [e for e, m in loose if m(module)]
        if hit:
            result.fail("exclude_list", module, f"quantized but matched by exclude entries {hit} (vLLM ModelOpt also "
                        "matches substrings): it would be loaded as unquantized")
    for entry in spec.exclude:
        if _plain(entry) and entry not in inv.modules and not (tied_lm_head and entry.rsplit(".", 1)[-1] == "lm_head"):
            result.warnings.append(f"exclude entry {entry!r} names no tensor of the checkpoint")


def check_kv(ckpt: Checkpoint, spec: FormatSpec, inv: Inventory, result: VerifyResult) -> None:
    """KV scales: right names for the format, finite and > 0, for every attention layer or for none."""
    attentions = sorted({m["attn"] for n in ckpt.tensors if (m := re.match(r"^(?P<attn>.*\.self_attn)\.", n))})
    result.stats["kv_scales"] = len(inv.kv)
    if inv.kv and not spec.kv:
        result.fail("kv_scales", sorted(inv.kv)[0], "KV scales present but the config declares no KV quantization")
    if spec.kv and not inv.kv:
        result.warnings.append("FP8 KV cache declared without scales: loaders use 1.0 (fine for 'fp8-cast')")
    want = {"modelopt": (".k_proj.k_scale", ".v_proj.v_scale"), "compressed-tensors": (".k_scale", ".v_scale")}
    for attention, kv in sorted(inv.kv.items()):
        for kind, suffix in zip("kv", want[spec.format], strict=True):
            name = kv.get(kind)
            if name is None or name != attention + suffix:
                result.fail("kv_scales", attention + suffix, f"missing or misnamed (found {name})")
                continue
            x = ckpt.get(name).to(torch.float32)
            if not bool((torch.isfinite(x) & (x > 0)).all()):
                result.fail("scale_positive", name, f"KV scale {x.tolist()} is not finite and > 0")
    missing = [a for a in attentions if a not in inv.kv]
    if inv.kv and missing:
        result.fail("kv_scales", missing[0], f"{len(missing)} attention layer(s) without KV scales while others "
                    "have them; engines then mix calibrated and 1.0 scales")
