"""Build the fake-quantized twin of an exported checkpoint for evaluation (see ``evaluate.py``).

Weights come from the checkpoint through the verifier's independent decoder; activations of quantized
linears are fake-quantized by forward pre-hooks, and each fused-experts container is wrapped by
``FakeQuantExperts``, which runs the experts exactly as the eager transformers path does, with per-expert
activation fake-quantization at the gate_up and down inputs. All of this happens on a model this module
loads itself, never on a user's model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from moequant.formats.activations import fake_quantize_activation_fp8, fake_quantize_activation_nvfp4
from moequant.input_ranges import InputRange, module_name
from moequant.verify import iter_decoded
from moequant.verify.decode import Checkpoint, CheckpointError
from moequant.verify.report import VerifyResult
from moequant.verify.spec import parse_spec


def load_original(model_dir, device, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def _input_scale(ckpt: Checkpoint, module: str) -> torch.Tensor | None:
    """The shipped static input scale of ``module`` in the ModelOpt convention (act_amax / 2688 or / 448)."""
    if f"{module}.input_scale" in ckpt.tensors:
        return ckpt.get(f"{module}.input_scale").to(torch.float32).reshape(())
    if f"{module}.input_global_scale" in ckpt.tensors:
        return 1.0 / ckpt.get(f"{module}.input_global_scale").to(torch.float32).reshape(())
    return None


def _fake_quant_fn(scheme: str, scale: torch.Tensor | None, names: list[str], ranges: list | None):
    """The input's fake-quantization; with ``ranges``, its held-out amax is recorded first (an ``InputRange``
    appended there, see ``input_ranges``)."""
    if scale is None:
        return lambda x: x
    quant = fake_quantize_activation_nvfp4 if scheme == "nvfp4" else fake_quantize_activation_fp8
    if ranges is None:
        return lambda x: quant(x, scale.to(x.device))
    seen = InputRange(module_name(names), scheme, float(scale))
    ranges.append(seen)

    def fn(x):
        seen.observe(x)
        return quant(x, scale.to(x.device))

    return fn


class FakeQuantExperts(nn.Module):
    """Eager experts forward with per-expert activation fake-quant, wrapping the original container."""

    def __init__(self, experts: nn.Module, gate_up_fq: list, down_fq: list):
        super().__init__()
        self.inner = experts
        self.gate_up_fq, self.down_fq = gate_up_fq, down_fq

    def _project(self, x, name: str, e: int):
        inner = self.inner
        w = getattr(inner, name)[e]
        out = x @ w if getattr(inner, "is_transposed", False) else F.linear(x, w)
        bias = getattr(inner, f"{name}_bias", None)
        return out + bias[e] if isinstance(bias, torch.Tensor) else out

    def forward(self, hidden_states, top_k_index, top_k_weights):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = torch.zeros_like(x)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < len(self.gate_up_fq):
                continue
            token, slot = torch.where(top_k_index == e)
            h = self._project(self.gate_up_fq[e](x[token]), "gate_up_proj", e)
            h = self.inner._apply_gate(h)
            h = self._project(self.down_fq[e](h), "down_proj", e)
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
        return out.reshape(shape)


def _spec(checkpoint) -> tuple[Checkpoint, str, bool]:
    ckpt = Checkpoint(checkpoint)
    result = VerifyResult(str(checkpoint))
    spec = parse_spec(ckpt, result)
    if spec is None:
        raise CheckpointError(f"{checkpoint}: not a moequant-readable checkpoint: {result.summary()}")
    return ckpt, spec.default_scheme, spec.static_inputs


@torch.no_grad()
def load_fake_quantized(model_dir, checkpoint, device, trust_remote_code: bool = False,
                        *, activations: bool = True, ranges: list | None = None) -> nn.Module:
    """The original model with the checkpoint's decoded weights and engine-like activation fake-quant.
    ``activations=False``: weights only, whatever input scales the checkpoint ships (how vLLM runs an NVFP4
    checkpoint on Hopper: Marlin W4A16 ignores them; ``bench/engine_check.py``). ``ranges``: a list that
    receives an ``input_ranges.InputRange`` per quantized input (linear, and expert projection), filled as
    the model runs."""
    from moequant.discover import discover
    from moequant.weights import canonical_weight

    model = load_original(model_dir, "cpu", trust_remote_code)
    plan = discover(model)
    ckpt, scheme, static_inputs = _spec(checkpoint)
    _load_unquantized(model, plan, checkpoint)
    where = {s.name.removesuffix(".weight"): (t, s) for t in plan.targets for s in t.slices}
    seen = set()
    for module, decoded in iter_decoded(checkpoint):
        if module not in where:
            raise CheckpointError(f"{checkpoint}: quantized tensor {module} has no counterpart in {model_dir}")
        target, s = where[module]
        view = canonical_weight(model, target)
        view = view[s.expert] if s.expert is not None else view
        start, stop, step = s.rows
        view[start:stop:step].copy_(decoded.to(view.dtype))
        seen.add(module)
    for target in plan.targets:
        names = [s.name.removesuffix(".weight") for s in target.slices]
        if not any(n in seen for n in names):
            continue  # left unquantized by the recipe: original weights
        if not all(n in seen for n in names):
            raise CheckpointError(f"{checkpoint}: {target.key} is only partly present in the checkpoint")
        _attach_activation_quant(model, target, ckpt, scheme if static_inputs and activations else None, ranges)
    return model.to(device).eval()


def _load_unquantized(model: nn.Module, plan, checkpoint) -> None:
    """Every tensor the checkpoint ships unquantized (norms, routers, embeddings, excluded linears) into
    ``model``, by the on-disk names transformers' conversion gives them: a smoothed checkpoint's norms and
    routers differ from the source's on purpose (``moequant.smoothing``), and what is evaluated is what ships."""
    from moequant.layers.meta_model import disk_sources, loadable_keys, read_tensors
    from moequant.safetensors_source import SafetensorsSource

    targets = {t.key for t in plan.targets}
    metas = {k: v for k, v in loadable_keys(model, "").items() if k not in targets}
    sources = disk_sources(model, metas)
    values = read_tensors(SafetensorsSource(checkpoint), {k: (metas[k], sources[k]) for k in metas}, "cpu")
    state = model.state_dict()
    with torch.no_grad():
        for key, value in values.items():
            state[key].copy_(value)


def _attach_activation_quant(model, target, ckpt: Checkpoint, scheme: str | None, ranges: list | None) -> None:
    if scheme is None:
        return
    if target.kind == "linear":
        name = target.slices[0].name.removesuffix(".weight")
        fq = _fake_quant_fn(scheme, _input_scale(ckpt, name), [name], ranges)
        model.get_submodule(target.module_path).register_forward_pre_hook(lambda _m, args: (fq(args[0]),) + args[1:])
        return
    container = model.get_submodule(target.module_path)
    wrapper = container if isinstance(container, FakeQuantExperts) else None
    if wrapper is None:
        e = target.shape[0]
        wrapper = FakeQuantExperts(container, [lambda x: x] * e, [lambda x: x] * e)
        model.set_submodule(target.module_path, wrapper)
    per_expert, names = {}, {}
    for s in target.slices:
        scale = _input_scale(ckpt, s.name.removesuffix(".weight"))
        prev = per_expert.get(s.expert)
        per_expert[s.expert] = scale if prev is None else torch.maximum(prev, scale)
        names.setdefault(s.expert, []).append(s.name.removesuffix(".weight"))
    fns = [_fake_quant_fn(scheme, per_expert.get(e), names.get(e, []), ranges) for e in range(target.shape[0])]
    if target.param_name == "down_proj":
        wrapper.down_fq = fns
    else:
        wrapper.gate_up_fq = fns
