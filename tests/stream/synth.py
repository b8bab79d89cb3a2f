"""A Qwen3-MoE-shaped checkpoint of any size, written shard by shard without building the model in memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def qwen3_moe_config(layers: int, hidden: int, inter: int, experts: int, vocab: int = 256):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 8,
                          vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=256,
                          tie_word_embeddings=False, intermediate_size=inter, moe_intermediate_size=inter,
                          num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                          norm_topk_prob=True, dtype="bfloat16")


def write_checkpoint_dir(folder: Path, config, shard_bytes: int = 50 * 2**20, seed: int = 0) -> int:
    """Random bf16 weights under the on-disk names transformers saves; returns the bytes written."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    disk = revert_weight_conversion(model, dict(model.state_dict()))
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 20, generator=gen) * 0.05).to(torch.bfloat16)   # tensors are windows of it: fast
    weight_map, shard, size, total, files = {}, {}, 0, 0, []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            files.append(name)
            shard, size = {}, 0

    for name, meta in disk.items():
        if meta.ndim >= 2:
            n, start = meta.numel(), int(torch.randint(0, 1 << 19, (1,), generator=gen))
            t = pool.roll(start).repeat(n // pool.numel() + 1)[:n].reshape(meta.shape).clone()
        else:
            t = torch.ones(meta.shape, dtype=torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    return total
