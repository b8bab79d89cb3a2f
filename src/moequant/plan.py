"""What gets quantized, how, and in which group: plain frozen data, produced by ``discover``.

Canonical weight view: every target is seen as ``[N, K]`` (a linear) or ``[E, N, K]`` (fused experts),
``N`` = output features, ``K`` = input features (NVFP4 blocks run along ``K``). A parameter stored
transposed (GPT-OSS, Llama4: ``[E, K, N]``) has ``transposed=True`` and is viewed through
``weight.transpose(-1, -2)``; nothing is copied into the model.

On-disk names: each target lists ``DiskSlice``s, the tensors a checkpoint holds for it (for fused experts
``...experts.{e}.gate_proj.weight`` and so on), each a set of rows of the canonical view of one expert.
They are derived from transformers' own save-time conversion (see ``models/disk_names.py``), so they are
exactly the names ``save_pretrained`` would write.

Global-scale sharing ("scale groups"): for a fused-experts target the unit is one expert (``[E]`` global
scales), so an expert's gate and up rows, which live in the same expert slice of ``gate_up_proj``, share one
global scale by construction. Linears that read the same input tensor (q/k/v, MLA q_a/kv_a, a dense MLP's
gate/up) carry the same ``group`` id and share one global scale (the max of their amax values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

SCHEMES = ("nvfp4", "fp8")


@dataclass(frozen=True)
class DiskSlice:
    """One checkpoint tensor of a target: rows ``range(*rows)`` of expert ``expert``'s canonical view."""

    name: str                    # on-disk weight name, e.g. "model.layers.3.mlp.experts.7.up_proj.weight"
    expert: int | None           # None: a plain linear, or a fused tensor written whole (all experts)
    rows: tuple[int, int, int]   # (start, stop, step) along the canonical output dimension N
    role: str = "linear"         # "linear" | "gate" | "up" | "down" | "gate_up"


@dataclass(frozen=True)
class Target:
    """One quantizable parameter of the model."""

    key: str                     # f"{module_path}.{param_name}"
    module_path: str
    param_name: str
    kind: str                    # "linear" | "experts"
    shape: tuple[int, ...]       # canonical [N, K] or [E, N, K]
    transposed: bool = False
    interleaved: bool = False    # fused gate_up with gate = rows 0::2, up = rows 1::2 (GPT-OSS)
    layer: int | None = None     # index in the decoder-layer list, None outside it
    scheme: str = "nvfp4"
    group: str | None = None     # targets with the same group id share one global scale
    slices: tuple[DiskSlice, ...] = ()
    expert_offset: int = 0       # a range of a fused-experts target (``expert_range``): its first expert

    @property
    def num_experts(self) -> int | None:
        return self.shape[0] if self.kind == "experts" else None

    def expert_range(self, start: int, stop: int) -> "Target":
        """Experts ``start..stop-1`` of this fused-experts target as a target of its own (same key, group and
        on-disk slices; canonical index ``e`` of the range is expert ``start + e``): torchrun ranks split a MoE
        layer's weight work by such ranges. Every per-expert quantity is computed per expert, so the ranges'
        results, concatenated, are the whole target's."""
        if self.kind != "experts" or not 0 <= start < stop <= self.shape[0] or self.expert_offset:
            raise ValueError(f"{self.key}: no expert range {start}..{stop} of a target of shape {self.shape}")
        return replace(self, shape=(stop - start,) + self.shape[1:], expert_offset=start)


def disk_name_of(target: Target, where: int | Sequence[int]) -> str:
    """The on-disk tensor name a user can grep for, for error messages.

    ``where``: a canonical element index (``[e, n, k]`` for fused experts, ``[n, k]`` for a linear, e.g.
    ``bad.nonzero()[0].tolist()``) -> the one tensor holding that element (for a fused gate_up: the gate or up
    tensor of that expert); or an expert number -> every tensor of that expert, comma-separated. A fused
    tensor written whole gets `` (expert e)``; with no matching slice, the target key.
    """
    if isinstance(where, int):
        where += target.expert_offset
        names = [s.name for s in target.slices if s.expert == where]
        return ", ".join(names) if names else _whole_name(target, where)
    return disk_position(target, where)[0]


def disk_position(target: Target, index: Sequence[int]) -> tuple[str, list[int]]:
    """(on-disk name, index within that tensor) of canonical element ``index`` (see ``disk_name_of``); the
    index is in the canonical ``[rows, K]`` orientation of the slice (``[e, n, k]`` for a tensor written whole)."""
    index = list(index)
    if target.kind == "experts":
        index[0] += target.expert_offset
    expert = index[0] if target.kind == "experts" else None
    row = index[-2]
    for s in target.slices:
        start, stop, step = s.rows
        if (s.expert is None or s.expert == expert) and start <= row < stop and (row - start) % step == 0:
            if s.expert is None and expert is not None:
                return f"{s.name} (expert {expert})", index
            return s.name, [(row - start) // step, index[-1]]
    return target.key, index


def _whole_name(target: Target, expert: int) -> str:
    whole = [s.name for s in target.slices if s.expert is None]
    return f"{', '.join(whole)} (expert {expert})" if whole else target.key


@dataclass(frozen=True)
class Plan:
    """Every target, the linears left unquantized, and the groups found from the dataflow."""

    targets: tuple[Target, ...]
    excluded: tuple[str, ...] = ()              # full module names of linear-like modules NOT quantized
    groups: tuple[tuple[str, ...], ...] = ()    # target keys of each multi-member weight group
    num_layers: int = 0
    notes: tuple[str, ...] = field(default=())  # structural findings worth a line in the report

    def target(self, key: str) -> Target:
        for t in self.targets:
            if t.key == key:
                return t
        raise KeyError(f"no target {key!r} in the plan")

    def expert_targets(self) -> tuple[Target, ...]:
        return tuple(t for t in self.targets if t.kind == "experts")

    def with_targets(self, targets: tuple[Target, ...], excluded: tuple[str, ...]) -> "Plan":
        """A copy with a filtered target list (recipes); groups keep only surviving members."""
        keys = {t.key for t in targets}
        groups = tuple(g for g in (tuple(k for k in grp if k in keys) for grp in self.groups) if len(g) > 1)
        return replace(self, targets=targets, excluded=excluded, groups=groups)
