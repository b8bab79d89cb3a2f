"""Side computation of expert activations: the down_proj input amax of chosen experts on chosen tokens.

Computed from the experts container's own weights and its own gating (``_apply_gate``: act(gate) * up, or
GPT-OSS's clamped interleaved variant), never by calling the container, so the model's outputs and its
experts implementation are untouched. Routed tokens: on an accelerator, experts sorted by token count,
evaluated in padded chunks, or one grouped GEMM; on a CPU, one ``F.linear`` per expert (``routed_gated_amax``). Every token (coverage's targeted pass, route_all): one ``F.linear`` per
expert on the CPU, chunks of a fixed size on an accelerator where one launch per expert would dominate
(``gated_amax_many``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moequant.models.experts import ExpertsContainer, UnsupportedModelError
from moequant.reductions import abs_max as _abs_max


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| (f32 0-d) without materializing |x|; -min is exact."""
    return _abs_max(x.detach()).float()


def check_gating(c: ExpertsContainer) -> None:
    """The side computation needs the container's own ``_apply_gate`` (transformers' experts interface)."""
    if not callable(getattr(c.module, "_apply_gate", None)):
        raise UnsupportedModelError(
            f"{c.path} ({type(c.module).__name__}) has no _apply_gate (it is not a transformers "
            "@use_experts_implementation container), so its down_proj input cannot be observed; exclude it "
            "in the recipe or open an issue with the model's config.json")


def gated_amax(c: ExpertsContainer, x: torch.Tensor, expert: int) -> torch.Tensor:
    """amax of expert ``expert``'s down_proj input for tokens ``x [T, H]`` (f32 0-d, on x's device)."""
    w = c.canonical(c.layout.gate_up)[expert]                                      # [2I, H]
    bias = getattr(c.module, c.layout.gate_up_bias)[expert] if c.layout.gate_up_bias else None
    return abs_max(c.module._apply_gate(F.linear(x, w, bias)))                       # [T, I] -> 0-d


GATED_CHUNK_ELEMENTS = 1 << 26   # bound on one batched [C, T, 2I] evaluation on an accelerator
GATED_CHUNK_EXPERTS = 16


def _chunk_size(c: ExpertsContainer, x: torch.Tensor) -> int:
    """Experts evaluated per batched matmul: 1 on the CPU (compute-bound), up to 16 on an accelerator (launch-
    bound). A function of the device and shapes only, never of which experts are asked for."""
    if x.device.type == "cpu":
        return 1
    fit = GATED_CHUNK_ELEMENTS // max(x.shape[0] * 2 * c.intermediate, 1)
    return max(1, min(c.num_experts, GATED_CHUNK_EXPERTS, fit))


def gated_amax_many(c: ExpertsContainer, x: torch.Tensor, experts: list[int]) -> torch.Tensor:
    """amax of each listed expert's down_proj input over every token of ``x [T, H]`` (f32 ``[len]``).

    Chunks have a fixed size (the last padded by repeating an expert), so an expert's value never depends on
    which experts share its chunk: coverage's targeted pass and route_all produce the same bits.
    """
    size = _chunk_size(c, x)
    if size == 1:
        return torch.stack([gated_amax(c, x, e) for e in experts])
    w = c.canonical(c.layout.gate_up)                                              # [E, 2I, H]
    bias = getattr(c.module, c.layout.gate_up_bias) if c.layout.gate_up_bias else None
    out = []
    for start in range(0, len(experts), size):
        ids = experts[start:start + size]
        ids = ids + [ids[-1]] * (size - len(ids))
        h = torch.matmul(x, w[ids].transpose(-1, -2))                              # [C, T, 2I]
        h = h + bias[ids].unsqueeze(1) if bias is not None else h
        amax = _abs_max(c.module._apply_gate(h).flatten(1), 1).float()            # [C, T * I] -> [C]
        out.append(amax[: len(experts[start:start + size])])
    return torch.cat(out)


def routed_gated_amax(c: ExpertsContainer, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
    """Per expert, amax of its down_proj input over its routed tokens (f32 ``[E]``, 0 for experts without).

    ``(token, expert)``: the routed pairs; an ``expert`` value of E or more (an expert-parallel sentinel) is
    no pair. ``counts [E]``: pairs per expert. On a GPU with grouped GEMM (bf16) the pairs go through one
    grouped matmul per chunk of pairs, as the model's own grouped_mm experts do, with no wait for the device
    (``_routed_grouped``). Otherwise experts are sorted by token count and evaluated in chunks padded to the
    chunk's largest count (padding rows masked out), a few operations per chunk instead of several per expert;
    on a CPU, where the work and not the launches bound the time, each expert on exactly its routed tokens (the
    padding cost up to several times the model's own expert compute with uneven routing).
    """
    if _grouped_mm_usable(c, x):
        return _routed_grouped(c, x, token, expert, counts)
    sizes = counts.tolist()
    sorted_tokens = token[torch.argsort(expert, stable=True)]                      # sentinels sort last
    if x.device.type == "cpu":   # compute-bound: each expert on exactly its tokens, no padding (as the model does)
        out, start = torch.zeros(len(sizes)), 0
        for e, n in enumerate(sizes):
            if n:
                out[e] = gated_amax(c, x[sorted_tokens[start:start + n]], e)
            start += n
        return out
    w = c.canonical(c.layout.gate_up)                                              # [E, 2I, H]
    bias = getattr(c.module, c.layout.gate_up_bias) if c.layout.gate_up_bias else None
    starts = torch.cumsum(counts, 0) - counts
    hit = sorted((e for e, n in enumerate(sizes) if n), key=lambda e: -sizes[e])
    out, i = torch.zeros(len(sizes), device=x.device), 0
    while i < len(hit):
        n = sizes[hit[i]]                                                           # the chunk's longest
        fit = GATED_CHUNK_ELEMENTS // max(n * 2 * c.intermediate, 1)
        ids = hit[i:i + max(1, min(GATED_CHUNK_EXPERTS, fit))]
        i += len(ids)
        ids_t = torch.tensor(ids, device=x.device)
        j = torch.arange(n, device=x.device)
        pos = starts[ids_t, None] + torch.minimum(j[None], counts[ids_t, None] - 1)     # [C, n]
        h = torch.bmm(x[sorted_tokens[pos]], w[ids].transpose(-1, -2))                # [C, n, 2I]
        h = h + bias[ids].unsqueeze(1) if bias is not None else h
        inner = c.module._apply_gate(h)                                             # [C, n, I]
        inner = torch.where((j[None] < counts[ids_t, None])[..., None], inner, torch.zeros_like(inner))
        out[ids_t] = _abs_max(inner.flatten(1), 1).float()
    return out


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_usable(c: ExpertsContainer, x: torch.Tensor) -> bool:
    """Grouped GEMM exists for this call: CUDA (compute capability 8.0+), bf16, 16-byte aligned rows."""
    w = c.canonical(c.layout.gate_up)
    return (x.is_cuda and _grouped_mm_fn() is not None and x.dtype == w.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (8, 0)
            and x.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0)


def _routed_grouped(c: ExpertsContainer, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
    """``routed_gated_amax`` by grouped GEMM over the pairs sorted by expert; sizes stay on the device.

    Pairs are cut into chunks of a fixed number of rows (a function of the shapes only); a chunk's group
    offsets are the global ones shifted and clamped on the device. Rows past the last offset (sentinel pairs)
    are left unwritten by the GEMM and land in an extra bin that is dropped.
    """
    e_count = counts.shape[0]
    w_t = c.canonical(c.layout.gate_up).transpose(-1, -2)                          # [E, H, 2I]
    bias = getattr(c.module, c.layout.gate_up_bias) if c.layout.gate_up_bias else None
    order = torch.argsort(expert, stable=True)
    expert_s = expert[order].clamp(max=e_count)                                    # sentinels -> bin E
    rows = x[token[order]]                                                         # [P, H]
    offs = torch.cumsum(counts, 0)                                                 # [E]
    out = torch.zeros(e_count + 1, device=x.device)
    step = max(1, GATED_CHUNK_ELEMENTS // max(2 * c.intermediate, 1))
    for start in range(0, rows.shape[0], step):
        stop = min(rows.shape[0], start + step)
        offs_c = (offs - start).clamp(0, stop - start).to(torch.int32)
        h = _grouped_mm_fn()(rows[start:stop], w_t, offs=offs_c)                    # [n, 2I]
        ids = expert_s[start:stop]
        h = h + bias[ids.clamp(max=e_count - 1)] if bias is not None else h
        out.scatter_reduce_(0, ids, _abs_max(c.module._apply_gate(h), -1).float(), "amax")   # [n] per row
    return out[:e_count]


def gate_rows(c: ExpertsContainer, index: torch.Tensor) -> torch.Tensor | None:
    """The expert of each row of the one ``_apply_gate`` call that the container's forward makes, for the
    experts implementations whose row order is known, else None (eager loops over experts, a non-gated or an
    unknown implementation: the side computation stays). transformers' ``grouped_mm`` gates every routed
    (token, expert) pair at once, sorted by expert id (sentinels last); ``batched_mm`` in (token, k) order."""
    impl = getattr(getattr(c.module, "config", None), "_experts_implementation", None)
    if not getattr(c.module, "has_gate", False):
        return None
    ids = index.reshape(-1)
    if impl == "grouped_mm":
        return torch.sort(ids).values
    if impl == "batched_mm":
        return ids
    return None


class GateCapture:
    """Per expert, the amax of its down_proj input read from the model's own forward: the output of the one
    ``_apply_gate`` call the forward makes (that output is the down_proj input of every routed pair), instead
    of recomputing gate_up beside it (which doubled the experts' compute on a CPU).

    Installed on the container instance for one forward (``close`` removes it); the gated tensor passes
    through untouched, so the model's outputs do not change. ``close`` returns the per-expert amax (f32 [E],
    0 for experts without pairs), or None unless exactly one call with one row per pair was seen: then the
    caller recomputes (``routed_gated_amax``)."""

    def __init__(self, c: ExpertsContainer, rows: torch.Tensor, module: torch.nn.Module | None = None):
        """``module``: the container module that will run (default ``c.module``)."""
        self.module, self.rows, self.experts = module if module is not None else c.module, rows, c.num_experts
        self.calls, self.amax = 0, None
        self.keep, self.gated = False, None   # keep: hold the gated tensor for the channel statistics
        self.own = self.module.__dict__.get("_apply_gate")   # an instance-level gate of the model's, if any
        self.original = self.module._apply_gate
        self.module._apply_gate = self

    def __call__(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        out = self.original(gate_up_out)
        self.calls += 1
        if self.calls == 1 and out.dim() == 2 and out.shape[0] == self.rows.numel():
            with torch.no_grad():
                rows = _abs_max(out.detach(), -1).float()                         # [pairs]
                bins = torch.where((self.rows >= 0) & (self.rows < self.experts), self.rows, self.experts)
                amax = torch.zeros(self.experts + 1, device=out.device)
                self.amax = amax.scatter_reduce_(0, bins, rows, "amax")[:-1]
            self.gated = out if self.keep else None
        return out

    def close(self) -> torch.Tensor | None:
        if self.own is not None:
            self.module._apply_gate = self.own
        else:
            del self.module._apply_gate
        if self.calls != 1:
            self.amax = self.gated = None
        return self.amax
