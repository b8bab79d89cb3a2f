"""Tiny MoE models whose routers are biased so that some experts get no tokens and some only a few.

Embedding dimension 0 is set to a constant, so after every RMSNorm dimension 0 of each token is large and
positive; router weights along that dimension then push some experts up and others (6 and 7) far down.
DeepSeek-V3 routes with a sigmoid plus ``e_score_correction_bias``, which is biased directly.
With 4 x 32 calibration tokens every layer has dead experts (0 tokens) and most have rare ones (< 16).
"""

from __future__ import annotations

import functools

import torch
from tiny_models import build

BIASED_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "olmoe")
ROUTER_BIAS = (0.1, 0.05, 0.0, 0.0, -0.05, -0.15, -1.0, -1.0)
DEEPSEEK_SCORE_BIAS = (0.1, 0.1, 0.0, 0.0, 0.1, -0.1, -10.0, -10.0)
SAMPLES, SEQ_LEN, MIN_TOKENS = 4, 32, 16


def biased(family: str, seed: int = 0):
    model = build(family, seed)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        for name, module in model.named_modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(torch.tensor(DEEPSEEK_SCORE_BIAS))
            elif name.endswith(("mlp.gate", "mlp.router")):
                module.weight[:, 0] = torch.tensor(ROUTER_BIAS)
    return model


def calib_ids(samples: int = SAMPLES, seq_len: int = SEQ_LEN, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def recipe(name: str = "nvfp4", policy: str = "coverage", kv: str = "none", samples: int = SAMPLES,
           seq_len: int = SEQ_LEN, calibration: dict | None = None, **extra):
    from moequant import load_recipe

    calibration = {"dead_experts": policy, "min_tokens": MIN_TOKENS, "samples": samples, "seq_len": seq_len,
                   **(calibration or {})}
    return load_recipe(name, kv_cache=kv, calibration=calibration, **extra)


@functools.lru_cache(maxsize=None)
def prepared(family: str):
    """(biased model, its Plan, its experts containers by path), built once per test session: do not mutate."""
    from moequant import discover
    from moequant.models.experts import find_experts

    model = biased(family)
    return model, discover(model), {c.path: c for c in find_experts(model, model.config.hidden_size)}


def observe(model, plan, containers, policy: str, ids: torch.Tensor, kv: bool = True):
    """(logits, ActivationStats) of one whole-model forward with every observer attached."""
    from moequant.calibrate import ActivationStats, observing
    from moequant.discover import decoder_layers

    layers_path, layers = decoder_layers(model)
    kv_layers = [(f"{layers_path}.{i}", layer) for i, layer in enumerate(layers)] if kv else []
    stats = ActivationStats()
    with torch.no_grad(), observing(model, "", plan, containers, stats, policy=policy, activations=True,
                                    kv_layers=kv_layers):
        logits = model(input_ids=ids, use_cache=False).logits
    return logits, stats
