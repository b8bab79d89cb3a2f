"""Quality of the NVFP4 weight-calibration options on real trained weights (SmolLM2-135M and its 8-expert
upcycle, both from ``moequant.demo.builtin_model_dir``).

Calibration: 64 x 512 tokens of the State of the Union speeches up to 2000 (the built-in calibration text);
evaluation: 32 x 512 tokens of the speeches from 2001 on by default (``moequant.evaluate.evaluate`` on the
exported ModelOpt checkpoint: perplexity and mean KL(original || quantized) of next-token distributions), with
a bootstrap 95% confidence interval over the windows (2000 resamples of the windows with replacement, the
same resamples for every option, percentile interval) of each perplexity, of its gap to the original, and of
the gap's change against "best" (paired: the same windows).

One calibration forward serves every option: ``quantize(model, "nvfp4-gptq")`` observes the activations (input
amax, per-channel mean squares and X^T X) on the unquantized model, which no weight option changes, and ships
weighted_mse's scales with GPTQ's codes; "best" (nvfp4-best) is the same scales with round-to-nearest codes
(``rounded_to_nearest``: what nvfp4-best ships, the scales being identical by construction, see
tests/test_gptq_layers.py); every other option re-runs only the data-free weight calibration
(``calibrate_weights``) on the same plan and takes the same input scales, which is exactly what ``quantize``
with its own recipe would produce. Seconds: the weight search of each option; the shared forward and weight
step once (with the GPTQ part timed apart). Weight error: sum of squared weight errors / sum of squared
weights over every quantized tensor (unweighted, so options are comparable).

    nice -n 10 python3 bench/quality.py --model moe --options best,gptq
    python3 bench/quality.py --model moe --device cuda          # the model on the GPU, Triton searches
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from moequant import calibrate_weights, kernels, load_recipe, quantize
from moequant.calibration_data import load_tokenizer
from moequant.demo import builtin_model_dir
from moequant.evaluate import evaluate
from moequant.export import export
from moequant.quantize_command import load_model
from moequant.scales import QuantState
from moequant.smoothing import fold

# name -> (recipe it stands for, calibrate_weights options or None for the shared nvfp4-best run)
OPTIONS = {
    "max": ("nvfp4", {"method": "max"}),
    "mse": ("nvfp4-mse", {"method": "mse"}),
    "max+4over6": ("nvfp4", {"method": "max", "four_over_six": True}),
    "mse+global": ("nvfp4-mse", {"method": "mse", "global_search": True}),
    "best": ("nvfp4-best", "rtn"),  # weighted_mse: the shared run's scales, round to nearest
    "gptq": ("nvfp4-gptq", None),   # the shared run
    "w4a16-mse": ("nvfp4-w4a16", {"method": "mse"}),
    "w4a16-best": ("nvfp4-best", "rtn"),
    "w4a16-gptq": ("nvfp4-gptq", None),
}
RESAMPLES = 2000
quantize_module = importlib.import_module("moequant.weights")
CALIB = {"samples": 64, "seq_len": 512}
SMOOTHING = {"enabled": False, "alpha": 0.5}   # --smoothing ALPHA: the product's channel smoothing (recipe key)
WEIGHTS = {}   # the shared run's recipe key weights where it differs from nvfp4-gptq's (--act-order)


def weight_error(state: QuantState) -> float:
    err = sum(float(s.sq_error.sum()) for s in state.tensors.values())
    norm = sum(float(s.sq_norm.sum()) for s in state.tensors.values())
    return err / norm


def rounded_to_nearest(model, state: QuantState) -> dict:
    """The state's scales with round-to-nearest codes (what nvfp4-best ships for gptq's scales)."""
    out = {}
    for t in state.plan.targets:
        s = state.tensors[t.key]
        w = quantize_module.canonical_weight(model, t).detach()
        gs, bs = s.global_scale.to(w.device), s.block_scale.to(w.device)   # a result's scales are on the host
        sq = kernels.weight_squared_error(w, gs, bs)
        sq = sq.reshape(sq.shape[0], -1).sum(-1) if t.kind == "experts" else sq.sum()
        out[t.key] = replace(s, method="weighted_mse", codes=kernels.pack_nvfp4(w, gs, bs).cpu(),
                             sq_error=sq.cpu(), gptq_status=None)
    return out


def option_state(model, shared: QuantState, name: str, backend: str = "torch") -> tuple[QuantState, float]:
    """The state of option ``name``: its own weight scales, the shared run's input scales (none for W4A16)."""
    _, weight_options = OPTIONS[name]
    start = time.perf_counter()
    if weight_options is None:
        tensors = dict(shared.tensors)
    elif weight_options == "rtn":
        tensors = rounded_to_nearest(model, shared)
    else:
        own = calibrate_weights(model, shared.plan, backend=backend, **weight_options)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tensors = {k: replace(s, input_scale=shared.tensors[k].input_scale) for k, s in own.tensors.items()}
    if name.startswith("w4a16"):
        tensors = {k: replace(s, input_scale=None) for k, s in tensors.items()}
    method = weight_options["method"] if isinstance(weight_options, dict) else \
        "weighted_mse" if weight_options == "rtn" else shared.method
    return (QuantState(shared.plan, tensors, shared.backend, method, smoothing=shared.smoothing),
            time.perf_counter() - start)


def bootstrap(nll_o: torch.Tensor, nll_q: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple]]:
    """Per option: (point, low, high) of the quantized perplexity, the gap to the original and, against "best"
    when present, the gap's change and its relative change; plus the original's, under key "original"."""
    windows = nll_o.numel()
    idx = torch.randint(0, windows, (RESAMPLES, windows), generator=torch.Generator().manual_seed(0))
    ppl_o, ppl_o_r = math.exp(float(nll_o.mean())), nll_o[idx].mean(1).exp()
    out = {"original": {"ppl": _ci(ppl_o, ppl_o_r)}}
    gaps = {}
    for name, nll in nll_q.items():
        ppl, ppl_r = math.exp(float(nll.mean())), nll[idx].mean(1).exp()
        gaps[name] = (ppl - ppl_o, ppl_r - ppl_o_r)
        out[name] = {"ppl": _ci(ppl, ppl_r), "gap": _ci(*gaps[name])}
    for name, (gap, gap_r) in gaps.items():
        base = "w4a16-best" if name.startswith("w4a16") else "best"
        if base in gaps and name != base:
            out[name]["vs_best"] = _ci(gap - gaps[base][0], gap_r - gaps[base][1])
            out[name]["cut"] = _ci(1 - gap / gaps[base][0], 1 - gap_r / gaps[base][1])
    return out


def _ci(point: float, samples: torch.Tensor) -> tuple[float, float, float]:
    low, high = torch.quantile(samples.to(torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, low, high


def _fmt(ci: tuple, digits: int = 2) -> str:
    return f"{ci[0]:.{digits}f} [{ci[1]:.{digits}f}, {ci[2]:.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("dense", "moe"), default="moe")
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (64 for the table)")
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens (>= 32)")
    parser.add_argument("--device", default="cpu", help="cpu (torch backend) or cuda (Triton where it exists)")
    parser.add_argument("--inputs", choices=("original", "quantized"), default="original",
                        help="each layer calibrated on the original model's layer inputs (moequant's choice) or on "
                             "those of the already-quantized earlier layers, W4A4 (bench/quantized_inputs.py)")
    parser.add_argument("--nll-out", type=Path, default=None,
                        help="save every option's per-window NLL (and the original's) here, for paired comparisons "
                             "across runs (bench/quality.py --compare A B)")
    parser.add_argument("--compare", type=Path, nargs=2, default=None, metavar=("A", "B"),
                        help="paired bootstrap of two --nll-out files' options (same windows); no run")
    parser.add_argument("--baseline", default=None,
                        help="with --compare: compare every option of B against this option of A")
    parser.add_argument("--smoothing", type=float, default=None, metavar="ALPHA",
                        help="the recipe key smoothing (enabled, this alpha) for every option: the shared run "
                             "smooths each layer; the other options search the same smoothed weights")
    parser.add_argument("--smoothing-down", choices=("on", "off"), default="off",
                        help="with --smoothing: also the down projections' inputs (recipe key smoothing.down, "
                             "default off)")
    parser.add_argument("--act-order", choices=("on", "off"), default=None,
                        help="the shared run's GPTQ column order (weights.act_order; default: nvfp4-gptq's, on): "
                             "by decreasing input energy, or off: in index order")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="another model directory (e.g. bench/smoothing.py's output) instead of the built-in one")
    args = parser.parse_args()
    if args.compare:
        _compare(*args.compare, args.baseline)
        return
    backend = "torch" if args.device == "cpu" else "auto"
    CALIB["samples"] = args.samples
    if args.smoothing is not None:
        SMOOTHING.update(enabled=True, alpha=args.smoothing, down=args.smoothing_down == "on")
    if args.act_order is not None:
        WEIGHTS["act_order"] = args.act_order == "on"
    model_dir = args.model_dir or builtin_model_dir(dense=args.model == "dense")
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"# {args.model} {model_dir.name}; {where}, torch {torch.__version__}", flush=True)
    model = load_model(model_dir).to(args.device)
    if args.inputs == "quantized":
        from quantized_inputs import quantized_inputs

        with quantized_inputs(activations=True):
            shared, gptq_seconds = _shared_run(model, model_dir, args.device, backend)
    else:
        shared, gptq_seconds = _shared_run(model, model_dir, args.device, backend)
    print(f"# layer inputs: {args.inputs}; smoothing: {SMOOTHING}; weights: {WEIGHTS}", flush=True)
    if shared.state.smoothing:   # the options' weights: the model smoothed as each layer was (same arithmetic)
        fold(model, "", [s for r in shared.state.smoothing for s in r.sites])
    rows, nll_q, nll_o = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.options.split(","):
            state, seconds = option_state(model, shared.state, name, backend)
            recipe = load_recipe(OPTIONS[name][0], calibration=CALIB,
                                 **({"smoothing": SMOOTHING} if SMOOTHING["enabled"] else {}))
            if name.startswith("w4a16"):
                recipe = load_recipe(recipe, activations="none")
            out = Path(tmp) / name.replace("+", "_")
            export(model, state, out, format="modelopt", overwrite=True, source_dir=model_dir, recipe=recipe)
            ev = evaluate(model_dir, out, windows=args.windows, seq_len=512, device=args.device)
            nll_o = torch.tensor(ev.window_nll_original, dtype=torch.float64)
            nll_q[name] = torch.tensor(ev.window_nll_quantized, dtype=torch.float64)
            shared_cost = f"(shared run; GPTQ step {gptq_seconds:.0f})" if name.endswith("gptq") else "(shared run)"
            seconds = shared_cost if OPTIONS[name][1] is None else f"{seconds:.{0 if args.device == 'cpu' else 2}f}"
            rows.append((name, weight_error(state), ev.kl_mean, seconds, ev.seconds))
            print(f"# {name}: ppl {ev.ppl_quantized:.3f}, KL {ev.kl_mean:.4f}, eval {ev.seconds:.0f} s", flush=True)
    _print_table(args.model, rows, bootstrap(nll_o, nll_q), args.windows)
    if args.nll_out is not None:
        torch.save({"original": nll_o, "inputs": args.inputs, **nll_q}, args.nll_out)


def _compare(a: Path, b: Path, baseline: str | None = None) -> None:
    """For each option in both files: perplexity gap in A and in B, and B's gap minus A's (paired windows). With
    ``baseline``: every option of B against A's ``baseline`` option. Two runs of one model share the original's
    NLLs; runs of two equivalent models (e.g. bench/smoothing.py's, equal up to float rounding) each measure their
    gap against their own original, on the same windows."""
    runs = [torch.load(p) for p in (a, b)]
    same_model = torch.equal(runs[0]["original"], runs[1]["original"])
    if not same_model and runs[0]["original"].numel() != runs[1]["original"].numel():
        raise SystemExit("the two runs were not evaluated on the same windows (different window counts)")
    n = runs[0]["original"].numel()
    idx = torch.randint(0, n, (RESAMPLES, n), generator=torch.Generator().manual_seed(0))

    def gap(run: dict, name: str) -> tuple[float, torch.Tensor]:
        nll_o, nll_q = run["original"], run[name]
        return (math.exp(float(nll_q.mean())) - math.exp(float(nll_o.mean())),
                nll_q[idx].mean(1).exp() - nll_o[idx].mean(1).exp())

    if not same_model:
        print("(different originals: each gap is against its own run's original, windows paired; original ppl "
              f"{math.exp(float(runs[0]['original'].mean())):.3f} vs {math.exp(float(runs[1]['original'].mean())):.3f})")
    print(f"| option (B) | gap in A ({baseline or 'same option'}, inputs {runs[0]['inputs']}) | gap in B (inputs "
          f"{runs[1]['inputs']}) | change [95% CI] | relative change [CI] |")
    print("|---|---|---|---|---|")
    for name in [k for k in runs[1] if k not in ("original", "inputs") and (baseline or k) in runs[0]]:
        (ga, ga_r), (gb, gb_r) = gap(runs[0], baseline or name), gap(runs[1], name)
        print(f"| {name} | {ga:.2f} | {gb:.2f} | {_fmt(_ci(gb - ga, gb_r - ga_r))} | "
              f"{_fmt(_ci(gb / ga - 1, gb_r / ga_r - 1), 3)} |")


def _shared_run(model, model_dir, device: str, backend: str):
    """``quantize(model, "nvfp4-gptq")`` with the GPTQ part of its weight step timed apart."""
    seconds = [0.0]
    plain = quantize_module.gptq_group

    def timed(*args):
        start = time.perf_counter()
        try:
            return plain(*args)
        finally:
            seconds[0] += time.perf_counter() - start

    quantize_module.gptq_group = timed
    start = time.perf_counter()
    try:
        recipe = load_recipe("nvfp4-gptq", calibration=CALIB, smoothing=SMOOTHING, **({"weights": WEIGHTS} if WEIGHTS else {}))
        shared = quantize(model, recipe, None,
                          tokenizer=load_tokenizer(model_dir), device=device, backend=backend)
    finally:
        quantize_module.gptq_group = plain
    stages = ", ".join(f"{k} {v:.0f}" for k, v in shared.report.stage_seconds.items())
    print(f"# shared run (nvfp4-gptq: calibration forward with X^T X, weighted search, GPTQ): "
          f"{time.perf_counter() - start:.0f} s ({stages}; of the weights stage, GPTQ {seconds[0]:.0f})")
    fallback = shared.report.gptq_fallback()
    print(f"# gptq fallbacks (round to nearest): {sum(len(v) for v in fallback.values())} expert/linear tensors "
          f"in {len(fallback)} targets: " + "; ".join(f"{k}: {v}" for k, v in list(fallback.items())[:6]), flush=True)
    return shared, seconds[0]


def _print_table(model: str, rows: list, ci: dict, windows: int) -> None:
    print(f"\nW = {windows} x 512 held-out tokens; [95% bootstrap CI over windows]; original perplexity "
          f"{_fmt(ci['original']['ppl'])}")
    print("| model | option | rel. weight sq. error | KL (nats/token) | perplexity | gap to original | "
          "gap vs best (paired) | gap cut vs best | weight search s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, err, kl, seconds, eval_s in rows:
        c = ci[name]
        vs = _fmt(c["vs_best"]) if "vs_best" in c else ""
        cut = f"{100 * c['cut'][0]:.0f}% [{100 * c['cut'][1]:.0f}%, {100 * c['cut'][2]:.0f}%]" if "cut" in c else ""
        print(f"| {model} | {name} | {err:.5f} | {kl:.4f} | {_fmt(c['ppl'])} | {_fmt(c['gap'])} | {vs} | {cut} | "
              f"{seconds} | {eval_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
