"""Tiny transformers models of each supported family, built from configs with fixed seeds (CPU, fast).

Every dimension that becomes an NVFP4 input dimension is a multiple of 16.
"""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
              num_hidden_layers=2, max_position_embeddings=128, tie_word_embeddings=False)


def _configs() -> dict:
    return {
        "qwen3_moe": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(
            **COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)),
        "qwen2_moe": (tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(
            **COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])),
        "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig(
            **COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
        # topk_method / scoring_func as in DeepSeek-V3's own config.json: transformers 5 routes with sigmoid and the
        # bias regardless, but vLLM reads both keys (without them it builds no router bias and routes by softmax)
        "deepseek_v3": (tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config(
            **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, intermediate_size=96, moe_intermediate_size=32,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
            n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
            qk_nope_head_dim=16, v_head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=0, eos_token_id=1, topk_method="noaux_tc", scoring_func="sigmoid")),
        "olmoe": (tf.OlmoeForCausalLM, tf.OlmoeConfig(
            **COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2, pad_token_id=0, bos_token_id=0,
            eos_token_id=1)),
        "gpt_oss": (tf.GptOssForCausalLM, tf.GptOssConfig(
            **COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"])),
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**COMMON, intermediate_size=96)),
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**COMMON, intermediate_size=96)),
    }


MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe", "gpt_oss")
DENSE_FAMILIES = ("llama", "qwen3")
FAMILIES = MOE_FAMILIES + DENSE_FAMILIES


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised model of ``family`` (deterministic for a given seed), in eval mode."""
    cls, config = _configs()[family]
    torch.manual_seed(seed)
    model = cls(config)
    # init of 3-D expert params may be empty/zero in some families: give every parameter real values
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "norm" in name or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return model.to(dtype).eval()
