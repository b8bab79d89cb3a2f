#!/bin/bash
# Issue 14 probe, on the H200: does the compute thread slow beside the shard readers because of the GIL?
# The same 12-layer whole job (bench/whole_job.py, moequant only, warm page cache) under:
#   default (4 reader threads, switch interval 5 ms) | switch interval 0.2 ms | 1 reader thread,
# then once under py-spy (every thread, idle included) into $OUT/whole_job.speedscope.json.
# Needs py-spy carried: .whl_prof/py_spy-*.whl (git-ignored; carry=[".whl_prof"]).
set -e
OUT=${OUT:-/tmp/gil_probe}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/prof .whl_prof/*.whl
export PYTHONPATH=src PATH=/tmp/prof/bin:$PATH
W="python3 bench/whole_job.py --layers 12 --device cuda --tools moequant"
$W --repeats 2 --json "$OUT/default.json" | tail -4
$W --repeats 2 --switch-interval 0.0002 --json "$OUT/switch.json" | tail -2
MOEQUANT_READ_THREADS=1 $W --repeats 2 --json "$OUT/one_reader.json" | tail -2
py-spy record --subprocesses --threads --idle --rate 250 --format speedscope -o "$OUT/whole_job.speedscope.json" \
  -- $W --repeats 1 > "$OUT/pyspy_run.txt" 2>&1 || tail -5 "$OUT/pyspy_run.txt"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for name in ("default", "switch", "one_reader"):
    r = json.load(open(f"{out}/{name}.json"))
    for run in r["moequant_runs"]:
        steps = ", ".join(f"{k} {v:.2f}" for k, v in run["steps"].items())
        print(f"{name}: whole job {run['seconds']:.1f} s; {steps}")
PY
