"""Channel smoothing (SmoothQuant) of a decoder layer before W4A4 / W8A8 calibration (recipe key ``smoothing``).

Per input channel ``j`` of a quantized input, ``s_j = amax_x(j)^alpha / amax_w(j)^(1 - alpha)`` (``amax_x``: the
channel's largest |input| over the layer's calibration tokens; ``amax_w``: the largest |weight| of that input
column over the quantized readers), folded exactly into what produces that input, so the layer computes the same
function and ships as an ordinary checkpoint (no runtime op):

    norm site   a normalization module (one 1-D ``weight``, optionally a 1-D ``bias``) whose output quantized
                linears / experts read: norm weight (and bias) / s; the columns of *every* module reading that
                output * s (q/k/v, gate/up, the experts' gate_up, the MoE router, a shared expert's gate, ...)
    down site   a down projection's input ``act(gate) * up`` is linear in ``up``: up rows / s, down columns * s;
                fused experts (gate rows first, no gate_up bias) per expert, over that expert's routed tokens;
                a dense MLP's ``down_proj`` whose sibling ``up_proj`` (or ``w3``) feeds it

Readers are found structurally: one probe forward of the layer records which module's input *is* a norm's
output tensor (same storage). A norm output read by a module that is neither linear-like (a 2-D ``weight``
over its last dimension, no children) nor an experts container is not smoothed (the module could use the
values in a way a column scale does not undo). Experts with fewer than ``calibration.min_tokens`` routed tokens
keep factor 1 on their down site (their statistics are a handful of tokens); channels never seen keep 1.

The fold is checked: the layer's outputs on the first calibration batch, smoothed vs original, must agree
within ``FOLD_TOLERANCE`` (relative, per the layer's dtype); a layer that fails (a reader nobody could see,
e.g. a norm computing ``(1 + weight) * x``) is restored, left unsmoothed and listed in the report.

The step (``layers/step.py``) calls ``smooth_layer`` on the original layer; its outputs on the calibration
batches are the next layer's inputs (so a resumed run's replay of the unsmoothed layer gives the same values);
the smoothed layer is then observed and quantized; ``Folded.restore`` puts the original weights back, so the
model is never left changed. The result carries the factors (``Site``), which the export writes next to the
checkpoint (``export/smoothing_file.py``) for the verifier, and the changed unquantized tensors (norms, routers).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moequant.calibrate import _routing
from moequant.channel_stats import _routed_tokens
from moequant.models.experts import ExpertsContainer

FOLD_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}   # other dtypes (bf16, fp16): DEFAULT_TOLERANCE
DEFAULT_TOLERANCE = 5e-2   # bf16: a router fold flips near-tied top-k choices (2% measured on tiny models)
EPS = 1e-5


@dataclass(frozen=True)
class Scaled:
    """One parameter a site's factor is folded into: along stored dimension ``axis``, elements ``start ..
    start + K``, multiplied (a reader) or divided (the producer) by the factor (``per_expert``: the factor is
    ``[E, K]`` and dimension 0 of the parameter is the expert)."""

    param: str
    axis: int
    divide: bool
    per_expert: bool = False
    start: int = 0


@dataclass(frozen=True)
class Site:
    producer: str           # module path of the norm / of the experts container or MLP whose up rows take 1/s
    kind: str               # "norm" | "down"
    factor: torch.Tensor    # float32 [K] or [E, K], host
    scaled: tuple[Scaled, ...]


@dataclass(frozen=True)
class Smoothing:
    """One decoder layer's smoothing: its sites, the unquantized parameters the fold changed (param name ->
    tensor, host: norms, routers) and what was left unsmoothed (messages for the report)."""

    sites: tuple[Site, ...] = ()
    changed: Mapping[str, torch.Tensor] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- structure


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def _storage_key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.shape[-1], t.dtype


def _is_norm(m: nn.Module) -> bool:
    own = dict(m.named_parameters(recurse=False))
    w = own.get("weight")
    return (w is not None and w.ndim == 1 and not list(m.children())
            and set(own) <= {"weight", "bias"} and (own.get("bias") is None or own["bias"].shape == w.shape))


def _is_linear_like(m: nn.Module, k: int) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == k and not list(m.children())
            and all(p.ndim <= 1 or p is w for p in m.parameters(recurse=False)))


@dataclass
class _Trace:
    """Which module of the layer read / wrote which tensor (by storage) during one forward."""

    inputs: dict[str, tuple] = field(default_factory=dict)    # module path -> storage key of its input
    outputs: dict[str, tuple] = field(default_factory=dict)   # norm path -> storage key of its output
    alive: list = field(default_factory=list)                 # every recorded tensor, kept so no storage is reused


def trace_layer(layer: nn.Module, path: str, inp) -> _Trace:
    """One forward of ``layer`` on ``inp`` (a ``LayerInput``) with every module's input and every norm's output
    recorded."""
    trace, handles = _Trace(), []

    def pre(name):
        def hook(_m, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is not None:
                trace.inputs.setdefault(name, _storage_key(x))
                trace.alive.append(x)
        return hook

    def post(name):
        def hook(_m, _args, out):
            if isinstance(out, torch.Tensor):
                trace.outputs.setdefault(name, _storage_key(out))
                trace.alive.append(out)
        return hook

    try:
        for name, m in layer.named_modules(prefix=path):
            if m is layer:
                continue
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
            if _is_norm(m):
                handles.append(m.register_forward_hook(post(name)))
        layer(inp.hidden, *inp.args, **inp.kwargs)
    finally:
        for h in handles:
            h.remove()
    trace.alive.clear()
    return trace


@dataclass(frozen=True)
class _NormSite:
    norm: str
    readers: tuple[str, ...]        # linear-like module paths
    experts: tuple[str, ...]        # experts container paths
    quantized: tuple[str, ...]      # readers / containers that are quantized targets (their columns set amax_w)


def norm_sites(layer: nn.Module, path: str, trace: _Trace, quantized: set[str],
               containers: Mapping[str, ExpertsContainer]) -> tuple[list[_NormSite], list[str]]:
    """Norms whose output a quantized module reads, with every reader; and messages for norms left alone."""
    modules = dict(layer.named_modules(prefix=path))
    sites, skipped = [], []
    for norm, key in trace.outputs.items():
        readers = [m for m, k in trace.inputs.items() if k == key and m != norm and not m.startswith(norm + ".")]
        leaves = [m for m in readers if m in containers or not list(modules[m].children())]
        if not any(m in quantized for m in leaves):
            continue
        unquantized_experts = [m for m in leaves if m in containers and m not in quantized]
        if unquantized_experts:
            skipped.append(f"{norm}: its output is also read by the unquantized experts {unquantized_experts[0]}: "
                           "not smoothed")
            continue
        unknown = [m for m in leaves if m not in containers and not _is_linear_like(modules[m], key[1])]
        if unknown:
            skipped.append(f"{norm}: its output is also read by {unknown[0]} ({type(modules[unknown[0]]).__name__}), "
                           "which a column scale cannot be folded into: not smoothed")
            continue
        sites.append(_NormSite(norm, tuple(m for m in leaves if m not in containers),
                               tuple(m for m in leaves if m in containers), tuple(m for m in leaves if m in quantized)))
    return sites, skipped


def _up_sibling(layer_modules: dict, down: str) -> str | None:
    """A dense MLP's up projection feeding ``down`` (a quantized down projection): its sibling ``up_proj`` / ``w3``
    with as many outputs as ``down`` has inputs."""
    parent, _, name = down.rpartition(".")
    if name not in ("down_proj", "w2"):
        return None
    k = layer_modules[down].weight.shape[1]
    for sibling in ("up_proj", "w3"):
        m = layer_modules.get(f"{parent}.{sibling}")
        if isinstance(m, nn.Linear) and m.weight.shape[0] == k:
            return f"{parent}.{sibling}"
    return None


def _foldable_experts(c: ExpertsContainer) -> bool:
    """act(gate) * up with gate rows first and no gate_up bias: linear in the up rows."""
    return (not c.layout.interleaved and c.layout.gate_up_bias is None
            and callable(getattr(c.module, "_apply_gate", None)))


# ------------------------------------------------------------------------------------------- statistics


def _channel_max(store: dict, key, x: torch.Tensor) -> None:
    top = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
    store[key] = torch.maximum(store[key], top) if key in store else top


def _experts_down(store: dict, counts: dict, c: ExpertsContainer, signature):
    """Pre-hook: per expert, the channel amax of its down input ``act(gate) * up`` over its routed tokens."""
    def hook(_m, args, kwargs):
        x, index = _routing(c, signature, args, kwargs)   # [T, H], [T, k]: as the activation observers read them
        w = c.canonical(c.layout.gate_up)                                               # [E, 2I, H]
        amax = store.setdefault(c.path, torch.zeros(c.num_experts, c.intermediate, device=x.device))
        n = counts.setdefault(c.path, torch.zeros(c.num_experts, dtype=torch.int64, device=x.device))
        expert = index.reshape(-1)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
        valid = (expert >= 0) & (expert < c.num_experts)   # expert-parallel sentinels are not experts
        token, expert = token[valid], expert[valid]
        routed = torch.bincount(expert, minlength=c.num_experts)
        n += routed
        for e, rows in _routed_tokens(token, expert, routed):   # one sort, one sync per call
            inner = c.module._apply_gate(F.linear(x[rows], w[e])).detach().abs().amax(0).float()
            amax[e] = torch.maximum(amax[e], inner)
    return hook


def factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``amax_x^alpha / amax_w^(1 - alpha)`` (float32); 1 where the channel saw no input."""
    s = x_amax.clamp_min(EPS).pow(alpha) / w_amax.float().clamp_min(EPS).pow(1 - alpha)
    return torch.where(x_amax > 0, s, torch.ones_like(s))


# ------------------------------------------------------------------------------------------- the fold


def _along(f: torch.Tensor, p: torch.Tensor, s: Scaled) -> torch.Tensor:
    """``f`` shaped to broadcast along ``s.axis`` of ``p`` (and its expert axis)."""
    shape = [1] * p.ndim
    shape[s.axis] = f.shape[-1]
    if s.per_expert:
        shape[0] = f.shape[0]
    return f.reshape(shape)


def apply_scaled(p: torch.Tensor, s: Scaled, factor: torch.Tensor) -> None:
    """Fold ``factor`` into parameter ``p`` in place (computed in float32, stored in ``p``'s dtype)."""
    k = factor.shape[-1]
    part = p.narrow(s.axis, s.start, k)
    f = _along(factor.to(p.device), part, s)
    part.copy_((part.float() / f if s.divide else part.float() * f).to(p.dtype))


class Folded:
    """The original values of every parameter a layer's fold changed, to put back with ``restore``."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.params = params
        self.saved = {n: p.detach().clone() for n, p in params.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.saved[n])
        self.saved = {}


def fold(layer: nn.Module, path: str, sites: list[Site]) -> Folded:
    params = dict(layer.named_parameters(prefix=path))
    touched = Folded({s.param: params[s.param] for site in sites for s in site.scaled})
    with torch.no_grad():
        for site in sites:
            for s in site.scaled:
                apply_scaled(params[s.param], s, site.factor)
    return touched


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    num = float((a.float() - b.float()).norm())
    den = float(b.float().norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def tolerance(dtype: torch.dtype) -> float:
    return FOLD_TOLERANCE.get(dtype, DEFAULT_TOLERANCE)


# ------------------------------------------------------------------------------------------- a layer


@dataclass
class _Stats:
    amax: dict = field(default_factory=dict)     # norm path / down module path / container path -> amax
    tokens: dict = field(default_factory=dict)   # container path -> routed tokens [E]


def observe_sites(layer: nn.Module, path: str, inputs: list, norms: list[_NormSite], downs: list[str],
                  containers: Mapping[str, ExpertsContainer]) -> _Stats:
    """The unsmoothed layer's forward over ``inputs`` (their ``hidden`` replaced by its outputs), recording the
    channel amax of every site's input."""
    stats, handles, modules = _Stats(), [], dict(layer.named_modules(prefix=path))
    try:
        for site in norms:
            handles.append(modules[site.norm].register_forward_hook(
                lambda _m, _a, out, n=site.norm: _channel_max(stats.amax, n, out)))
        for down in downs:
            if down in containers:
                c = containers[down]
                handles.append(c.module.register_forward_pre_hook(
                    _experts_down(stats.amax, stats.tokens, c, inspect.signature(c.module.forward)),
                    with_kwargs=True))
            else:
                handles.append(modules[down].register_forward_pre_hook(
                    lambda _m, a, n=down: _channel_max(stats.amax, n, a[0])))
        for inp in inputs:
            out = layer(inp.hidden, *inp.args, **inp.kwargs)
            inp.hidden = out[0] if isinstance(out, tuple) else out
    finally:
        for h in handles:
            h.remove()
    return stats


def build_sites(layer: nn.Module, path: str, norms: list[_NormSite], downs: list[str], stats: _Stats,
                containers: Mapping[str, ExpertsContainer], alpha: float, min_tokens: int) -> list[Site]:
    params = dict(layer.named_parameters(prefix=path))
    modules = dict(layer.named_modules(prefix=path))
    sites = []
    for ns in norms:
        if ns.norm not in stats.amax:
            continue
        w_amax = torch.stack([_column_amax(modules, containers, m) for m in ns.quantized]).amax(0)
        scaled = [Scaled(f"{ns.norm}.weight", 0, True)]
        if f"{ns.norm}.bias" in params:
            scaled.append(Scaled(f"{ns.norm}.bias", 0, True))
        scaled += [Scaled(f"{m}.weight", 1, False) for m in ns.readers]
        for cpath in ns.experts:
            c = containers[cpath]
            scaled.append(Scaled(f"{cpath}.{c.layout.gate_up}", 1 if c.layout.transposed else 2, False))
        sites.append(Site(ns.norm, "norm", factors(stats.amax[ns.norm].cpu(), w_amax.cpu(), alpha), tuple(scaled)))
    for down in downs:
        if down not in stats.amax:
            continue
        if down in containers:
            c = containers[down]
            w = c.canonical(c.layout.down).detach().abs().amax(1).float().cpu()          # [E, I]
            f = factors(stats.amax[down].cpu(), w, alpha)
            few = stats.tokens[down].cpu() < min_tokens
            f[few] = 1.0
            t = c.layout.transposed
            up = c.gate_up_rows()[1][0]
            sites.append(Site(down, "down", f, (
                Scaled(f"{down}.{c.layout.gate_up}", 2 if t else 1, True, True, up),
                Scaled(f"{down}.{c.layout.down}", 1 if t else 2, False, True))))
        else:
            up = _up_sibling(modules, down)
            f = factors(stats.amax[down].cpu(), modules[down].weight.detach().abs().amax(0).cpu(), alpha)
            scaled = [Scaled(f"{up}.weight", 0, True)]
            if f"{up}.bias" in params:
                scaled.append(Scaled(f"{up}.bias", 0, True))
            sites.append(Site(down, "down", f, (*scaled, Scaled(f"{down}.weight", 1, False))))
    return sites


def _column_amax(modules: dict, containers: Mapping[str, ExpertsContainer], m: str) -> torch.Tensor:
    if m in containers:
        c = containers[m]
        return c.canonical(c.layout.gate_up).detach().abs().amax(1).amax(0).float()     # [H]
    return modules[m].weight.detach().abs().amax(0).float()


def down_sites(layer: nn.Module, path: str, quantized: set[str],
               containers: Mapping[str, ExpertsContainer]) -> list[str]:
    """Quantized down projections whose input is linear in an up projection: dense MLPs' and fused experts'."""
    modules = dict(layer.named_modules(prefix=path))
    out = []
    for m in sorted(quantized):
        if m in containers:
            if _foldable_experts(containers[m]):
                out.append(m)
        elif m in modules and _up_sibling(modules, m) is not None:
            out.append(m)
    return out


def smooth_layer(layer: nn.Module, path: str, inputs: list, quantized_modules: set[str],
                 containers: Mapping[str, ExpertsContainer], alpha: float, min_tokens: int,
                 reduce: Callable[[dict, dict], None] | None = None,
                 down: bool = True) -> tuple[Smoothing, Folded | None]:
    """Smooth decoder layer ``layer`` (module path ``path``) in place; ``inputs`` (``LayerInput``) get the
    unsmoothed layer's outputs. ``quantized_modules``: module paths of the layer's quantized targets.
    ``reduce(amax, tokens)``: MAX / SUM of the statistics across torchrun ranks, in place. ``down``: also the
    down sites (else the norm sites only). Returns the record
    and the ``Folded`` originals (None when nothing was folded)."""
    if not inputs:
        return Smoothing(), None
    containers = {p: c for p, c in containers.items() if p.startswith(path + ".")}
    trace = trace_layer(layer, path, inputs[0])
    norms, skipped = norm_sites(layer, path, trace, quantized_modules, containers)
    downs = down_sites(layer, path, quantized_modules, containers) if down else []
    first = inputs[0].hidden
    stats = observe_sites(layer, path, inputs, norms, downs, containers)
    if reduce is not None:
        reduce(stats.amax, stats.tokens)
    sites = build_sites(layer, path, norms, downs, stats, containers, alpha, min_tokens)
    if not sites:
        return Smoothing(skipped=tuple(skipped)), None
    folded = fold(layer, path, sites)
    inp = inputs[0]
    out = layer(first, *inp.args, **inp.kwargs)
    out = out[0] if isinstance(out, tuple) else out
    change = relative_change(out, inp.hidden)
    if not change <= tolerance(out.dtype):
        folded.restore()
        return Smoothing(skipped=(*skipped, f"{path}: the fold changed the layer's output by {change:.2e} (relative; "
                                  f"allowed {tolerance(out.dtype):.0e}): a reader moequant could not see; "
                                  "layer not smoothed"),), None
    params = dict(layer.named_parameters(prefix=path))
    quantized_params = {n for n in params if n.rpartition(".")[0] in quantized_modules}
    changed = {s.param: params[s.param].detach().to("cpu", copy=True) for site in sites for s in site.scaled
               if s.param not in quantized_params}
    return Smoothing(tuple(sites), changed, tuple(skipped)), folded
