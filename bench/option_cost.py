"""Cost of each NVFP4 weight-calibration option (issue 9): seconds of ``quantize`` per stage, on one device.

The model: a random-initialized Qwen3-MoE from ``bench/e2e_gpu.py`` (Qwen3-30B-A3B layer dimensions, bf16,
``--layers`` layers, a small vocabulary: the lm_head is not quantized and only adds forward time). Every
option quantizes every linear and every expert (W4A4 NVFP4, the options of ``bench/quality.py``) on the same
16 x 512 random calibration tokens; the first run of each option is untimed (Triton compiles, caches warm).
Random weights: this is about time, not accuracy (accuracy: ``bench/quality.py`` on real weights).

    PYTHONPATH=src python3 bench/option_cost.py --device cuda --out $OUT
    PYTHONPATH=src python3 bench/option_cost.py --device cpu --layers 1 --hidden 512 --experts 16   # a CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_gpu  # noqa: E402  (same model builder and calibration tokens)

# option -> (recipe, overrides): the rows of bench/quality.py
OPTIONS = {
    "max": ("nvfp4", {}),
    "mse": ("nvfp4-mse", {}),
    "max+4over6": ("nvfp4", {"weights": {"method": "max", "four_over_six": True}}),
    "mse+global": ("nvfp4-mse", {"weights": {"method": "mse", "global_search": True}}),
    "best (weighted_mse)": ("nvfp4-best", {}),
    "gptq": ("nvfp4-gptq", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=e2e_gpu.HIDDEN)
    parser.add_argument("--experts", type=int, default=e2e_gpu.EXPERTS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--samples", type=int, default=e2e_gpu.SAMPLES,
                        help="calibration sequences of 512 tokens (gptq: an expert needs as many routed tokens as "
                             "input channels, else it falls back to round to nearest; 16 leaves most experts there)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    from moequant import load_recipe, quantize

    e2e_gpu.DEVICE = args.device
    e2e_gpu.HIDDEN, e2e_gpu.EXPERTS, e2e_gpu.SAMPLES = args.hidden, args.experts, args.samples
    model = e2e_gpu.build_model(args.layers, vocab=4096)
    tokens = e2e_gpu.calib_tokens(4096)
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"# {card}; {args.layers} layers, hidden {args.hidden}, {args.experts} experts "
          f"({experts / 1e6:.0f} M expert weights); torch {torch.__version__}", flush=True)
    rows = {}
    for name in args.options.split(","):
        recipe_name, overrides = OPTIONS[name]
        recipe = load_recipe(recipe_name, calibration={"samples": e2e_gpu.SAMPLES, "seq_len": e2e_gpu.SEQ_LEN},
                             **overrides)
        runs = []
        for i in range(1 + args.repeats):
            e2e_gpu.sync()
            start = time.perf_counter()
            result = quantize(model, recipe, tokens, device=args.device, batch_size=e2e_gpu.BATCH)
            e2e_gpu.sync()
            if i:
                runs.append({"total": time.perf_counter() - start, **result.report.stage_seconds})
        rows[name] = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
        rows[name]["backend"] = result.state.backend
        rows[name]["gptq_fallbacks"] = sum(len(v) for v in result.report.gptq_fallback().values())
        print(name, json.dumps(rows[name]), flush=True)
    with open(os.path.join(args.out, f"option_cost_{args.device}.json"), "w") as fh:
        json.dump({"card": card, "layers": args.layers, "rows": rows}, fh, indent=1)
    print(f"\n## Option cost on {card} ({args.layers} layers of hidden {args.hidden}, {args.experts} experts; "
          f"{args.samples} x {e2e_gpu.SEQ_LEN} calibration tokens; median of {args.repeats}; seconds)\n")
    print("| option | weight search | calibration forward (observe) | whole quantize | backend | gptq fallbacks |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r.get('weights', 0):.3f} | {r.get('observe', 0):.3f} | {r['total']:.3f} | "
              f"{r['backend']} | {r['gptq_fallbacks'] if name == 'gptq' else '-'} |")


if __name__ == "__main__":
    main()
