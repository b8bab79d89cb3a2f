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

Second moments for "gptq" (``hessians=True``): the same inputs' ``X^T X`` sums, float64 ``[K, K]`` per linear
target and ``[E, K, K]`` per experts projection (routed tokens only; no fallback: ``hessians`` marks experts
with fewer than ``min_tokens`` routed tokens, or fewer tokens than input channels, so that their codes are
rounded to nearest instead). They are kept on the device of the observed inputs (on the CPU under
torch.distributed, where each call's sum is kept apart for the ranks' fold: ``8 E K^2`` bytes per batch and
projection until the layer's fold) and dropped per decoder layer
(``drop_hessians``): memory ``8 K^2`` bytes per linear and ``8 E K^2`` per experts projection, e.g. 0.15 GiB
for the built-in MoE's down projections (8 x 1536^2), 4 GiB for a Qwen3-30B-A3B gate_up (128 x 2048^2). These
sums are the only ``[E, K, K]`` arrays: a call adds each routed expert's ``[K, K]`` block in place
(``_Sums.add_experts``: no ``[E, K, K]`` temporary per call), ``hessians`` hands the sums and token counts to
GPTQ without normalizing a copy, and GPTQ forms ``X^T X / T`` per chunk of experts
(``kernels.torch_gptq``: ~``2 * CHUNK_BYTES`` more at most). Linears that read one tensor (q/k/v, gate/up)
share one ``X^T X`` computation (the hook sees the same tensor object), and GPTQ runs them as one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moequant.formats.gptq import FEW_TOKENS, GPTQ, RANK_DEFICIENT
from moequant.gptq_step import GptqInput
from moequant.models.experts import ExpertsContainer
from moequant.plan import Plan

FLOOR = 1e-3


@dataclass
class _Sums:
    sq: torch.Tensor      # float64 [K] or [E, K]
    count: torch.Tensor   # int64 [] or [E]
    parts: list | None = None  # under torch.distributed: each call's float64 sum, folded later in batch order

    def add(self, sq: torch.Tensor, count) -> None:
        sq = sq.detach().to(device=self.sq.device, dtype=torch.float64)
        if self.parts is not None:
            self.parts.append(sq)
        else:
            self.sq += sq
        self.count += torch.as_tensor(count).cpu()

    def add_experts(self, grams, count) -> None:
        """``add`` of an ``[E, K, K]`` sum that is zero except for ``grams`` ((expert, [K, K]) pairs, iterated
        once), without building it: each expert's block is added in place (adding 0.0 leaves a float64 sum
        unchanged, so the bits are those of ``add``); under torch.distributed the whole call's sum is still kept
        (``parts``)."""
        if self.parts is not None:
            full = torch.zeros_like(self.sq)
            for e, g in grams:
                full[e] = g
            self.add(full, count)
            return
        for e, g in grams:
            self.sq[e] += g.to(device=self.sq.device, dtype=torch.float64)
        self.count += torch.as_tensor(count).cpu()

    def fold(self, parts, count: torch.Tensor) -> None:
        """Set the sums from calls given in one process's order: ``((0 + p0) + p1) + ...``, the same float64
        additions one process makes, so the result is bit-identical to it. ``parts``: any iterable, read once
        (a generator may produce each call's sum only when it is added)."""
        sq = torch.zeros_like(self.sq)
        for p in parts:
            sq += p.to(sq.device)
        self.sq, self.count, self.parts = sq, count, None


@dataclass
class ChannelStats:
    linear: dict[str, _Sums] = field(default_factory=dict)        # target key -> [K]
    hidden: dict[str, _Sums] = field(default_factory=dict)        # container path -> [H], every token
    gate_up: dict[str, _Sums] = field(default_factory=dict)       # container path -> [E, H], routed
    down: dict[str, _Sums] = field(default_factory=dict)          # container path -> [E, I], routed
    record_parts: bool = False  # distributed: keep each call's sum (``_Sums.parts``) until the ranks fold them
    hessians: bool = False      # gptq: also the X^T X sums below
    linear_h: dict[str, _Sums] = field(default_factory=dict)      # target key -> [K, K]
    gate_up_h: dict[str, _Sums] = field(default_factory=dict)     # container path -> [E, H, H], routed
    down_h: dict[str, _Sums] = field(default_factory=dict)        # container path -> [E, I, I], routed
    last_gram: tuple | None = None  # (input tensor, its X^T X): the next linear reading the same tensor reuses it

    def zeros(self, *shape) -> _Sums:
        count = torch.zeros(shape[:-1], dtype=torch.int64)
        return _Sums(torch.zeros(shape, dtype=torch.float64), count, [] if self.record_parts else None)

    def gram_zeros(self, *shape, device) -> _Sums:
        """Zero X^T X sums ``[..., K, K]`` on ``device`` (on the CPU when the ranks fold each call's part)."""
        where = "cpu" if self.record_parts else device
        count = torch.zeros(shape[:-2], dtype=torch.int64)
        return _Sums(torch.zeros(shape, dtype=torch.float64, device=where), count, [] if self.record_parts else None)

    def under(self, prefix: str) -> list[tuple[str, str, _Sums]]:
        """(kind, key, sums) of every statistic whose key starts with ``prefix``, in a fixed order."""
        return [(kind, key, sums) for kind in ("linear", "hidden", "gate_up", "down", "linear_h", "gate_up_h", "down_h")
                for key, sums in sorted(getattr(self, kind).items()) if key.startswith(prefix)]

    def drop_hessians(self, prefix: str) -> None:
        """Free the X^T X sums under ``prefix`` (a decoder layer, once its weights are done)."""
        for kind in ("linear_h", "gate_up_h", "down_h"):
            sums = getattr(self, kind)
            for key in [k for k in sums if k.startswith(prefix)]:
                del sums[key]
        self.last_gram = None


def observe_linear(cs: ChannelStats, key: str, x: torch.Tensor) -> None:
    x64 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    k = x64.shape[-1]
    cs.linear.setdefault(key, cs.zeros(k)).add(x64.square().sum(0), x64.shape[0])
    if cs.hessians:
        if cs.last_gram is None or cs.last_gram[0] is not x:
            cs.last_gram = (x, x64.T @ x64)
        cs.linear_h.setdefault(key, cs.gram_zeros(k, k, device=x.device)).add(cs.last_gram[1], x64.shape[0])


def observe_experts(cs: ChannelStats, c: ExpertsContainer, x: torch.Tensor, index: torch.Tensor | None,
                    want_down: bool, inputs: bool = True) -> None:
    """Routed pairs of one container call (``index [T, k]``; None: every token to every expert). The down
    projection's inputs are side-computed here when ``want_down``; ``inputs=False`` does only that (the
    container's own inputs were observed already). ``observe_gated`` takes them from the forward instead."""
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
    x64 = x.to(torch.float64) if inputs else None   # the container's inputs only (the gated ones come from x)
    counts = torch.bincount(expert, minlength=e_count)
    if inputs:
        cs.hidden.setdefault(c.path, cs.zeros(hidden)).add(x64.square().sum(0), x.shape[0])
    if x.device.type != "cpu":
        _observe_experts_chunked(cs, c, x, x64, _routed_tokens(token, expert, counts), counts, want_down, inputs)
        return
    routed = _routed_tokens(token, expert, counts) if cs.hessians or want_down else []
    if inputs:
        _observe_gate_up_cpu(cs, c, x64, token, expert, counts, routed)
    if want_down:
        _add_gated(cs, c.path, e_count, c.intermediate, routed, counts, _side_gated(c, x))


def observe_gated(cs: ChannelStats, c: ExpertsContainer, gated: torch.Tensor, rows: torch.Tensor,
                  chunked: bool | None = None) -> None:
    """The down projection's inputs of one container call as the forward computed them: ``gated [P, I]``, the
    output of its one ``_apply_gate`` call, and ``rows [P]`` the expert of each row (``expert_amax.gate_rows``;
    E or more: an expert-parallel sentinel, no pair). The same sums as the side computation, without a second
    gate_up; each expert's rows in the forward's order."""
    e_count = c.num_experts
    valid = (rows >= 0) & (rows < e_count)
    expert = rows[valid]
    pair = torch.arange(rows.shape[0], device=rows.device)[valid]
    counts = torch.bincount(expert, minlength=e_count)
    routed = _routed_tokens(pair, expert, counts)
    gated = gated.detach()
    if chunked if chunked is not None else gated.device.type != "cpu":   # (chunked=True: tests on a CPU)
        chunks = _padded_chunks(routed, gated.shape[-1], gated.device)
        rows_of = lambda ids, idx, mask: torch.where(mask[..., None], gated[idx].to(torch.float64), 0.0)   # noqa: E731
        _add_chunked(cs, cs.down, cs.down_h, c.path, chunks, rows_of, e_count, c.intermediate, counts, gated.device)
        return
    _add_gated(cs, c.path, e_count, c.intermediate, routed, counts, lambda e, pairs: gated[pairs].to(torch.float64))


def _observe_gate_up_cpu(cs: ChannelStats, c: ExpertsContainer, x64, token, expert, counts, routed) -> None:
    e_count, hidden = c.num_experts, x64.shape[-1]
    sq = torch.zeros(e_count, hidden, dtype=torch.float64, device=x64.device).index_add_(0, expert, x64[token].square())
    cs.gate_up.setdefault(c.path, cs.zeros(e_count, hidden)).add(sq, counts)
    if cs.hessians:
        grams = []
        for e, rows_of in routed:
            rows = x64[rows_of]
            grams.append((e, rows.T @ rows))
        sums = cs.gate_up_h.setdefault(c.path, cs.gram_zeros(e_count, hidden, hidden, device=x64.device))
        sums.add_experts(grams, counts)


def _observe_experts_chunked(cs: ChannelStats, c: ExpertsContainer, x, x64, routed, counts, want_down: bool,
                             inputs: bool = True) -> None:
    """``observe_experts`` on an accelerator, where one launch per expert (8-10 per expert and batch) bounded the
    time: the routed experts in chunks of up to 16, each chunk's tokens padded to its largest count with rows
    of zeros (exact in every sum), batched matmuls for the gated inputs and for X^T X. Every sum is a plain
    reduction or matmul over a chunk whose composition depends only on the token counts, so the bits are
    deterministic (the CPU path's ``index_add_`` would use atomics here) and the same in every process."""
    e_count, hidden, inter = c.num_experts, x.shape[-1], c.intermediate
    chunks = _padded_chunks(routed, max(hidden, 2 * inter), x.device)
    routed_rows = lambda ids, idx, mask: torch.where(mask[..., None], x64[idx], 0.0)   # noqa: E731  [C, n, H]
    if inputs:
        _add_chunked(cs, cs.gate_up, cs.gate_up_h, c.path, chunks, routed_rows, e_count, hidden, counts, x.device)
    if not want_down:
        return
    w = c.canonical(c.layout.gate_up)                                              # [E, 2I, H]
    bias = getattr(c.module, c.layout.gate_up_bias) if c.layout.gate_up_bias else None

    def gated(ids, idx, mask):                                                     # [C, n, I] float64
        h = torch.bmm(x[idx], w[ids].transpose(-1, -2))
        h = h + bias[ids].unsqueeze(1) if bias is not None else h
        return torch.where(mask[..., None], c.module._apply_gate(h).to(torch.float64), 0.0)

    _add_chunked(cs, cs.down, cs.down_h, c.path, chunks, gated, e_count, inter, counts, x.device)


def _add_chunked(cs: ChannelStats, sums: dict, grams_of: dict, path: str, chunks, values, e_count: int, k: int,
                 counts, device) -> None:
    """One call's sums of squares ``[E, k]`` into ``sums[path]`` and, when ``cs.hessians``, its X^T X into
    ``grams_of[path]`` (consumed chunk by chunk), from ``values`` over ``chunks`` (``_chunk_sums``)."""
    sq = torch.zeros(e_count, k, dtype=torch.float64, device=device)
    grams = _chunk_sums(chunks, values, sq, cs.hessians)
    if cs.hessians:
        grams_of.setdefault(path, cs.gram_zeros(e_count, k, k, device=device)).add_experts(grams, counts)
    else:
        for _ in grams:   # the sums of squares are filled as the chunks are consumed
            pass
    sums.setdefault(path, cs.zeros(e_count, k)).add(sq, counts)


def _padded_chunks(routed: list[tuple[int, torch.Tensor]], width: int, device) -> list[tuple]:
    """(expert ids [C], token index [C, n], valid [C, n]) per chunk: experts by descending count, at most
    ``GATED_CHUNK_EXPERTS`` and ``GATED_CHUNK_ELEMENTS / width`` rows x experts per chunk."""
    from torch.nn.utils.rnn import pad_sequence

    from moequant.expert_amax import GATED_CHUNK_ELEMENTS, GATED_CHUNK_EXPERTS

    hit = sorted(routed, key=lambda pair: -pair[1].shape[0])
    chunks, i = [], 0
    while i < len(hit):
        n = hit[i][1].shape[0]
        size = max(1, min(GATED_CHUNK_EXPERTS, GATED_CHUNK_ELEMENTS // max(n * width, 1)))
        part = hit[i:i + size]
        i += len(part)
        ids = torch.tensor([e for e, _ in part], device=device)
        idx = pad_sequence([rows for _, rows in part], batch_first=True)               # [C, n], padded with 0
        sizes = torch.tensor([rows.shape[0] for _, rows in part], device=device)
        chunks.append((ids, idx, torch.arange(n, device=device)[None] < sizes[:, None]))
    return chunks


def _chunk_sums(chunks, values, sq: torch.Tensor, gram: bool):
    """For each chunk, ``values(ids, idx, valid)`` ``[C, n, K]`` (zero rows where not valid): its sums of
    squares into ``sq[ids]`` and, with ``gram``, yields each expert's ``[K, K]`` X^T X (a generator, consumed
    chunk by chunk: one chunk's grams live at a time)."""
    for ids, idx, valid in chunks:
        v = values(ids, idx, valid)
        sq[ids] = v.square().sum(1)
        if gram:
            g = v.transpose(1, 2) @ v
            yield from zip(ids.tolist(), g.unbind(0))


def _routed_tokens(token: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(expert, its routed tokens in pair order) for every expert with at least one pair, ascending: one stable
    sort and one device sync per call (a boolean mask per expert costs a sync each: 128 experts x batches)."""
    tokens_sorted = token[torch.sort(expert, stable=True).indices]
    sizes = counts.tolist()
    return [(e, rows) for e, (n, rows) in enumerate(zip(sizes, tokens_sorted.split(sizes))) if n]


def _side_gated(c: ExpertsContainer, x: torch.Tensor):
    """Expert ``e``'s gated down inputs for the tokens ``rows_of`` (float64 ``[n, I]``), side-computed from the
    container's own weights and gating."""
    w = c.canonical(c.layout.gate_up)                                              # [E, 2I, H]
    bias = getattr(c.module, c.layout.gate_up_bias) if c.layout.gate_up_bias else None

    def inner(e: int, rows_of: torch.Tensor) -> torch.Tensor:
        h = F.linear(x[rows_of], w[e], bias[e] if bias is not None else None)
        return c.module._apply_gate(h).to(torch.float64)

    return inner


def _add_gated(cs: ChannelStats, path: str, e_count: int, inter: int, routed: list[tuple[int, torch.Tensor]],
               counts, inner) -> None:
    """One call's [E, I] float64 sums of squared down inputs over each expert's rows (``routed``:
    ``_routed_tokens``; ``inner(e, rows)`` gives them), and with ``cs.hessians`` their X^T X per routed expert."""
    device = routed[0][1].device if routed else counts.device
    out = torch.zeros(e_count, inter, dtype=torch.float64, device=device)
    grams = [] if cs.hessians else None
    for e, rows_of in routed:
        v = inner(e, rows_of)                                                      # [n, I]
        out[e] = v.square().sum(0)
        if grams is not None:
            grams.append((e, v.T @ v))
    cs.down.setdefault(path, cs.zeros(e_count, inter)).add(out, counts)
    if grams is not None:
        cs.down_h.setdefault(path, cs.gram_zeros(e_count, inter, inter, device=device)).add_experts(grams, counts)


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


def hessians(plan: Plan, cs: ChannelStats, containers: dict[str, ExpertsContainer], keys: list[str],
             min_tokens: int) -> dict[str, GptqInput]:
    """``gptq_step.GptqInput`` per target key: ``X^T X / T`` and, per expert, GPTQ or the fallback reason
    (fewer than ``min_tokens`` routed tokens; fewer tokens than input channels, so H is singular)."""
    out = {}
    for key in keys:
        t = plan.target(key)
        if t.kind == "linear":
            if key not in cs.linear_h:
                raise KeyError(f"{t.module_path}: no activation statistics (never called in the calibration forward)")
            sums = cs.linear_h[key]
        else:
            c = containers[t.module_path]
            sums = (cs.gate_up_h if t.param_name == c.layout.gate_up else cs.down_h)[c.path]
        count, k = sums.count.to(sums.sq.device), sums.sq.shape[-1]
        status = torch.where(count < min_tokens, FEW_TOKENS, torch.where(count < k, RANK_DEFICIENT, GPTQ))
        out[key] = GptqInput(sums.sq, count.clamp_min(1).to(torch.float64), status.to(torch.int8))
    return out
