"""How vLLM 0.26.0 decides, per module, whether to build it quantized: the exclude / ignore matching rules.

Re-stated from vLLM 0.26.0 (PyPI wheel, ``vllm/_version.py`` commit ``ffd46bfab``), not imported:

ModelOpt (``layers/quantization/modelopt.py`` ``ModelOptQuantConfigBase.is_layer_excluded`` and
``apply_vllm_mapper``; ``utils/quant_utils.py`` ``is_layer_skipped``), for a module ``prefix``:
  0. (once, only for model classes with an ``hf_to_vllm_mapper``) every entry ``x*`` whose character before the
     ``*`` is not ``.`` becomes the two entries ``x`` and ``x.*``;
  1. exact / fused: a fused name (``qkv_proj``...) listed itself, or all of its shard names listed (some but not
     all: vLLM raises); a name containing ``experts`` is excluded when it is a SUBSTRING of any entry that
     contains ``experts`` (so one listed expert projection excludes the whole FusedMoE layer); else ``prefix``
     listed exactly;
  2. substring: any entry other than ``prefix`` itself that occurs inside ``prefix``;
  3. fnmatch: ``fnmatch(prefix, entry)`` for any entry (``*`` also crosses dots).
compressed-tensors (``compressed_tensors/utils.py`` ``should_ignore_layer``, ``find_matched_target``;
``compressed_tensors_moe.py`` ``get_moe_method``): an entry matches when equal to the name or, written
``re:<pattern>``, when ``re.match`` (anchored at the start) accepts it; fused names check every shard (disagreeing
shards: vLLM raises). A module not ignored takes the scheme of the first config-group target equal to / matching
its name, else one whose text occurs (case-insensitively) in the vLLM class name (``Linear`` matches every
``*Linear`` class, and ``RoutedExperts`` is added for FusedMoE when ``Linear`` is a target), else the target all
its fused shards match. A FusedMoE layer is decided by probing ``<prefix>.0.gate_proj``, ``.0.up_proj`` and
``.0.down_proj`` only -- whatever the on-disk projection names -- and the three must agree (vLLM raises otherwise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatch
from moequant.errors import MoequantError


class MatchError(MoequantError, ValueError):
    """vLLM itself raises while deciding (fused shards disagree); the message says what it would raise."""


def expand_star(entries: list[str]) -> list[str]:
    out = []
    for e in entries:
        out += [e[:-1], e[:-1] + ".*"] if len(e) >= 2 and e[-1] == "*" and e[-2] != "." else [e]
    return out


@dataclass
class ModelOptRules:
    entries: list[str]
    packed: dict[str, tuple[str, ...]]

    def _exact(self, prefix: str) -> tuple[bool, str | None]:
        proj = prefix.split(".")[-1]
        if proj in self.packed and prefix in self.entries:
            return True, prefix
        if proj in self.packed:
            shards = [prefix.replace(proj, s) for s in self.packed[proj]]
            hits = [s in self.entries for s in shards]
            if any(hits) and not all(hits):
                raise MatchError(f"exclude entries list {[s for s, h in zip(shards, hits) if h]} but not all of "
                                 f"{shards}: vLLM raises 'Detected some but not all shards of {prefix} are quantized'")
            return all(hits), (shards[0] if all(hits) else None)
        if "experts" in prefix:
            hit = [e for e in self.entries if "experts" in e and prefix in e]
            return bool(hit), (hit[0] if hit else None)
        return prefix in self.entries, (prefix if prefix in self.entries else None)

    def excluded_by(self, prefix: str) -> str | None:
        """``"'entry' (rule)"`` when vLLM loads ``prefix`` unquantized, else None."""
        if not self.entries:
            return None
        hit, entry = self._exact(prefix)
        if hit:
            return f"{entry!r} (exact/fused{', experts substring' if 'experts' in prefix else ''})"
        for e in self.entries:
            if e != prefix and (e in prefix or (prefix.startswith("language_model.")
                                                and e in prefix.removeprefix("language_model."))):
                return f"{e!r} (substring)"
        for e in self.entries:
            if fnmatch(prefix, e):
                return f"{e!r} (fnmatch)"
        return None


def _equal_or_regex(value: str, target: str, contains: bool = False) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    if contains:
        return target.lower() in value.lower()
    return target == value


@dataclass
class CtRules:
    ignore: list[str]
    targets: list[str]            # config-group targets, in config order
    packed: dict[str, tuple[str, ...]]

    def ignored_by(self, name: str) -> str | None:
        proj = name.split(".")[-1]
        if proj in self.packed and name not in self.ignore:
            shards = [name.replace(proj, s) for s in self.packed[proj]]
            hits = [self._first(s, self.ignore) for s in shards]
            if len({h is None for h in hits}) > 1:
                raise MatchError(f"ignore matches only some of {shards}: vLLM raises 'Found a different "
                                 "quantization schemes ... vLLM requires all to use the same scheme'")
            return hits[0]
        return self._first(name, self.ignore)

    @staticmethod
    def _first(value: str, targets: list[str], contains: bool = False) -> str | None:
        return next((t for t in targets if _equal_or_regex(value, t, contains)), None)

    def target(self, name: str, cls: str) -> str | None:
        """The config-group target vLLM picks for ``name`` (class ``cls``), None when the layer is unquantized."""
        if self.ignored_by(name) is not None:
            return None
        targets = self.targets + (["RoutedExperts"] if cls == "RoutedExperts" and "Linear" in self.targets
                                  and "RoutedExperts" not in self.targets else [])
        hit = self._first(name, targets) or self._first(cls, targets, contains=True)
        if hit is not None:
            return hit
        fused = next((k for k in self.packed if name.endswith(k)), None)
        if fused is None:
            return None
        shards = [self._first(name.replace(fused, s), targets) for s in self.packed[fused]]
        return shards[0] if all(shards) else None

    def experts_target(self, prefix: str) -> str | None:
        probes = [f"{prefix}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        found = [self.target(p, "RoutedExperts") for p in probes]
        if len(set(found)) > 1:
            raise MatchError(f"vLLM probes {probes} and finds targets {found}: it raises 'All MoE projections need "
                             "to have same quantization scheme'")
        return found[0]
