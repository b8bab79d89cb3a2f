"""Per-input-channel mean squared activations: the channel weights of the "weighted_mse" block-scale search.

Observed by the same read-only hooks as the activation amax (``calibrate``), only when the recipe asks for
them (``weights.method: weighted_mse``). Sums are kept in float64 on the CPU.
  linear target ``[N, K]``:  h[k] = mean over every calibration token of x[k]^2
  experts ``gate_up``:       h[e, k] = mean over the tokens routed to expert e of x[k]^2
  experts ``down``:          h[e, j] = mean over the tokens routed to expert e of its gated input[j]^2
                             (the container's own ``_apply_gate(x @ W_gate_up[e]^T + b)``, side-computed)
Under-covered experts (fewer than ``min_tokens`` routed tokens) fall back to the layer: ``gate_up`` takes the
mean over every token the container received (the input every expert would see), ``down`` takes the mean over
all the layer's routed (token, expert) pairs of their gated inputs (a cheap stand-in for running the expert on
every token; with an upcycled model whose experts permute their neurons this is only an approximation).
Floor: ``h + FLOOR * mean(h)`` per vector (a never-activated channel keeps a small weight, so its block is not
given the smallest scale), and all-zero statistics give ``h = 1`` (the plain MSE search).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moequant.models.experts import ExpertsContainer
from moequant.plan import Plan

FLOOR = 1e-3


@dataclass
class _Sums:
    sq: torch.Tensor      # float64 [K] or [E, K]
    count: torch.Tensor   # int64 [] or [E]
    parts: list | None = None  # under torch.distributed: each call's float64 sum, folded later in batch order

    def add(self, sq: torch.Tensor, count) -> None:
        sq = sq.detach().to(device="cpu", dtype=torch.float64)
        if self.parts is not None:
            self.parts.append(sq)
        else:
            self.sq += sq
        self.count += torch.as_tensor(count).cpu()

    def fold(self, parts: list[torch.Tensor], count: torch.Tensor) -> None:
        """Set the sums from calls given in one process's order: ``((0 + p0) + p1) + ...``, the same float64
        additions one process makes, so the result is bit-identical to it."""
        sq = torch.zeros_like(self.sq)
        for p in parts:
            sq += p
        self.sq, self.count, self.parts = sq, count, None


@dataclass
class ChannelStats:
    linear: dict[str, _Sums] = field(default_factory=dict)        # target key -> [K]
    hidden: dict[str, _Sums] = field(default_factory=dict)        # container path -> [H], every token
    gate_up: dict[str, _Sums] = field(default_factory=dict)       # container path -> [E, H], routed
    down: dict[str, _Sums] = field(default_factory=dict)          # container path -> [E, I], routed
    record_parts: bool = False  # distributed: keep each call's sum (``_Sums.parts``) until the ranks fold them

    def zeros(self, *shape) -> _Sums:
        count = torch.zeros(shape[:-1], dtype=torch.int64)
        return _Sums(torch.zeros(shape, dtype=torch.float64), count, [] if self.record_parts else None)

    def under(self, prefix: str) -> list[tuple[str, str, _Sums]]:
        """(kind, key, sums) of every statistic whose key starts with ``prefix``, in a fixed order."""
        return [(kind, key, sums) for kind in ("linear", "hidden", "gate_up", "down")
                for key, sums in sorted(getattr(self, kind).items()) if key.startswith(prefix)]


def observe_linear(cs: ChannelStats, key: str, x: torch.Tensor) -> None:
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    cs.linear.setdefault(key, cs.zeros(x.shape[-1])).add(x.square().sum(0), x.shape[0])


def observe_experts(cs: ChannelStats, c: ExpertsContainer, x: torch.Tensor, index: torch.Tensor | None,
                    want_down: bool) -> None:
    """Routed pairs of one container call (``index [T, k]``; None: every token to every expert)."""
    e_count, hidden = c.num_experts, x.shape[-1]
    x = x.detach()
    if index is None:
        expert = torch.arange(e_count, device=x.device).repeat_interleave(x.shape[0])
        token = torch.arange(x.shape[0], device=x.device).repeat(e_count)
    else:
        expert = index.reshape(-1)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
        valid = (expert >= 0) & (expert < e_count)
        expert, token = expert[valid], token[valid]
    x64 = x.to(torch.float64)
    cs.hidden.setdefault(c.path, cs.zeros(hidden)).add(x64.square().sum(0), x.shape[0])
    counts = torch.bincount(expert, minlength=e_count)
    sq = torch.zeros(e_count, hidden, dtype=torch.float64, device=x.device).index_add_(0, expert, x64[token].square())
    cs.gate_up.setdefault(c.path, cs.zeros(e_count, hidden)).add(sq, counts)
    if want_down:
        cs.down.setdefault(c.path, cs.zeros(e_count, c.intermediate)).add(_gated_sq(c, x, token, expert), counts)


def _gated_sq(c: ExpertsContainer, x, token, expert) -> torch.Tensor:
    """[E, I] float64 sums of squared gated inputs of the down projection over each expert's routed tokens."""
    w = c.canonical(c.layout.gate_up)                                              # [E, 2I, H]
    bias = getattr(c.module, c.layout.gate_up_bias) if c.layout.gate_up_bias else None
    out = torch.zeros(c.num_experts, c.intermediate, dtype=torch.float64, device=x.device)
    for e in torch.unique(expert).tolist():
        rows = x[token[expert == e]]
        inner = c.module._apply_gate(F.linear(rows, w[e], bias[e] if bias is not None else None))   # [n, I]
        out[e] = inner.to(torch.float64).square().sum(0)
    return out


def _finish(sq: torch.Tensor) -> torch.Tensor:
    """Floor rule of the module docstring, per last-axis vector; float32."""
    mean = sq.mean(-1, keepdim=True)
    h = sq + FLOOR * mean
    return torch.where(mean > 0, h, torch.ones_like(h)).to(torch.float32)


def _mean(s: _Sums) -> torch.Tensor:
    count = s.count.clamp_min(1).to(torch.float64)
    return s.sq / (count[..., None] if s.sq.ndim > 1 else count)


def channel_weights(plan: Plan, cs: ChannelStats, containers: dict[str, ExpertsContainer], keys: list[str],
                    min_tokens: int) -> dict[str, torch.Tensor]:
    """Channel weights ``h`` per target key (``[K]`` for a linear, ``[E, K]`` for experts)."""
    out = {}
    for key in keys:
        t = plan.target(key)
        if t.kind == "linear":
            if key not in cs.linear:
                raise KeyError(f"{t.module_path}: no activation statistics (never called in the calibration forward)")
            out[key] = _finish(_mean(cs.linear[key]))
            continue
        c = containers[t.module_path]
        is_gate_up = t.param_name == c.layout.gate_up
        routed = cs.gate_up[c.path] if is_gate_up else cs.down[c.path]
        h = _mean(routed)
        under = routed.count < min_tokens
        if is_gate_up:
            fallback = _mean(cs.hidden[c.path])
        else:
            fallback = routed.sq.sum(0) / routed.count.sum().clamp_min(1).to(torch.float64)
        out[key] = _finish(torch.where(under[:, None], fallback.expand_as(h), h))
    return out
