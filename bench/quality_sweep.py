"""Issue 17's W4A4 levers side by side: each variant a `bench/quality.py` run on the same calibration tokens and
held-out windows, every option's gap paired against the unsmoothed `nvfp4-best` of the first variant ("base").

    PYTHONPATH=src python3 bench/quality_sweep.py --model moe --device cuda --out /tmp/sweep \
        [--variants "base=;s05=--smoothing 0.5;s05ao=--smoothing 0.5 --act-order"]

Each variant's run log and per-window NLLs (`--nll-out`) stay in --out; a variant whose NLL file exists there is
not run again (so a sweep cut short by a time limit resumes). The last lines printed are one table: per variant
and option, the W4A4 perplexity gap with its 95% bootstrap interval and the cut of base's `best` gap (paired over
the windows: each resample draws the same windows for both runs).
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import RESAMPLES, _ci, _fmt  # noqa: E402

# the sweep of docs/quality.md ("The W4A4 levers together"); ao = GPTQ's act order (nvfp4-gptq's default since),
# nodown = norm sites only (smoothing.down's default since)
DEFAULT = ("base=--options best,gptq --act-order off;"
           "ao=--options gptq;"
           "s05=--smoothing 0.5 --smoothing-down on --options best,gptq --act-order off;"
           "s05ao=--smoothing 0.5 --smoothing-down on --options gptq;"
           "s04ao=--smoothing 0.4 --smoothing-down on --options gptq;"
           "s03ao=--smoothing 0.3 --smoothing-down on --options gptq;"
           "s05ao-nodown=--smoothing 0.5 --smoothing-down off --options gptq;"
           "s06ao-nodown=--smoothing 0.6 --smoothing-down off --options gptq;"
           "s07ao-nodown=--smoothing 0.7 --smoothing-down off --options gptq")


def _variants(text: str) -> list[tuple[str, list[str]]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, _, flags = item.partition("=")
        out.append((name.strip(), shlex.split(flags)))
    if not out or out[0][0] != "base":
        raise SystemExit("the first variant must be 'base' (unsmoothed, with option best): the others pair with it")
    return out


def _run(name: str, flags: list[str], args) -> Path:
    nll = args.out / f"{args.model}-{name}-w{args.windows}.pt"
    if nll.is_file():
        return nll
    log = nll.with_suffix(".log")
    cmd = [sys.executable, str(HERE / "quality.py"), "--model", args.model, "--device", args.device,
           "--nll-out", str(nll), "--windows", str(args.windows), *flags]
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{name}: quality.py failed ({done.returncode}); last lines of {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-15:]))
    print(f"# {name}: {' '.join(flags)} ({time.perf_counter() - start:.0f} s)", flush=True)
    return nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("dense", "moe"), default="moe")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=DEFAULT, help="'name=quality.py flags;...', the first named base")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 512 tokens evaluated")
    parser.add_argument("--fresh", type=int, default=0, metavar="W",
                        help="the table uses only windows W.. (e.g. 32 with --windows 96: windows a sweep over the "
                             "first 32 never saw, to confirm a choice made on them)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = [(name, _run(name, flags, args)) for name, flags in _variants(args.variants)]
    runs = {name: {k: v[args.fresh:] if torch.is_tensor(v) else v for k, v in torch.load(path).items()}
            for name, path in files}
    base = runs["base"]
    n = base["original"].numel()
    idx = torch.randint(0, n, (RESAMPLES, n), generator=torch.Generator().manual_seed(0))

    def gap(run: dict, option: str) -> tuple[float, torch.Tensor]:
        o, q = run["original"], run[option]
        return math.exp(float(q.mean())) - math.exp(float(o.mean())), q[idx].mean(1).exp() - o[idx].mean(1).exp()

    g0, g0_r = gap(base, "best")
    print(f"\n{args.model}, {args.device}: original ppl {math.exp(float(base['original'].mean())):.2f}, "
          f"{n} windows (from window {args.fresh}); base best gap {_fmt(_ci(g0, g0_r))}")
    print("| variant | option | gap [95% CI] | cut of base best's gap [paired CI] |")
    print("|---|---|---|---|")
    for name, run in runs.items():
        if run["original"].numel() != n:
            raise SystemExit(f"{name}: evaluated on {run['original'].numel()} windows, base on {n}")
        for option in [k for k in run if k not in ("original", "inputs")]:
            g, g_r = gap(run, option)
            cut = "" if (name, option) == ("base", "best") else _fmt(_ci(1 - g / g0, 1 - g_r / g0_r), 3)
            print(f"| {name} | {option} | {_fmt(_ci(g, g_r))} | {cut} |")


if __name__ == "__main__":
    main()
