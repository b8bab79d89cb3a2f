"""Child process: quantize a model directory (streamed or in memory), print the peak RSS as JSON.

    memory_probe.py SRC OUT stream|memory [calibrated]

``calibrated``: W4A4 (input scales from bf16 calibration forwards on random token ids) instead of the data-free
W4A16 run; the forwards go through oneDNN, whose per-shape caches grew with depth until moequant bounded them."""

import json
import sys
import time
from pathlib import Path

import torch

from moequant.recipe import load_recipe


def main(src: str, out: str, mode: str, calibrated: str = "") -> None:
    torch.set_num_threads(1)
    recipe = load_recipe("nvfp4", weights={"method": "max"}, calibration={"samples": 16, "seq_len": 256}) \
        if calibrated else load_recipe("nvfp4-w4a16", weights={"method": "max"})
    vocab = json.loads((Path(src) / "config.json").read_text())["vocab_size"]
    calib = torch.randint(0, vocab, (16, 256), generator=torch.Generator().manual_seed(0)) if calibrated else None
    start = time.perf_counter()
    if mode == "stream":
        from moequant.layers.streamed import quantize_streamed

        quantize_streamed(src, out, recipe, calib=calib, max_shard_bytes=4 * 2**20)
    else:
        from moequant.export import export
        from moequant.layers.in_memory import quantize
        from moequant.quantize_command import load_model

        model = load_model(Path(src))
        export(model, quantize(model, recipe, calib).state, out, source_dir=src, recipe=recipe, max_shard_bytes=4 * 2**20)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the forking
    # parent's (pytest's) resident size whenever that is larger than this process's own peak.
    print(json.dumps({"peak_rss": int(status["VmHWM"].split()[0]) * 1024,
                      "vm_peak": int(status["VmPeak"].split()[0]) * 1024, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
