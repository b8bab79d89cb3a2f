"""Activation calibration: read-only observers, full expert coverage, input scales and KV-cache scales.

Observation never changes the model or its outputs. Forward pre-hooks on each quantized ``nn.Linear`` and on
each fused-experts container record statistics; a stand-in KV cache given to each decoder layer (through a
pre-hook on the layer's ``cache`` argument) records what attention would store; all hooks are removed in
``finally``. No class is swapped and the experts implementation the user selected (eager, grouped_mm,
batched_mm: ``config._experts_implementation``) is left alone. The container is called with
``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``; for expert ``e`` and its routed tokens
``R_e``:
    gate_up input amax = max |hidden_states[R_e]|
    down input amax    = max |_apply_gate(hidden_states[R_e] @ W_gate_up[e]^T + b_gate_up[e])|
    tokens[e]          = |R_e| (routed (token, expert) pairs)
(``_apply_gate`` is the container's own gating: act(gate) * up, or GPT-OSS's clamped interleaved variant.)
The down input amax is read from the forward itself where the implementation gates every routed pair in one
``_apply_gate`` call in a known row order (grouped_mm, batched_mm): for that one forward the instance's
``_apply_gate`` is wrapped by one that passes its output through and reduces it per expert
(``expert_amax.GateCapture``). Elsewhere (eager, non-gated, or a call that does not look as expected) it is
a side computation from the container's own weights (``routed_gated_amax``), which costs a second gate_up.
The wrapper is the one exception to "no patching" (DESIGN.md principle 3): an instance attribute for one
forward, set by the container's pre-hook and removed by its post-hook or, if the forward fails, with the hooks
(``_ExpertsObserver.remove``); the class and the user's model are as they were afterwards (tests/test_calibrate.py).

Dead-expert policies (an expert with ``tokens < min_tokens`` is under-covered):
  coverage  (default) gate_up amax = amax of all the layer's hidden states (the input every expert would
            see; no expert compute); down amax = a targeted extra pass of only the under-covered experts
            over every calibration token of the layer (cost: under-covered experts x tokens).
  route_all every expert observes every token (cost: all experts x tokens, E / top_k times the routed pass).
  routed    routed tokens only; an expert with none takes the max over its layer's observed experts.
Under ``coverage`` an under-covered expert gets exactly the scale ``route_all`` gives it (same function, same
tokens, same order).

Layer floor (``calibration.input_floor: layer``; opt-in, the default ``none`` leaves the policies' values),
applied to every expert after the policy above: an expert's routed tokens are a sample of what it will see,
and the rare tokens with massive activations (a few per sequence) reach only the experts they happened to be
routed to, so an expert's own amax can miss them by orders of magnitude. Any token can be routed to any expert,
so
  gate_up amax[e] = max(own, amax of all the layer's hidden states)   (the router's input; = route_all's value)
  down amax[e]    = max(own, max over the layer's experts of their down amax)
The report lists, per layer, the experts the floor raised and by how much. Under torch.distributed the floor is
a max of values that are then MAX-reduced across ranks, so the result equals one process's. Measured
(docs/quality.md, "Input scales of experts"): it removes the clipping (335x -> 1.5x on the built-in MoE) but the
coarser scales cost precision: W4A4 perplexity -0.2 (within noise) at 16 x 256 calibration tokens with mse,
+0.5 at 64 x 512 with weighted_mse; hence not the default.

Input scales: NVFP4 (W4A4) ``amax / (6 * 448)`` (``formats.nvfp4.global_scale_from_amax``), FP8 ``amax / 448``
(``formats.fp8.fp8_tensor_scale``); a group of linears reading one tensor (q/k/v, ...) shares the max.
KV-cache observation and scales: ``moequant.kv_cache``.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from moequant.channel_stats import ChannelStats, observe_experts, observe_gated, observe_linear
from moequant.errors import MoequantError
from moequant.expert_amax import (GateCapture, abs_max, check_gating, gate_rows, gated_amax_many,
                                  routed_gated_amax)
from moequant.formats.fp8 import fp8_tensor_scale
from moequant.formats.nvfp4 import global_scale_from_amax
from moequant.kv_cache import attach_kv_observers
from moequant.models.experts import ExpertsContainer, UnsupportedModelError
from moequant.plan import Plan

POLICIES = ("coverage", "route_all", "routed")


class CalibrationError(MoequantError, RuntimeError):
    """Calibration could not produce a scale; the message names the module and says what to do."""


@dataclass
class ExpertsObservation:
    """Running statistics of one fused-experts container (one MoE layer). While observing, the tensors live on
    the device of the container's input (a hook never waits for the device); ``settle`` moves them to the CPU."""

    path: str
    num_experts: int
    want_down: bool
    tokens: torch.Tensor          # int64 [E] routed (token, expert) pairs
    gate_up_amax: torch.Tensor    # f32 [E] over routed tokens (route_all: over every token)
    down_amax: torch.Tensor       # f32 [E]
    hidden_amax: torch.Tensor     # f32 0-d over every token the container received
    total_tokens: int = 0
    stored: list = field(default_factory=list)   # container inputs [T, H] kept for the coverage pass
    evals: int = 0                # expert x token gate_up evaluations done for observation (main pass)
    seconds: float = 0.0
    intervals: list = field(default_factory=list)   # (start, end) CUDA events of hooks not yet added up

    def settle(self) -> None:
        """Running statistics to the CPU, CUDA-timed hook intervals into ``seconds`` (one wait, not per hook)."""
        self.tokens, self.gate_up_amax, self.down_amax, self.hidden_amax = (
            t.cpu() for t in (self.tokens, self.gate_up_amax, self.down_amax, self.hidden_amax))
        for start, end in self.intervals:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0
        self.intervals.clear()

    @classmethod
    def empty(cls, path: str, num_experts: int, want_down: bool) -> "ExpertsObservation":
        zeros = torch.zeros(num_experts, dtype=torch.float32)
        return cls(path, num_experts, want_down, torch.zeros(num_experts, dtype=torch.int64), zeros.clone(),
                   zeros.clone(), torch.zeros((), dtype=torch.float32))


@dataclass
class ActivationStats:
    """Everything the observers saw, keyed by target key, container path, or attention path."""

    linear_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: dict[str, ExpertsObservation] = field(default_factory=dict)
    kv_amax: dict[str, list[torch.Tensor]] = field(default_factory=dict)   # [k amax, v amax]
    channels: ChannelStats | None = None   # per-channel mean squares, only when weighted_mse asks for them

    def settle(self) -> None:
        """Move what the hooks accumulated on the device to the CPU (``observing`` calls it on exit)."""
        self.linear_amax = {k: v.cpu() for k, v in self.linear_amax.items()}
        self.kv_amax = {k: [a.cpu() for a in v] for k, v in self.kv_amax.items()}
        for obs in self.experts.values():
            obs.settle()


@dataclass(frozen=True)
class ExpertsCoverage:
    """How one MoE layer was covered (for the report)."""

    path: str
    policy: str
    min_tokens: int
    tokens: tuple[int, ...]                      # routed tokens per expert
    total_tokens: int                            # tokens the layer's container received
    under_covered: tuple[tuple[int, int, str], ...]   # (expert, routed tokens, what it got)
    main_evals: int                              # expert x token evaluations in the observed forward
    extra_evals: int                             # ... in the targeted coverage pass
    main_seconds: float
    extra_seconds: float
    floor: str = "none"                          # calibration.input_floor
    floored: tuple[tuple[str, int, float, float], ...] = ()   # (projection, expert, own amax, floor amax)


def _running_max(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """max(old, new) on new's device: no copy to the host, so no wait for the device, per call."""
    new = new.detach().float()
    return torch.maximum(old.to(new.device), new)


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _mark(x: torch.Tensor):
    """A timestamp that does not wait for the device: a recorded CUDA event on a GPU, the clock on a CPU."""
    if not x.is_cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(x.device))
    return event


def _routing(c: ExpertsContainer, signature: inspect.Signature, args, kwargs):
    """(hidden_states [T, H], top_k_index [T, k]) of one container call, by the forward's own signature."""
    values = list(signature.bind(*args, **kwargs).arguments.values())
    if len(values) < 3:
        raise UnsupportedModelError(
            f"{c.path} ({type(c.module).__name__}) is not called with (hidden_states, top_k_index, "
            "top_k_weights), so its routing cannot be observed; open an issue with the model's config.json")
    x = values[0].reshape(-1, values[0].shape[-1])
    return x, values[1].reshape(x.shape[0], -1)


def _observe_routed(obs: ExpertsObservation, c: ExpertsContainer, x: torch.Tensor, index: torch.Tensor,
                    module: nn.Module | None = None):
    """Routed statistics of one container call. The down_proj input amax is read from the forward about to run
    (a ``GateCapture``, returned: the caller closes it after the forward) where the experts implementation's
    gating order is known, else computed beside it now (returns None)."""
    e_count, top_k = obs.num_experts, index.shape[1]
    expert = index.reshape(-1)
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_k)
    valid = (expert >= 0) & (expert < e_count)          # expert-parallel sentinels are not experts
    expert = torch.where(valid, expert, e_count)        # ... they go to an extra bin, dropped (no host sync)
    counts = torch.bincount(expert, minlength=e_count + 1)[:e_count]
    row_amax = x.detach().abs().amax(dim=-1).float()    # [T]
    gate_up = torch.zeros(e_count + 1, device=x.device).scatter_reduce(0, expert, row_amax[token], "amax")
    obs.tokens = obs.tokens.to(counts.device) + counts
    obs.gate_up_amax = _running_max(obs.gate_up_amax, gate_up[:e_count])
    if not obs.want_down:
        return None
    rows = gate_rows(c, index)
    if rows is None:
        obs.down_amax = _running_max(obs.down_amax, routed_gated_amax(c, x, token, expert, counts))
        return None
    return GateCapture(c, rows, module), (x, token, expert, counts, index)


def _observe_all(obs: ExpertsObservation, c: ExpertsContainer, x: torch.Tensor) -> None:
    obs.gate_up_amax = _running_max(obs.gate_up_amax, abs_max(x).expand(obs.num_experts))
    if obs.want_down:
        obs.down_amax = _running_max(obs.down_amax, gated_amax_many(c, x, list(range(obs.num_experts))))
        obs.evals += obs.num_experts * x.shape[0]


class _ExpertsObserver:
    """A fused-experts container's hooks: statistics before its forward; after it, the down_proj input amax
    the forward's own gating showed (or, where it could not be read, the side computation). ``remove`` also
    takes away a capture a failed forward left installed."""

    def __init__(self, module: nn.Module, obs: ExpertsObservation, c: ExpertsContainer, policy: str,
                 channels: ChannelStats | None):
        self.module, self.obs, self.c, self.policy, self.channels = module, obs, c, policy, channels
        self.signature = inspect.signature(c.module.forward)
        self.pending = None
        self.handles = [module.register_forward_pre_hook(self.before, with_kwargs=True),
                        module.register_forward_hook(self.after)]

    def before(self, _module, args, kwargs):
        obs, c = self.obs, self.c
        x, index = _routing(c, self.signature, args, kwargs)
        with torch.no_grad():
            start = _mark(x)
            obs.hidden_amax = _running_max(obs.hidden_amax, abs_max(x))
            obs.total_tokens += x.shape[0]
            if self.policy == "route_all":
                counts = torch.bincount(index[(index >= 0) & (index < obs.num_experts)], minlength=obs.num_experts)
                obs.tokens = obs.tokens.to(counts.device) + counts
                _observe_all(obs, c, x)
            else:
                self.pending = _observe_routed(obs, c, x, index, self.module)
            if self.channels is not None:
                captured = self.pending is not None
                if captured:
                    self.pending[0].keep = obs.want_down   # the down inputs' sums from the forward's own gating
                observe_experts(self.channels, c, x, None if self.policy == "route_all" else index,
                                obs.want_down and not captured)
            if self.policy == "coverage" and obs.want_down:
                obs.stored.append(x.detach().clone())
            self._account(x, start)

    def after(self, _module, _args, _output):
        if self.pending is None:
            return
        (capture, (x, token, expert, counts, index)), self.pending = self.pending, None
        with torch.no_grad():
            start = _mark(x)
            amax = capture.close()
            if amax is None:   # the forward did not gate once, one row per routed pair: compute it beside
                amax = routed_gated_amax(self.c, x, token, expert, counts)
            self.obs.down_amax = _running_max(self.obs.down_amax, amax)
            if self.channels is not None and capture.keep:
                if capture.gated is not None:
                    observe_gated(self.channels, self.c, capture.gated, capture.rows)
                else:
                    observe_experts(self.channels, self.c, x, index, True, inputs=False)
            capture.gated = None
            self._account(x, start)

    def _account(self, x: torch.Tensor, start) -> None:
        end = _mark(x)
        if x.is_cuda:
            self.obs.intervals.append((start, end))
        else:
            self.obs.seconds += end - start

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self.pending is not None:
            self.pending[0].close()
            self.pending = None


FLOORS = ("layer", "none")


def finish_experts(obs: ExpertsObservation, c: ExpertsContainer, policy: str, min_tokens: int, floor: str = "none"):
    """Per-expert (gate_up amax [E], down amax [E]) after the dead-expert policy and the layer floor (module
    docstring), and the coverage record.

    Frees the stored inputs. Raises if the container received no token at all.
    """
    if floor not in FLOORS:
        raise ValueError(f"unknown input floor {floor!r}; expected one of {FLOORS}")
    obs.settle()
    if obs.total_tokens == 0:
        raise CalibrationError(f"{obs.path}: the experts container received no calibration token; check that "
                               "the model's forward reaches it")
    if policy != "route_all" and obs.want_down:
        obs.evals = int(obs.tokens.sum())   # the routed pass evaluates each routed (token, expert) pair once
    gate_up, down = obs.gate_up_amax.clone(), obs.down_amax.clone()
    tokens = obs.tokens.tolist()
    under = [e for e, n in enumerate(tokens) if n < min_tokens]
    extra_evals, extra_seconds, got = 0, 0.0, {}
    if policy == "coverage" and under:
        gate_up[under] = obs.hidden_amax
        if obs.want_down:
            extra_evals, extra_seconds = _targeted_pass(obs, c, under, down)
        for e in under:
            got[e] = f"coverage: gate_up from the layer's hidden states, down from a targeted pass over " \
                     f"{obs.total_tokens} tokens"
    elif policy == "routed":
        observed = obs.tokens > 0
        for e in under:
            if tokens[e] == 0:
                gate_up[e], down[e] = gate_up[observed].max(), down[observed].max()
                got[e] = "routed: no routed token, took the max over the layer's observed experts"
            else:
                got[e] = f"routed: own amax from {tokens[e]} routed token(s)"
    else:
        got = {e: f"{policy}: observed all {obs.total_tokens} tokens" for e in under}
    obs.stored.clear()
    floored = layer_floor(gate_up, down, obs.hidden_amax, obs.want_down) if floor == "layer" else ()
    record = ExpertsCoverage(obs.path, policy, min_tokens, tuple(tokens), obs.total_tokens,
                             tuple((e, tokens[e], got[e]) for e in under), obs.evals, extra_evals,
                             obs.seconds, extra_seconds, floor, floored)
    return gate_up, down, record


def layer_floor(gate_up: torch.Tensor, down: torch.Tensor, hidden_amax: torch.Tensor, want_down: bool):
    """The layer floor of the module docstring, in place on ``gate_up [E]`` and ``down [E]``; returns
    (projection, expert, own amax, floor amax) for every expert it raised."""
    raised = []
    for name, amax, floor in (("gate_up", gate_up, hidden_amax), ("down", down, down.max() if want_down else None)):
        if floor is None:
            continue
        raised += [(name, e, float(amax[e]), float(floor)) for e in (amax < floor).nonzero().flatten().tolist()]
        amax.copy_(torch.maximum(amax, floor))
    return tuple(raised)


def _targeted_pass(obs: ExpertsObservation, c: ExpertsContainer, under: list[int], down: torch.Tensor):
    """Run only the under-covered experts, for observation, on every stored token; fills ``down``."""
    start, evals = time.perf_counter(), 0
    amax = torch.zeros(len(under), dtype=torch.float32)
    with torch.no_grad():
        for x in obs.stored:
            amax = _running_max(amax, gated_amax_many(c, x, under))
            evals += x.shape[0] * len(under)
        if obs.stored:
            _sync(obs.stored[0])
    down[under] = amax.cpu()
    return evals, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ observers


def _linear_hook(stats: ActivationStats, key: str):
    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        with torch.no_grad():
            amax = abs_max(x)
            if stats.channels is not None:
                observe_linear(stats.channels, key, x)
            stats.linear_amax[key] = _running_max(stats.linear_amax[key], amax) if key in stats.linear_amax \
                else amax

    return hook


@contextmanager
def observing(root: nn.Module, prefix: str, plan: Plan, containers: dict[str, ExpertsContainer],
              stats: ActivationStats, *, policy: str, activations: bool,
              kv_layers: list[tuple[str, nn.Module]] = ()):
    """Attach observers to the targets of ``plan`` inside ``root`` (whose full path is ``prefix``) while the
    block runs; ``kv_layers``: (path, decoder layer) pairs whose KV cache is observed. Hooks are removed on
    exit, whatever happens. ``stats`` accumulates across calls."""
    if policy not in POLICIES:
        raise ValueError(f"unknown dead-experts policy {policy!r}; expected one of {POLICIES}")
    handles = []
    try:
        if activations:
            handles += _attach_targets(root, prefix, plan, containers, stats, policy)
        handles += attach_kv_observers(list(kv_layers), stats.kv_amax)
        yield stats
    finally:
        for h in handles:
            h.remove()
        stats.settle()


def _attach_targets(root, prefix, plan, containers, stats, policy) -> list:
    by_path: dict[str, list] = {}
    for t in plan.targets:
        by_path.setdefault(t.module_path, []).append(t)
    handles = []
    for rel, module in root.named_modules():
        path = f"{prefix}.{rel}" if prefix and rel else (prefix or rel)
        for t in by_path.get(path, []):
            if t.kind == "linear":
                handles.append(module.register_forward_pre_hook(_linear_hook(stats, t.key), with_kwargs=True))
        if path in containers and path in by_path:
            c = containers[path]
            want_down = any(t.param_name == c.layout.down for t in by_path[path])
            if want_down:
                check_gating(c)
            stats.experts.setdefault(path, ExpertsObservation.empty(path, c.num_experts, want_down))
            handles.append(_ExpertsObserver(module, stats.experts[path], c, policy, stats.channels))
    return handles


# ------------------------------------------------------------------------------------------ scales


def input_scale(amax: torch.Tensor, scheme: str) -> torch.Tensor:
    """Activation scale from an amax: NVFP4 ``amax / 2688`` (the global input scale), FP8 ``amax / 448``."""
    if scheme == "nvfp4":
        return global_scale_from_amax(amax)
    if scheme == "fp8":
        return fp8_tensor_scale(amax)
    raise ValueError(f"unknown activation scheme {scheme!r}")


def linear_input_amax(plan: Plan, stats: ActivationStats, keys: list[str]) -> dict[str, torch.Tensor]:
    """amax per linear target key, shared (max) within each weight group; unobserved linears are errors."""
    for key in keys:
        if key not in stats.linear_amax:
            path = plan.target(key).module_path
            raise CalibrationError(
                f"no calibration token reached {path}: it was never called in the forward pass, so it has no "
                f"input scale; exclude it in the recipe (exclude: ['{path}']) or check the model's forward")
    shared: dict[str, torch.Tensor] = {}
    targets = [plan.target(k) for k in keys]
    for t in targets:
        if t.group is not None:
            amax = stats.linear_amax[t.key]
            shared[t.group] = torch.maximum(shared[t.group], amax) if t.group in shared else amax
    return {t.key: shared[t.group] if t.group is not None else stats.linear_amax[t.key] for t in targets}
