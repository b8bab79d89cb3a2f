"""Channel smoothing (recipe key ``smoothing``): the fold keeps each layer's function, the model is left unchanged,
the checkpoint ships the smoothed weights with their factors, and the verifier proves it against the source."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, build
from torch import nn

from moequant import export, load_recipe, quantize, verify
from moequant.layers.inputs import capture_layer_inputs
from moequant.layers.job import start_job
from moequant.recipe import RecipeError
from moequant.smoothing import factors, smooth_layer

SMOOTH = {"smoothing": {"enabled": True, "alpha": 0.5, "down": True},   # every site kind, not only the defaults
          "calibration": {"samples": 8, "seq_len": 32, "min_tokens": 2}}
IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _layer0(model, recipe="nvfp4-best"):
    job, _ = start_job(model, load_recipe(recipe), None, "torch", True)
    inputs = capture_layer_inputs(model, job.layers[0], job.layer_path(0), list(IDS.split(4)), torch.device("cpu"))
    return job, inputs


def _smooth0(job, inputs):
    quantized = {t.module_path for t in job.targets_of(0)}
    return smooth_layer(job.layers[0], job.layer_path(0), inputs, quantized, job.containers, 0.5, 2)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])
@torch.no_grad()
def test_fold_keeps_the_layer_function_and_restore_is_exact(family):
    model = build(family).eval()
    job, inputs = _layer0(model)
    before = {k: v.clone() for k, v in job.layers[0].state_dict().items()}
    originals = [i.hidden.clone() for i in inputs]
    smoothing, folded = _smooth0(job, inputs)
    kinds = sorted(s.kind for s in smoothing.sites)
    assert kinds.count("norm") >= 2 and kinds.count("down") >= 1, kinds   # attention input, MLP input, down
    assert not smoothing.skipped
    assert any(not torch.equal(before[k], v) for k, v in job.layers[0].state_dict().items())   # folded in place
    for orig, inp in zip(originals, inputs):   # inputs now hold the unsmoothed outputs; the smoothed layer agrees
        out = job.layers[0](orig, *inp.args, **inp.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        assert float((out - inp.hidden).norm() / inp.hidden.norm()) < 1e-5
    folded.restore()
    for k, v in job.layers[0].state_dict().items():
        assert torch.equal(before[k], v), k


@torch.no_grad()
def test_every_reader_of_a_norm_is_scaled_and_the_router_keeps_its_logits():
    model = build("qwen2_moe").eval()   # shared expert + its gate read the MLP norm too
    job, inputs = _layer0(model)
    smoothing, folded = _smooth0(job, inputs)
    mlp_norm = next(s for s in smoothing.sites if s.producer.endswith("post_attention_layernorm"))
    readers = {s.param.rsplit(".", 2)[-2] if s.param.endswith(".weight") else s.param for s in mlp_norm.scaled}
    assert {"gate", "shared_expert_gate", "gate_proj", "up_proj"} <= readers, readers
    assert any(s.param.endswith("experts.gate_up_proj") for s in mlp_norm.scaled)
    assert "model.layers.0.mlp.gate.weight" in smoothing.changed   # unquantized, shipped smoothed
    folded.restore()


def test_factors_are_smoothquants_and_one_where_nothing_was_seen():
    x = torch.tensor([4.0, 0.0, 1.0])
    w = torch.tensor([1.0, 2.0, 4.0])
    assert torch.allclose(factors(x, w, 0.5), torch.tensor([2.0, 1.0, 0.5]))
    assert torch.equal(factors(x, w, 1.0)[[0, 2]], torch.tensor([4.0, 1.0]))


class _OnePlusNorm(nn.Module):
    """A norm computing (1 + weight) * x / rms (Gemma style): dividing its weight does not divide its output."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@torch.no_grad()
def test_a_fold_that_changes_the_output_is_undone_and_listed():
    model = build("llama").eval()
    layer = model.model.layers[0]
    layer.input_layernorm = _OnePlusNorm(torch.rand(64) + 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    job, inputs = _layer0(model)
    originals = [i.hidden.clone() for i in inputs]
    smoothing, folded = _smooth0(job, inputs)
    assert folded is None and not smoothing.sites
    assert any("changed the layer's output" in m for m in smoothing.skipped), smoothing.skipped
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    out = layer(originals[0], *inputs[0].args, **inputs[0].kwargs)
    assert torch.equal(out[0] if isinstance(out, tuple) else out, inputs[0].hidden)   # inputs: the layer's outputs


def test_recipe_key_is_checked():
    rec = load_recipe("nvfp4-best", smoothing={"enabled": True, "alpha": 0.7})
    assert rec.smoothing.alpha == 0.7 and rec.to_dict()["smoothing"] == {"enabled": True, "alpha": 0.7, "down": False}
    for bad, words in [({"alpha": 1.5}, "<= 1.0"), ({"alpha": "half"}, "a number"), ({"alfa": 0.5}, "unknown key")]:
        with pytest.raises(RecipeError, match=words):
            load_recipe("nvfp4-best", smoothing=bad)
    with pytest.raises(RecipeError, match="weight-only"):
        load_recipe("nvfp4-w4a16", smoothing={"enabled": True})
    with pytest.raises(Exception, match="sequential=True"):
        quantize(build("llama"), load_recipe("nvfp4-best", **SMOOTH), IDS, sequential=False)


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory):
    """A smoothed Qwen3-MoE checkpoint, its source directory and the in-memory result."""
    root = tmp_path_factory.mktemp("smoothed")
    model = build("qwen3_moe").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "src")
    recipe = load_recipe("nvfp4-best", kv_cache="fp8", **SMOOTH)
    result = quantize(model, recipe, IDS, batch_size=4)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), f"quantize changed the model: {k}"
    export(model, result.state, root / "out", recipe=recipe)
    return root, result


def test_checkpoint_verifies_against_the_source_with_its_factors(smoothed):
    root, result = smoothed
    assert any("smoothing (alpha 0.5)" in n for n in result.report.notes)
    checked = verify(root / "out", reference=root / "src")
    assert checked.ok, checked.failures[:3]
    assert checked.errors.summary["max"] < 0.2   # NVFP4 error against the unsmoothed weights: honest
    norm = "model.layers.0.input_layernorm.weight"
    shard = json.loads((root / "out" / "model.safetensors.index.json").read_text())["weight_map"][norm]
    shipped, source = load_file(root / "out" / shard)[norm], load_file(root / "src" / "model.safetensors")[norm]
    assert shipped.dtype == source.dtype and not torch.equal(shipped, source)   # the smoothed norm ships


def test_verifier_fails_without_or_with_wrong_factors(smoothed, tmp_path):
    root, _ = smoothed
    missing = tmp_path / "missing"
    shutil.copytree(root / "out", missing)
    shutil.rmtree(missing / "moequant_smoothing")
    checked = verify(missing, reference=root / "src")
    assert {"relative_error", "unquantized_changed"} <= {f.check for f in checked.failures}

    wrong = tmp_path / "wrong"
    shutil.copytree(root / "out", wrong)
    path = wrong / "moequant_smoothing" / "factors.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["f0"] = tensors["f0"] * 1.5
    save_file(tensors, str(path), metadata=meta)
    checked = verify(wrong, reference=root / "src")
    assert any(f.check == "unquantized_changed" and "input_layernorm" in f.tensor for f in checked.failures)

    tensors["f0"][3] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    assert any(f.check == "smoothing" for f in verify(wrong).failures)


def test_evaluation_loads_the_shipped_norms_and_routers(smoothed):
    """moequant eval's model is what ships: the smoothed norms and router from the checkpoint, not the source's
    (with the source's, a smoothed checkpoint evaluates as a broken model: perplexity 1.8e5 on the built-in MoE)."""
    from moequant.fake_quant_model import load_fake_quantized, load_original

    root, _ = smoothed
    held = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    quantized = load_fake_quantized(root / "src", root / "out", "cpu")
    norm = "model.layers.1.post_attention_layernorm.weight"
    shard = json.loads((root / "out" / "model.safetensors.index.json").read_text())["weight_map"][norm]
    assert torch.equal(quantized.state_dict()[norm], load_file(root / "out" / shard)[norm])
    with torch.no_grad():
        logp = load_original(root / "src", "cpu")(input_ids=held).logits.log_softmax(-1)
        logq = quantized(input_ids=held).logits.log_softmax(-1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert kl < 0.02, kl   # NVFP4 W4A4 on this tiny model: ~0.005 (with the source's norms: ~0.04)


@torch.no_grad()
def test_experts_with_few_routed_tokens_keep_factor_one_on_their_down_site():
    """A down site's factors come from each expert's own routed tokens; an expert with fewer than min_tokens
    (here: the biased router's dead experts 6 and 7, and the rare ones) is left as it is (factor 1)."""
    from biased_models import biased

    model = biased("qwen3_moe").eval()
    job, _ = start_job(model, load_recipe("nvfp4-best"), None, "torch", True)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(model, job.layers[0], job.layer_path(0), list(ids.split(2)), torch.device("cpu"))
    quantized = {t.module_path for t in job.targets_of(0)}
    smoothing, folded = smooth_layer(job.layers[0], job.layer_path(0), inputs, quantized, job.containers, 0.5, 16)
    down = next(s for s in smoothing.sites if s.kind == "down")
    ones = (down.factor == 1).all(-1)
    assert bool(ones[6]) and bool(ones[7]), "dead experts keep factor 1"
    assert not bool(ones.all()), "experts with enough routed tokens are smoothed"
    folded.restore()


def test_builtin_smooth_gptq_recipe_verifies(tmp_path):
    """nvfp4-smooth-gptq: GPTQ's X^T X observed on the smoothed layer, its codes on the smoothed weights; the
    checkpoint verifies against the unsmoothed source."""
    model = build("mixtral").eval()
    model.save_pretrained(tmp_path / "src")
    recipe = load_recipe("nvfp4-smooth-gptq", calibration=SMOOTH["calibration"])
    result = quantize(model, recipe, IDS, batch_size=4)
    assert result.state.smoothing and result.state.method == "gptq"
    status = [int(v) for s in result.state.tensors.values() for v in s.gptq_status.reshape(-1)]
    assert 0 in status   # GPTQ codes (status 0) for the tensors with enough tokens
    export(model, result.state, tmp_path / "out", recipe=recipe)
    checked = verify(tmp_path / "out", reference=tmp_path / "src")
    assert checked.ok, checked.failures[:3]


@torch.no_grad()
def test_norm_sites_only_when_down_is_off():
    model = build("qwen3_moe").eval()
    job, inputs = _layer0(model)
    quantized = {t.module_path for t in job.targets_of(0)}
    smoothing, folded = smooth_layer(job.layers[0], job.layer_path(0), inputs, quantized, job.containers, 0.5, 2,
                                     down=False)
    assert smoothing.sites and {s.kind for s in smoothing.sites} == {"norm"}
    folded.restore()
    assert load_recipe("nvfp4-best", smoothing={"enabled": True, "down": False}).smoothing.down is False
