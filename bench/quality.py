"""Quality of the NVFP4 weight-calibration options on real trained weights (SmolLM2-135M and its 8-expert
upcycle, both from ``moequant.demo.builtin_model_dir``).

Calibration: 64 x 512 tokens of the State of the Union speeches up to 2000 (the built-in calibration text);
evaluation: 8 x 512 tokens of the speeches from 2001 on (``moequant.evaluate.evaluate`` on the exported
ModelOpt checkpoint: perplexity and mean KL(original || quantized) of next-token distributions).

One calibration forward serves every option: ``quantize(model, "nvfp4-best")`` observes the activations (input
amax and, for weighted_mse, per-channel mean squares) on the unquantized model, which no weight option
changes; every other option then re-runs only the data-free weight calibration (``calibrate_weights``) on
the same plan and takes the same input scales, which is exactly what ``quantize`` with its own recipe would
produce. Seconds: the weight search of each option; the shared forward (with best's weight search) once.
Weight error: sum of squared weight errors / sum of squared weights over every quantized tensor (unweighted,
so options are comparable).

    nice -n 10 python3 bench/quality.py --model moe --options max,mse,best
    python3 bench/quality.py --model moe --device cuda          # the model on the GPU, Triton searches
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from moequant import calibrate_weights, load_recipe, quantize
from moequant.data import load_tokenizer
from moequant.demo import builtin_model_dir
from moequant.evaluate import evaluate
from moequant.export import export
from moequant.run import load_model
from moequant.state import QuantState

# name -> (recipe it stands for, calibrate_weights options or None for the shared nvfp4-best run)
OPTIONS = {
    "max": ("nvfp4", {"method": "max"}),
    "mse": ("nvfp4-mse", {"method": "mse"}),
    "max+4over6": ("nvfp4", {"method": "max", "four_over_six": True}),
    "mse+global": ("nvfp4-mse", {"method": "mse", "global_search": True}),
    "best": ("nvfp4-best", None),  # weighted_mse
    "w4a16-mse": ("nvfp4-w4a16", {"method": "mse"}),
    "w4a16-best": ("nvfp4-best", None),
}
CALIB = {"samples": 64, "seq_len": 512}


def weight_error(state: QuantState) -> float:
    err = sum(float(s.sq_error.sum()) for s in state.tensors.values())
    norm = sum(float(s.sq_norm.sum()) for s in state.tensors.values())
    return err / norm


def option_state(model, shared: QuantState, name: str, backend: str = "torch") -> tuple[QuantState, float]:
    """The state of option ``name``: its own weight scales, the shared run's input scales (none for W4A16)."""
    _, weight_options = OPTIONS[name]
    start = time.perf_counter()
    if weight_options is None:
        tensors = dict(shared.tensors)
    else:
        own = calibrate_weights(model, shared.plan, backend=backend, **weight_options)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tensors = {k: replace(s, input_scale=shared.tensors[k].input_scale) for k, s in own.tensors.items()}
    if name.startswith("w4a16"):
        tensors = {k: replace(s, input_scale=None) for k, s in tensors.items()}
    method = weight_options["method"] if weight_options else shared.method
    return QuantState(shared.plan, tensors, shared.backend, method), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("dense", "moe"), default="moe")
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (64 for the table)")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows (8 for the table)")
    parser.add_argument("--device", default="cpu", help="cpu (torch backend) or cuda (Triton where it exists)")
    args = parser.parse_args()
    backend = "torch" if args.device == "cpu" else "auto"
    CALIB["samples"] = args.samples
    model_dir = builtin_model_dir(dense=args.model == "dense")
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"# {args.model} {model_dir.name}; {where}, torch {torch.__version__}", flush=True)
    model = load_model(model_dir).to(args.device)
    start = time.perf_counter()
    shared = quantize(model, load_recipe("nvfp4-best", calibration=CALIB), None, tokenizer=load_tokenizer(model_dir),
                      device=args.device, backend=backend)
    stages = ", ".join(f"{k} {v:.0f}" for k, v in shared.report.stage_seconds.items())
    print(f"# shared calibration forward + best's weight search: {time.perf_counter() - start:.0f} s ({stages})")
    print("| model | option | rel. weight sq. error | KL (nats/token) | perplexity | weight search s |")
    print("|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.options.split(","):
            state, seconds = option_state(model, shared.state, name, backend)
            recipe = load_recipe(OPTIONS[name][0], calibration=CALIB)
            if name.startswith("w4a16"):
                recipe = load_recipe(recipe, activations="none")
            out = Path(tmp) / name.replace("+", "_")
            export(model, state, out, format="modelopt", overwrite=True, source_dir=model_dir, recipe=recipe)
            ev = evaluate(model_dir, out, windows=args.windows, seq_len=512, device=args.device)
            seconds = f"{seconds:.{0 if args.device == 'cpu' else 2}f}" if OPTIONS[name][1] is not None \
                else "(in shared run)"
            print(f"| {args.model} | {name} | {weight_error(state):.5f} | {ev.kl_mean:.4f} | {ev.ppl_quantized:.2f} "
                  f"(original {ev.ppl_original:.2f}) | {seconds} |", flush=True)


if __name__ == "__main__":
    main()
