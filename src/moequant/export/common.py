"""What both formats share: exportability checks, unquantized tensors, excluded names, weight codes.

Codes are not computed here: the state carries them (``TensorScales.codes``, computed in the weight step where
the weight was searched); export slices them per on-disk tensor and writes them. No scale is re-derived and
nothing is quantized at export. Names come from the plan's on-disk
slices (transformers' own save-time conversion), so experts are written per expert under their hub names
(``...experts.{e}.gate_proj``, Mixtral ``...block_sparse_moe.experts.{e}.w1``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from moequant.export.writer import ExportError, TensorSpec, natural_key
from moequant.formats.nvfp4 import BLOCK_SIZE
from moequant.models.disk_names import disk_slices, revert_weight_conversion
from moequant.plan import Plan, Target
from moequant.scales import QuantState, Record

FUSED_ON_DISK_REFUSAL = (
    "{key}: this family keeps all experts of a layer in one fused tensor on disk (GPT-OSS: [E, H, 2I], gate/up "
    "interleaved). vLLM's gpt_oss.py has no NVFP4 path; the only NVFP4 GPT-OSS layout an engine reads (ModelOpt's "
    "fused 'gate_up_proj' uint8 [E, H/2, 2I] + 'gate_up_proj_weight_scale' + one 'gate_up_proj_weight_scale_2', "
    "SGLang make_expert_params_mapping_fused_nvfp4) is known from source code only, was never load-tested here, "
    "and shares one global scale across experts where moequant calibrates one per expert. moequant refuses to "
    "write a checkpoint it cannot prove loadable. Leave the experts unquantized (recipe exclude, e.g. "
    "'*.mlp.experts'; attention is then quantized and experts kept as on disk); see "
    "docs/checkpoint-formats.md section 3.1"
)


def module_name(disk_weight_name: str) -> str:
    """``model.layers.0.mlp.experts.3.up_proj.weight`` -> ``model.layers.0.mlp.experts.3.up_proj``."""
    if not disk_weight_name.endswith(".weight"):
        raise ExportError(f"{disk_weight_name}: quantized on-disk tensors must be named '<module>.weight'")
    return disk_weight_name[: -len(".weight")]


def _check_target_layout(target: Target) -> None:
    if target.kind == "experts" and (target.transposed or any(s.expert is None for s in target.slices)):
        raise ExportError(FUSED_ON_DISK_REFUSAL.format(key=target.key))
    for s in target.slices:
        module_name(s.name)


@contextmanager
def _one_thread():
    """torch's intra-op threads set to 1 meanwhile (process-wide, restored in ``finally``): thousands of small
    scale checks, each a parallel region that waits milliseconds whenever the other core is busy (measured
    on a loaded 2-core machine: 38 s for this export's checks with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_finite_positive(name: str, what: str, x: torch.Tensor | None) -> None:
    if x is None:
        return
    xf = x.to(torch.float32)
    if not bool(torch.isfinite(xf).all()) or not bool((xf > 0).all()):
        raise ExportError(
            f"{name}: {what} has a zero, negative, NaN or inf value ({xf.flatten()[:4].tolist()}...); "
            "engines divide by it: recalibrate this tensor"
        )


def scheme_of(state: QuantState) -> str:
    """The one scheme of every target ("nvfp4" or "fp8"); mixed precision is refused with the fix."""
    schemes = {s.scheme for s in state.tensors.values()}
    if len(schemes) != 1:
        raise ExportError(
            f"targets use several schemes {sorted(schemes)}; mixed-precision export is not supported yet: "
            "quantize with one scheme (exclude the others in the recipe)"
        )
    return schemes.pop()


def input_scales_present(state: QuantState) -> bool:
    """True when every target has input scales, False when none has; a mix is an error naming a tensor."""
    have = {k: v.input_scale is not None for k, v in state.tensors.items()}
    if all(have.values()):
        return True
    if not any(have.values()):
        return False
    missing = sorted(k for k, v in have.items() if not v)
    raise ExportError(
        f"{missing[0]} (and {len(missing) - 1} more) have no input_scale while other targets have one; "
        "run activation calibration on the whole plan (moequant.calibrate) before exporting"
    )


def _all_finite_positive(x: torch.Tensor | None) -> bool:
    if x is None:
        return True
    if x.dtype == torch.float8_e4m3fn:  # finite, > 0 <=> bits 0x01..0x7E (0x7F is NaN, 0x80.. negative or -0)
        if not x.numel():
            return True
        low, high = torch.aminmax(x.view(torch.uint8))   # one pass, no temporaries: 10x the masked .all()
        return int(low) >= 1 and int(high) <= 0x7E
    xf = x.to(torch.float32)
    return bool((torch.isfinite(xf) & (xf > 0)).all())


def check_exportable(state: QuantState) -> None:
    """Raise ``ExportError`` naming the tensor for anything the formats cannot represent."""
    for target in state.plan.targets:
        if target.key not in state.tensors:
            raise ExportError(f"{target.key}: in the plan but not calibrated; run calibrate_weights on this plan")
        if state.tensors[target.key].codes is None:
            raise ExportError(f"{target.key}: calibrated scales without codes (a state built by hand, or one whose "
                              "codes were dropped); run calibrate_weights on this plan")
        _check_target_layout(target)
    with _one_thread():
        # one pass over each target's whole scale tensors; only a failure walks its on-disk records to name one
        bad = {key for key, s in state.tensors.items()
               if not all(_all_finite_positive(x) for x in (s.global_scale, s.block_scale, s.input_scale))}
        for name, rec in state.records().items():
            if rec.target in bad:
                _check_finite_positive(name, "global scale", rec.global_scale)
                _check_finite_positive(name, "block scale", rec.block_scale)
                _check_finite_positive(name, "input scale", rec.input_scale)
        for path, kv in state.kv_cache.items():
            _check_finite_positive(path, "k_scale", kv.k_scale)
            _check_finite_positive(path, "v_scale", kv.v_scale)
    if state.kv_cache and state.kv_scheme is None:
        raise ExportError("state.kv_cache has scales but state.kv_scheme is None; set kv_scheme='fp8'")
    scheme_of(state)
    input_scales_present(state)


def weight_codes(rec: Record) -> torch.Tensor:
    """What one on-disk quantized weight stores (a view of the state's codes): NVFP4 packed codes uint8
    ``[rows, K/2]`` (low nibble = even element), FP8 float8_e4m3fn ``[rows, K]``."""
    if rec.codes is None:
        raise ExportError(f"{rec.name}: the state holds no codes for this tensor (a state built without "
                          "calibrate_weights, or one whose codes were dropped); recalibrate it")
    return rec.codes


def packed_shape(target: Target, rec: Record) -> tuple[int, int]:
    start, stop, step = rec.rows
    return len(range(start, stop, step)), target.shape[-1] // 2


def weight_rows(target: Target, rec: Record) -> int:
    start, stop, step = rec.rows
    return len(range(start, stop, step))


def block_cols(target: Target) -> int:
    return target.shape[-1] // BLOCK_SIZE


def unquantized_tensors(model: nn.Module, plan: Plan, prefix: str = "",
                        exclude_prefix: str | None = None, replaced=None) -> dict[str, torch.Tensor]:
    """On-disk name -> tensor of everything ``save_pretrained`` would write that is not a quantized target,
    original dtype and name: only in-memory tensors under ``prefix`` and not under ``exclude_prefix`` (the
    streamed run holds one decoder layer at a time; the others are on the meta device). ``replaced``:
    parameter name -> the tensor to write instead of the model's (smoothing's changed norms and routers)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    targets = {t.key for t in plan.targets}
    sd = {k: v for k, v in model.state_dict().items() if k not in targets and k.startswith(prefix)
          and not (exclude_prefix and k.startswith(exclude_prefix))}
    for name, tensor in (replaced or {}).items():
        if name.startswith(prefix) and not (exclude_prefix and name.startswith(exclude_prefix)):
            if name not in sd:
                raise ExportError(f"{name}: a smoothed tensor that is not an unquantized tensor of the model; "
                                  "exporter bug")
            sd[name] = tensor
    sd = remove_tied_weights_from_state_dict(sd, model)
    reverted = revert_weight_conversion(model, sd)
    quantized = {s.name for t in plan.targets for s in t.slices}
    clash = sorted(set(reverted) & quantized)
    if clash:
        raise ExportError(f"{clash[0]}: both a quantized slice and an unquantized tensor; exporter bug")
    return dict(reverted)


def _container_names(model: nn.Module, path: str) -> tuple[str, list[str]]:
    """(hub name of an excluded experts container, hub names of its per-expert modules; [] if fused on disk)."""
    from moequant.discover import text_config
    from moequant.models.experts import find_experts

    found = [c for c in find_experts(model, int(text_config(model).hidden_size)) if c.path == path]
    if not found:
        raise ExportError(f"{path}: excluded module is neither a linear nor an experts container; fix the recipe")
    c = found[0]
    params = {f"{path}.{p}": (tuple(getattr(c.module, p).shape), c.layout.transposed, c.num_experts)
              for p in (c.layout.gate_up, c.layout.down)}
    entries = [e for v in disk_slices(model, params).values() for e in v]
    if any(expert is None for _, expert, _ in entries):  # fused on disk (GPT-OSS): one tensor per projection
        return entries[0][0].rpartition(".")[0], []
    modules = sorted({module_name(name) for name, _, _ in entries}, key=natural_key)
    return modules[0].rsplit(".", 2)[0], modules


def excluded_modules(model: nn.Module, state: QuantState, fmt: str) -> list[str]:
    """Exclude/ignore entries (hub names) for the plan's unquantized modules.

    Linears by full name (Mixtral's router is ``model.layers.0.block_sparse_moe.gate`` on disk, not
    transformers' in-memory ``model.layers.0.mlp.gate``). An excluded experts container: ModelOpt gets the
    prefix wildcard ``<container>*`` (what ModelOpt writes; vLLM ``apply_vllm_mapper`` expands it to the
    FusedMoE prefix and its children), compressed-tensors every per-expert module by its on-disk name; where
    those differ from the ``<container>.0.gate_proj`` / ``up_proj`` / ``down_proj`` that vLLM's ``get_moe_method``
    probes against the ignore list (Mixtral's ``w1/w3/w2``), ``compressed_tensors._engine_ignore`` adds the
    probed names too.
    """
    params, entries = {}, []
    for path in state.plan.excluded:
        weight = getattr(model.get_submodule(path), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            params[f"{path}.weight"] = (tuple(weight.shape), False, None)
            continue
        container, modules = _container_names(model, path)
        if fmt == "modelopt":
            entries.append(container + "*")
        else:
            entries += modules or [container]
    if params:
        names = disk_slices(model, params)
        entries += [module_name(e[0]) for v in names.values() for e in v]
    return sorted(set(entries), key=natural_key)


def kv_paths(state: QuantState) -> list[str]:
    return sorted(state.kv_cache)


def scalar_spec(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> TensorSpec:
    """A float32 scalar written 0-d (``shape=()``, ModelOpt) or ``[1]`` (compressed-tensors)."""
    return TensorSpec(name, shape, torch.float32, lambda v=value: v.to(torch.float32).reshape(shape))
