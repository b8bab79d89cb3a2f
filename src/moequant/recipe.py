"""Recipes: what to quantize and how, as frozen dataclasses loaded strictly from YAML.

A recipe is selected by name (a file in ``moequant/recipes/``, e.g. ``"nvfp4-mse"``) or by a path to a user
YAML file. Every key is checked against the dataclasses below: an unknown key or a bad value fails with the
file name and line. Defaults live only in these dataclasses; a YAML file states what differs from them.

    description: one line shown in ``--help`` and written into the checkpoint
    weights:     {format: nvfp4 | fp8, method: max | mse | weighted_mse | gptq, global_search: bool,
                  four_over_six: bool, act_order: bool}   (see moequant.weights; weighted_mse and gptq observe activations
                                          even for weight-only recipes; gptq: moequant.gptq_step)
    activations: nvfp4 | fp8 | none          none = weight-only (W4A16 / W8A16), no input scales
    targets:     all | experts               experts = only the fused routed-experts containers
    include:     [module-path globs]         if given, only targets whose module path matches one
    exclude:     [module-path globs]         targets whose module path matches one are left unquantized
    kv_cache:    none | fp8 | fp8-cast       fp8: calibrated k/v scales (amax / 448); fp8-cast: scales 1.0
    calibration: {dead_experts: coverage | route_all | routed, min_tokens, input_floor: layer | none,
                  samples, seq_len, seed}   (input_floor: moequant.calibrate, the experts' layer floor)
    smoothing:   {enabled: bool, alpha: float in [0, 1], down: bool}   SmoothQuant channel factors folded into the layer
                                          before its calibration (moequant.smoothing); W4A4 / W8A8 only

``include``/``exclude`` apply after structural discovery (``discover``), to ``Target.module_path`` with
``fnmatch`` rules (``*`` also crosses dots). A pattern that matches no module at all is an error (a typo
would otherwise silently quantize what the user meant to keep).
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from moequant.errors import MoequantError
from moequant.plan import Plan, Target


class RecipeError(MoequantError, ValueError):
    """A recipe that cannot be used; the message names the file, the line and the offending key or value."""


def _choice(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class WeightSpec:
    format: str = field(default="nvfp4", metadata=_choice("nvfp4", "fp8"))
    method: str = field(default="max", metadata=_choice("max", "mse", "weighted_mse", "gptq"))  # NVFP4
    global_search: bool = False   # NVFP4: search the (group-shared) global scale too (8x the block search)
    four_over_six: bool = False   # NVFP4 with method max: per block, block max to 6 or to 4
    act_order: bool = False       # method gptq: columns rounded by decreasing input energy (GPTQ's act order)


@dataclass(frozen=True)
class CalibrationSpec:
    dead_experts: str = field(default="coverage", metadata=_choice("coverage", "route_all", "routed"))
    min_tokens: int = field(default=16, metadata={"min": 1})   # fewer routed tokens = under-covered expert
    input_floor: str = field(default="none", metadata=_choice("none", "layer"))  # experts' input amax (calibrate)
    samples: int = field(default=128, metadata={"min": 1})     # calibration sequences
    seq_len: int = field(default=512, metadata={"min": 1})     # tokens per sequence
    seed: int = field(default=0, metadata={"min": 0})          # sampling of the calibration windows


@dataclass(frozen=True)
class SmoothingSpec:
    enabled: bool = False
    # Defaults: the best measured on the built-in models with nvfp4-gptq + act_order (docs/quality.md, the sweep)
    alpha: float = field(default=0.6, metadata={"min": 0.0, "max": 1.0})   # s = amax_x^alpha / amax_w^(1-alpha)
    down: bool = False   # also the down projections' inputs (up rows / s, down columns * s), else the norms' only


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    description: str = ""
    weights: WeightSpec = WeightSpec()
    activations: str = field(default="nvfp4", metadata=_choice("nvfp4", "fp8", "none"))
    targets: str = field(default="all", metadata=_choice("all", "experts"))
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kv_cache: str = field(default="none", metadata=_choice("none", "fp8", "fp8-cast"))
    calibration: CalibrationSpec = CalibrationSpec()
    smoothing: SmoothingSpec = SmoothingSpec()

    def __post_init__(self):
        fmt, act = self.weights.format, self.activations
        if self.smoothing.enabled and act == "none":
            raise RecipeError("smoothing moves activation outliers into the weights; a weight-only recipe "
                              "(activations: none) has nothing to gain from it: set smoothing.enabled: false")
        if act not in ("none", fmt):
            raise RecipeError(
                f"activations: {act} does not go with weights format {fmt}; use activations: {fmt} "
                "(W4A4 / W8A8) or none (weight-only)")
        if fmt == "fp8" and self.weights.method != "max":
            raise RecipeError(f"weights.method: {self.weights.method} applies to NVFP4 block scales only; FP8 weights "
                              "use max")
        if fmt == "fp8" and (self.weights.global_search or self.weights.four_over_six):
            raise RecipeError("weights.global_search / four_over_six apply to NVFP4 only")
        if self.weights.four_over_six and self.weights.method != "max":
            raise RecipeError("weights.four_over_six goes with method: max only (mse and weighted_mse already "
                              "scan both of its candidates, so they are never worse)")
        if self.weights.act_order and self.weights.method != "gptq":
            raise RecipeError(f"weights.act_order orders GPTQ's columns; it goes with method: gptq, not "
                              f"{self.weights.method}")

    @property
    def needs_channel_stats(self) -> bool:
        """weighted_mse and gptq need per-channel mean squared activations from the calibration forward."""
        return self.weights.method in ("weighted_mse", "gptq")

    @property
    def needs_hessians(self) -> bool:
        """gptq also needs each target's X^T X (per expert: over its routed tokens)."""
        return self.weights.method == "gptq"

    @property
    def input_scheme(self) -> str | None:
        """Activation format of every target ("nvfp4" | "fp8"), None for weight-only recipes."""
        return None if self.activations == "none" else self.activations

    def to_dict(self) -> dict:
        """Plain data of the resolved recipe (for the checkpoint's metadata)."""
        out = asdict(self)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        return out


@dataclass(frozen=True)
class TargetScheme:
    """How one target is quantized under a recipe."""

    weights: str               # "nvfp4" | "fp8"
    method: str                # "max" | "mse" (NVFP4 block scales; fp8 is always "max")
    activations: str | None    # "nvfp4" | "fp8" | None (weight-only: no input scale)


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Located:
    value: Any          # a scalar, a list of _Located, or a dict str -> (key line, _Located)
    line: int | None    # 1-based line in the source, None for Python overrides


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else source


def _located_from_node(node: yaml.Node, loader: yaml.SafeLoader) -> _Located:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node)
            out[str(key)] = (key_node.start_mark.line + 1, _located_from_node(value_node, loader))
        return _Located(out, line)
    if isinstance(node, yaml.SequenceNode):
        return _Located([_located_from_node(n, loader) for n in node.value], line)
    return _Located(loader.construct_object(node), line)


def _located_from_python(value: Any) -> _Located:
    if isinstance(value, dict):
        return _Located({str(k): (None, _located_from_python(v)) for k, v in value.items()}, None)
    if isinstance(value, (list, tuple)):
        return _Located([_located_from_python(v) for v in value], None)
    return _Located(value, None)


def _parse_yaml(text: str, source: str) -> _Located:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError(f"{source}: the recipe file is empty")
        return _located_from_node(node, loader)
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def _scalar(spec, value: _Located, key: str, source: str) -> Any:
    where = _where(source, value.line)
    default = spec.default
    v = value.value
    if isinstance(default, tuple):
        if not isinstance(v, list) or not all(isinstance(x.value, str) and x.value for x in v):
            raise RecipeError(f"{where}: {key} must be a list of module-path globs (strings), got {v!r}")
        return tuple(x.value for x in v)
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise RecipeError(f"{where}: {key} must be true or false, got {v!r}")
        return v
    if not isinstance(default, (int, float, str)):
        raise TypeError(f"recipe field {key} has an unsupported type")  # programming error
    if isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise RecipeError(f"{where}: {key} must be a number, got {v!r}")
        v = float(v)
    elif isinstance(default, int) and (isinstance(v, bool) or not isinstance(v, int)):
        raise RecipeError(f"{where}: {key} must be an integer, got {v!r}")
    if isinstance(default, str) and not isinstance(v, str):
        raise RecipeError(f"{where}: {key} must be a string, got {v!r}")
    choices = spec.metadata.get("choices")
    if choices and v not in choices:
        raise RecipeError(f"{where}: {key}: {v!r} is not one of {', '.join(choices)}")
    low, high = spec.metadata.get("min"), spec.metadata.get("max")
    if low is not None and v < low:
        raise RecipeError(f"{where}: {key} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise RecipeError(f"{where}: {key} must be <= {high}, got {v}")
    return v


def _build(cls, located: _Located, source: str, section: str, base=None):
    """Instance of dataclass ``cls`` from a located mapping; fields not given keep ``base``'s (or defaults)."""
    if not isinstance(located.value, dict):
        raise RecipeError(f"{_where(source, located.line)}: {section or 'the recipe'} must be a mapping of keys")
    specs = {f.name: f for f in fields(cls)}
    base = base if base is not None else cls()
    values = {}
    for key, (key_line, value) in located.value.items():
        qualified = f"{section}.{key}" if section else key
        if key not in specs:
            raise RecipeError(f"{_where(source, key_line)}: unknown key {qualified!r}; expected one of "
                              f"{', '.join(specs)}")
        current = getattr(base, key)
        if is_dataclass(current):
            values[key] = _build(type(current), value, source, qualified, current)
        else:
            values[key] = _scalar(specs[key], value, qualified, source)
    try:
        return replace(base, **values)
    except RecipeError as err:
        raise RecipeError(f"{_where(source, located.line)}: {err}") from None


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names and their one-line descriptions."""
    out = {}
    for entry in sorted(resources.files("moequant.recipes").iterdir(), key=lambda p: p.name.rsplit(".", 1)[0]):
        if entry.name.endswith(".yaml"):
            out[entry.name[:-5]] = _load_text(entry.read_text(), entry.name, entry.name[:-5]).description
    return out


def _load_text(text: str, source: str, name: str) -> Recipe:
    located = _parse_yaml(text, source)
    recipe = _build(Recipe, located, source, "")
    return recipe if isinstance(located.value, dict) and "name" in located.value else replace(recipe, name=name)


def load_recipe(recipe: str | Path | Recipe = "nvfp4", **overrides) -> Recipe:
    """A built-in recipe by name, a user YAML file by path, or a ``Recipe``; ``overrides`` are checked like
    YAML keys, e.g. ``load_recipe("nvfp4-mse", kv_cache="fp8", calibration={"dead_experts": "routed"})``."""
    if isinstance(recipe, Recipe):
        base = recipe
    else:
        base = _load_named_or_path(recipe)
    if not overrides:
        return base
    return _build(Recipe, _located_from_python(overrides), f"overrides of recipe {base.name!r}", "", base)


def _load_named_or_path(recipe: str | Path) -> Recipe:
    text = str(recipe)
    if isinstance(recipe, str) and "/" not in text and not text.endswith((".yaml", ".yml")):
        entry = resources.files("moequant.recipes") / f"{text}.yaml"
        if not entry.is_file():
            raise RecipeError(f"no built-in recipe {text!r}; built-in recipes: {', '.join(builtin_recipes())} "
                              "(or give a path to a YAML file)")
        return _load_text(entry.read_text(), entry.name, text)
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    return _load_text(path.read_text(), str(path), path.stem)


# ---------------------------------------------------------------------------------------------- applying


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _check_patterns_match(recipe: Recipe, paths: list[str]) -> None:
    for key in ("include", "exclude"):
        for pattern in getattr(recipe, key):
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                example = ", ".join(paths[:3])
                raise RecipeError(f"recipe {recipe.name!r}: {key} pattern {pattern!r} matches no module of the "
                                  f"model (module paths look like: {example}); fix or remove the pattern")


def _selected(recipe: Recipe, target: Target) -> bool:
    if recipe.targets == "experts" and target.kind != "experts":
        return False
    if recipe.include and not _matches(target.module_path, recipe.include):
        return False
    return not _matches(target.module_path, recipe.exclude)


def apply_recipe(recipe: Recipe, plan: Plan) -> tuple[Plan, dict[str, TargetScheme]]:
    """The plan filtered by the recipe (schemes set on its targets) and each kept target's ``TargetScheme``.

    Targets left out are added to ``Plan.excluded`` by module path; groups keep their surviving members.
    """
    _check_patterns_match(recipe, [t.module_path for t in plan.targets] + list(plan.excluded))
    scheme = TargetScheme(recipe.weights.format, recipe.weights.method, recipe.input_scheme)
    kept, dropped = [], []
    for t in plan.targets:
        if _selected(recipe, t):
            kept.append(replace(t, scheme=recipe.weights.format))
        elif t.module_path not in dropped:
            dropped.append(t.module_path)
    if not kept:
        raise RecipeError(f"recipe {recipe.name!r} selects no target of this model; check targets/include/exclude")
    excluded = tuple(plan.excluded) + tuple(p for p in dropped if p not in plan.excluded)
    return plan.with_targets(tuple(kept), excluded), {t.key: scheme for t in kept}
