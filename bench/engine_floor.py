"""The noise floor for bench/engine_check.py, on the CPU: how far our own fake-quant forward moves when it runs in
bf16 (as vLLM does) instead of fp32, and when MoE FP8 input scales are replaced by their max over experts (what
vLLM 0.26.0's FP8 MoE does, ``process_fp8_input_tensor_strategy_moe``; w1/w3 and w2 reduced apart).

    python3 bench/engine_floor.py llama,qwen3_moe,mixtral --windows 4      # tiny models as engine_check builds them
    python3 bench/engine_floor.py builtin --windows 8 --recipes fp8        # the built-in model (needs its GGUF)

Prints one JSON line per model x recipe: [mean KL(variant || ours fp32), top-1 agreement], the largest
per-position KL and, for comparison with engine_check's built-in rows, the top-20 coarse-grained bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_check as ec  # noqa: E402

RECIPES = {"fp8": "compressed-tensors", "nvfp4-mse": "modelopt"}


@torch.no_grad()
def logprobs(model, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    model = model.to(dtype)
    return torch.cat([model(w[None]).logits[0, :-1].float().log_softmax(-1) for w in ids])


def distance(p: torch.Tensor, q: torch.Tensor) -> dict:
    per = (p.exp() * (p - q)).sum(-1)
    top = p.topk(20, -1)
    pk, qk = top.values.double(), q.gather(-1, top.indices).double()
    bound = (pk.exp() * (pk - qk)).sum(-1)
    p_rest, q_rest = (1 - pk.exp().sum(-1)).clamp_min(0), (1 - qk.exp().sum(-1)).clamp_min(1e-30)
    bound = bound + torch.where(p_rest > 1e-12, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), 0.0)
    return {"kl": float(per.mean()), "top1": float((p.argmax(-1) == q.argmax(-1)).double().mean()),
            "kl_max": float(per.max()), "top20_bound": float(bound.mean())}


def main() -> None:
    from moequant.fake_quant_model import load_fake_quantized

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", help="comma-separated: tiny families of engine_check and/or builtin")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--recipes", default="fp8,nvfp4-mse")
    parser.add_argument("--work", type=Path, default=Path("/tmp/engine_floor"))
    parser.add_argument("--w4a4", action="store_true", help="NVFP4 with activation fake-quant (the mode of vLLM's "
                        "emulation backends) instead of weights only (Marlin's)")
    args = parser.parse_args()
    names = args.models.split(",")
    ec.FORMATS = tuple((r, RECIPES[r]) for r in args.recipes.split(","))
    dirs = ec.models(args.work, print, names)
    for job in ec.quantize_all(dirs, args.work, print, device="cpu"):
        if "error" in job:
            print(json.dumps(job))
            continue
        model_dir, ckpt = job["model_dir"], Path(job["ckpt"])
        act = job["format"] == "compressed-tensors" or args.w4a4   # the mode vLLM runs, as in engine_check
        ids = ec.heldout_ids(model_dir)[:args.windows]
        ours = logprobs(load_fake_quantized(model_dir, ckpt, "cpu", activations=act), ids, torch.float32)
        row = {"model": job["model"], "recipe": job["recipe"], "windows": args.windows, "activations": act}
        row["bf16"] = distance(logprobs(load_fake_quantized(model_dir, ckpt, "cpu", activations=act), ids,
                                        torch.bfloat16), ours)
        maxed = args.work / f"{ckpt.name}-max-over-experts"
        if act and ec.max_over_experts(ckpt, maxed):
            for name, dtype in (("max_over_experts", torch.float32), ("max_over_experts_bf16", torch.bfloat16)):
                row[name] = distance(logprobs(load_fake_quantized(model_dir, maxed, "cpu", activations=True), ids,
                                              dtype), ours)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
