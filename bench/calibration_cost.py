"""Cost of activation calibration: peak device memory layer by layer vs all at once, and the observation
cost of the dead-expert policies (coverage vs route_all). Random-weight Qwen3-MoE models (no real MoE
weights exist offline); the numbers are about memory and compute, not accuracy.

    python bench/calibration_cost.py            # on CUDA if available, else a smaller CPU run
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import transformers as tf

from moequant import load_recipe, quantize


def model_of(layers: int, hidden: int, experts: int, top_k: int, inter: int, dtype):
    config = tf.Qwen3MoeConfig(
        hidden_size=hidden, num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 256, 1), head_dim=64,
        vocab_size=1024, num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False,
        intermediate_size=4 * hidden, moe_intermediate_size=inter, num_experts=experts,
        num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = tf.Qwen3MoeForCausalLM(config).to(dtype).eval()
    return model


def recipe(policy: str, samples: int, seq_len: int, name: str = "nvfp4"):
    return load_recipe(name, kv_cache="fp8", calibration={"dead_experts": policy, "samples": samples,
                                                          "seq_len": seq_len})


def memory(args, device: torch.device) -> None:
    model = model_of(args.layers, args.hidden, args.experts, args.top_k, args.inter, torch.bfloat16)
    ids = torch.randint(0, 1024, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    result = quantize(model, recipe("coverage", args.samples, args.seq_len), ids, device=device, batch_size=8)
    m = result.report.memory
    print(f"layer by layer on {device}: {time.perf_counter() - start:.1f}s; model {m.model_bytes / 2**20:.0f} MiB "
          f"({args.layers} layers), largest layer {m.largest_layer_bytes / 2**20:.1f} MiB, captured activations "
          f"{m.activation_bytes / 2**20:.1f} MiB, device peak "
          f"{'n/a' if m.device_peak is None else f'{m.device_peak / 2**20:.1f} MiB'}")
    print("  stages:", {k: round(v, 2) for k, v in result.report.stage_seconds.items()})
    if device.type == "cuda":
        reference = copy.deepcopy(model).to(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        ref = quantize(reference, recipe("coverage", args.samples, args.seq_len), ids.to(device), batch_size=8,
                       sequential=False)
        print(f"all at once on {device}: {time.perf_counter() - start:.1f}s; device peak "
              f"{ref.report.memory.device_peak / 2**20:.1f} MiB (model resident on the device)")
        same = all(torch.equal(a.input_scale.cpu(), ref.state.tensors[k].input_scale.cpu())
                   for k, a in result.state.tensors.items())
        print(f"  input scales identical to layer by layer: {same}")


def policies(args, device: torch.device, samples: int) -> None:
    model = model_of(2, args.hidden, args.policy_experts, args.policy_top_k, args.inter, torch.bfloat16)
    ids = torch.randint(0, 1024, (samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    for _ in range(2):   # the second round is reported (the first warms up kernels and caches)
        rows, results = [], {}
        for policy in ("coverage", "route_all", "routed"):
            r = results[policy] = quantize(model, recipe(policy, samples, args.seq_len, "nvfp4-experts-only"), ids,
                                           device=device, batch_size=8)
            main, extra = r.report.observation_cost()
            seconds = sum(c.main_seconds + c.extra_seconds for c in r.report.coverage)
            under = sum(len(c.under_covered) for c in r.report.coverage)
            rows.append(f"  {policy:9s}: {main + extra:>10d} expert x token evaluations ({extra} in targeted "
                        f"passes), {seconds:.3f}s observing, {under} under-covered experts, "
                        f"observe stage {r.report.stage_seconds['observe']:.2f}s")
    print(f"dead-expert policies, {args.policy_experts} experts top-{args.policy_top_k}, "
          f"{samples * args.seq_len} tokens, 2 layers, min_tokens 16, on {device}:")
    print("\n".join(rows))
    same = all(torch.equal(results["coverage"].state.tensors[f"{c.path}.{p}"].input_scale[under],
                           results["route_all"].state.tensors[f"{c.path}.{p}"].input_scale[under])
               for c in results["coverage"].report.coverage for p in ("gate_up_proj", "down_proj")
               for under in [[e for e, _, _ in c.under_covered]])
    print(f"  coverage == route_all for every under-covered expert (bitwise): {same}")


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=48 if cuda else 8)
    p.add_argument("--hidden", type=int, default=1024 if cuda else 256)
    p.add_argument("--experts", type=int, default=64 if cuda else 16)
    p.add_argument("--top-k", type=int, default=8 if cuda else 2)
    p.add_argument("--inter", type=int, default=512 if cuda else 128)
    p.add_argument("--samples", type=int, default=64 if cuda else 8)
    p.add_argument("--seq-len", type=int, default=512 if cuda else 128)
    p.add_argument("--policy-experts", type=int, default=256 if cuda else 64)
    p.add_argument("--policy-top-k", type=int, default=8)
    p.add_argument("--policy-samples", type=int, nargs="+", default=[1, 4, 32] if cuda else [1, 8])
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"torch {torch.__version__}, transformers {tf.__version__}, python {sys.version.split()[0]}, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}")
    if not args.skip_memory:
        memory(args, device)
    for samples in args.policy_samples:
        policies(args, device, samples)


if __name__ == "__main__":
    main()
