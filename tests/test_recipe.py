"""Recipes: built-ins, strict YAML with line numbers, overrides, include/exclude after discovery."""

import pytest
from tiny_models import build

from moequant import discover, load_recipe
from moequant.recipe import Recipe, RecipeError, apply_recipe, builtin_recipes

BUILTINS = ("nvfp4", "nvfp4-mse", "nvfp4-experts-only", "nvfp4-experts-only-mse", "nvfp4-w4a16", "fp8")


def test_every_builtin_loads_with_a_description():
    names = builtin_recipes()
    assert set(BUILTINS) <= set(names)
    for name in BUILTINS:
        r = load_recipe(name)
        assert r.name == name and r.description and "\n" not in r.description
        assert r.kv_cache == "none" and r.calibration.dead_experts == "coverage"
    assert load_recipe("nvfp4-mse").weights.method == "mse"
    assert load_recipe("nvfp4-w4a16").input_scheme is None
    assert load_recipe("fp8").weights.format == "fp8" and load_recipe("fp8").input_scheme == "fp8"
    assert load_recipe("nvfp4-experts-only-mse").targets == "experts"


def test_defaults_live_in_the_dataclass():
    r = Recipe()
    assert (r.weights.format, r.weights.method, r.activations, r.kv_cache) == ("nvfp4", "max", "nvfp4", "none")
    assert load_recipe("nvfp4") == Recipe(name="nvfp4", description=load_recipe("nvfp4").description)


@pytest.mark.parametrize("kv", ["fp8", "fp8-cast", "none"])
def test_kv_cache_override_on_any_recipe(kv):
    for name in BUILTINS:
        assert load_recipe(name, kv_cache=kv).kv_cache == kv


def test_user_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("description: mine\nweights:\n  method: mse\nkv_cache: fp8\nexclude: ['*.self_attn.*']\n"
                    "calibration:\n  dead_experts: route_all\n  min_tokens: 4\n")
    r = load_recipe(path)
    assert r.name == "mine" and r.weights.method == "mse" and r.kv_cache == "fp8"
    assert r.exclude == ("*.self_attn.*",) and r.calibration.dead_experts == "route_all"
    assert r.calibration.min_tokens == 4 and r.calibration.samples == Recipe().calibration.samples
    assert load_recipe(str(path)) == r


@pytest.mark.parametrize("text, line, words", [
    ("description: x\nweights:\n  format: nvfp4\n  methd: mse\n", 4, "unknown key 'weights.methd'"),
    ("description: x\nkv_cache: fp16\n", 2, "'fp16' is not one of none, fp8, fp8-cast"),
    ("calibration:\n  min_tokens: 0\n", 2, "calibration.min_tokens must be >= 1"),
    ("calibration:\n  samples: many\n", 2, "calibration.samples must be an integer"),
    ("calibration:\n  dead_experts: all\n", 2, "not one of coverage, route_all, routed"),
    ("include: model.layers.*\n", 1, "include must be a list"),
    ("weights: nvfp4\n", 1, "weights must be a mapping"),
    ("kv-cache: fp8\n", 1, "unknown key 'kv-cache'"),
])
def test_malformed_recipe_names_the_line(tmp_path, text, line, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:{line}:" in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("weights: [\n", "not valid YAML"),
    ("weights:\n  format: fp8\n", "does not go with weights format fp8"),
    ("weights:\n  format: fp8\n  method: mse\nactivations: fp8\n", "mse applies to NVFP4"),
])
def test_malformed_recipe_other_errors(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=words):
        load_recipe(path)


def test_unknown_names_and_overrides_fail():
    with pytest.raises(RecipeError, match="no built-in recipe 'nvfp5'.*nvfp4-mse"):
        load_recipe("nvfp5")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("missing/recipe.yaml")
    with pytest.raises(RecipeError, match="unknown key 'kv'"):
        load_recipe("nvfp4", kv="fp8")
    with pytest.raises(RecipeError, match="calibration.dead_experts"):
        load_recipe("nvfp4", calibration={"dead_experts": "none"})


@pytest.fixture(scope="module")
def qwen_plan():
    return discover(build("qwen3_moe"))


def test_apply_recipe_all_and_experts_only(qwen_plan):
    plan, schemes = apply_recipe(load_recipe("nvfp4"), qwen_plan)
    assert len(plan.targets) == len(qwen_plan.targets) and set(schemes) == {t.key for t in plan.targets}
    assert all(s.activations == "nvfp4" and s.weights == "nvfp4" for s in schemes.values())
    plan, schemes = apply_recipe(load_recipe("nvfp4-experts-only-mse"), qwen_plan)
    assert plan.targets and all(t.kind == "experts" for t in plan.targets)
    assert all(s.method == "mse" for s in schemes.values()) and not plan.groups
    assert "model.layers.0.self_attn.q_proj" in plan.excluded
    plan, schemes = apply_recipe(load_recipe("fp8"), qwen_plan)
    assert all(t.scheme == "fp8" for t in plan.targets)


def test_include_exclude_globs_after_discovery(qwen_plan):
    r = load_recipe("nvfp4", exclude=["*.self_attn.k_proj", "model.layers.1.*"])
    plan, _ = apply_recipe(r, qwen_plan)
    paths = {t.module_path for t in plan.targets}
    assert "model.layers.0.self_attn.k_proj" not in paths and not any(p.startswith("model.layers.1.") for p in paths)
    assert ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight") in plan.groups
    assert "model.layers.0.self_attn.k_proj" in plan.excluded
    plan, _ = apply_recipe(load_recipe("nvfp4", include=["*.experts"]), qwen_plan)
    assert {t.kind for t in plan.targets} == {"experts"}
    plan, _ = apply_recipe(load_recipe("nvfp4", exclude=["lm_head"]), qwen_plan)  # matches an excluded module
    assert len(plan.targets) == len(qwen_plan.targets)


def test_patterns_that_match_nothing_fail(qwen_plan):
    with pytest.raises(RecipeError, match="exclude pattern '\\*.attn.q_proj' matches no module"):
        apply_recipe(load_recipe("nvfp4", exclude=["*.attn.q_proj"]), qwen_plan)
    with pytest.raises(RecipeError, match="selects no target"):
        apply_recipe(load_recipe("nvfp4", include=["*.self_attn.*"], exclude=["*"]), qwen_plan)


def test_resolved_recipe_is_plain_data():
    d = load_recipe("nvfp4-mse", kv_cache="fp8", exclude=["x"]).to_dict()
    assert d["weights"] == {"format": "nvfp4", "method": "mse", "global_search": False, "four_over_six": False,
                           "act_order": False}
    assert d["kv_cache"] == "fp8"
    assert d["exclude"] == ["x"] and d["calibration"]["dead_experts"] == "coverage"
