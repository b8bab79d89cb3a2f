#!/bin/bash
# Issue 14 on the lent H200, one call (~6-8 min): the 12-layer whole job of both tools (bench/whole_job.py, bytecode
# cached as an installed environment has it), one moequant run under py-spy (every thread; summary in
# $OUT/spy_summary.txt), and the streamed checkpoint compared byte for byte with --no-stream's.
# Carry .whl (ModelOpt 0.47 and its deps: docs/gpu-mse.md) and .whl_prof (py-spy).
# A dry run elsewhere: SIZE=small LAYERS=2 DEVICE=cpu SITE=/tmp/site-test bash bench/whole_job_h200.sh
set -o pipefail
OUT=${OUT:-/tmp/whole_job_h200}; SIZE=${SIZE:-30b-a3b}; LAYERS=${LAYERS:-12}; DEVICE=${DEVICE:-cuda}
SITE=${SITE:-/tmp/site}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl .whl_prof/*.whl || exit 1
export PYTHONPATH=$PWD/src:$SITE PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
python3 bench/whole_job.py --size "$SIZE" --layers "$LAYERS" --device "$DEVICE" --repeats 2 --bytecode-cache /tmp/pyc --json "$OUT/wj12.json" \
    2>&1 | tee "$OUT/wj12.log" | tail -12
M=/tmp/whole_job-$SIZE-$LAYERS
ARGS="quantize $M --recipe nvfp4-experts-only-mse --device $DEVICE --calib $M/calibration.txt --samples 16 --seq-len 512
      --kv-cache fp8-cast --quiet --overwrite"
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
py-spy record --nonblocking --threads --idle --rate 200 --format raw -o "$OUT/spy.txt" -- \
    python3 -m moequant.cli $ARGS -o /tmp/spyout > "$OUT/spy_run.log" 2>&1 || tail -3 "$OUT/spy_run.log"
python3 bench/spy_summary.py "$OUT/spy.txt" 12 > "$OUT/spy_summary.txt" 2>&1; gzip -f "$OUT/spy.txt"
python3 -m moequant.cli $ARGS -o /tmp/no-stream --no-stream > "$OUT/no_stream.log" 2>&1 || tail -3 "$OUT/no_stream.log"
n=0; bad=0
for f in "$M"-out-moequant/*.safetensors; do
    n=$((n + 1)); cmp -s "$f" "/tmp/no-stream/$(basename "$f")" || { bad=$((bad + 1)); echo "differs: $f"; }
done
echo "streamed vs --no-stream: $n shards, $bad differ"
python3 -c "import json; r = json.load(open('/tmp/spyout/moequant_report.json')); print(r['seconds']);
print({k: round(v, 2) for k, v in r['report']['stage_seconds'].items()})"
