"""The whole job a user runs, end to end: ``moequant quantize`` (the CLI, a fresh process) vs ModelOpt 0.47 on
the same model files and tokens, beside the two I/O floors, in one run.

The model: a random Qwen3-MoE with Qwen3-30B-A3B layer dimensions (hidden 2048, 128 experts top-8,
moe_intermediate 768, 32/4 heads, head_dim 128, vocab 151936; ``--size small``: hidden 256, 16 experts top-4,
moe_intermediate 128, vocab 4096, for a CPU), ``--layers`` decoder layers, bf16, one safetensors shard per
decoder layer (+ one for the rest), per-expert tensors under the hub's names, a byte-level tokenizer and the
built-in calibration text. Built once into ``--dir`` (reused when its build file matches).

Rows:
  * floor read:  every tensor of every shard to ``--device`` with safetensors (page cache warm: second pass);
  * floor write: as many bytes as moequant's output, written in 64 MiB pieces and fsync'ed;
  * moequant:    ``moequant quantize DIR -o OUT --recipe nvfp4-experts-only-mse --kv-cache fp8-cast --device D
                 --calib FILE --samples 16 --seq-len 512 --quiet`` in a fresh process (import, quantize, export,
                 verify);
  * ModelOpt:    a fresh process: import, ``from_pretrained`` onto the device, ``mtq.quantize`` with its
                 ``general/ptq/nvfp4_experts_only_mse-kv_fp8_cast`` recipe over the same token windows (moequant's
                 ``calibration_tokens``, batches of 8), ``export_hf_checkpoint``. Only where modelopt imports.
Each row: seconds, GB/s of the bf16 model, ratio to the read+write floor, peak RSS (the process's VmHWM),
peak GPU memory (the CUDA allocator's peak). The table is printed last; ``--json`` writes the numbers.

    PYTHONPATH=src python3 bench/whole_job.py --size small --layers 8 --device cpu      # CPU
    PYTHONPATH=src:/tmp/site python3 bench/whole_job.py --layers 12 --device cuda       # H200 (ModelOpt in .whl)

Random weights: the numbers are about time and memory, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {  # hidden, experts, top-k, moe_intermediate, heads, kv heads, head_dim, vocab
    "30b-a3b": (2048, 128, 8, 768, 32, 4, 128, 151936),
    "small": (256, 16, 4, 128, 4, 2, 64, 4096),
}
RECIPE, MODELOPT_RECIPE = "nvfp4-experts-only-mse", "general/ptq/nvfp4_experts_only_mse-kv_fp8_cast"
SAMPLES, SEQ_LEN, BATCH = 16, 512, 8
BUILD_FILE = "whole_job_build.json"
BYTECODE_CACHE: list[str] = []   # --bytecode-cache DIR, for the children


# ------------------------------------------------------------------------------------------------ the model


def _config(size: str, layers: int):
    from transformers import Qwen3MoeConfig

    hidden, experts, top_k, inter, heads, kv_heads, head_dim, vocab = SIZES[size]
    return Qwen3MoeConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          head_dim=head_dim, vocab_size=vocab, num_hidden_layers=layers,
                          max_position_embeddings=4096, tie_word_embeddings=False, intermediate_size=inter * 8,
                          moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k,
                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, dtype="bfloat16")


def _tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer without merges (256 tokens + EOS): every text tokenizes, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(folder))


def _check_disk(folder: Path, config) -> None:
    """Stop before writing a model that, with the two tools' outputs (~0.4x each), would not fit: a full disk in
    the middle of the build costs a device call (it happened with a 24-layer model beside a 12-layer one)."""
    h, e, i = config.hidden_size, config.num_experts, config.moe_intermediate_size
    attn = h * (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim * 2
    need = 2 * config.num_hidden_layers * (3 * e * h * i + attn) + 2 * 2 * config.vocab_size * h
    need = int(need * 1.8)   # the model + both tools' NVFP4 outputs and the write floor's file
    free = shutil.disk_usage(folder.parent).free
    if free < need:
        others = sorted(str(d) for d in folder.parent.glob("whole_job-*") if d != folder)
        sys.exit(f"{folder.parent}: {free / 1e9:.0f} GB free, this run needs ~{need / 1e9:.0f} GB; delete earlier "
                 f"models first: {' '.join(others) or '(none of this bench found)'}")


def _window(pool: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """``n`` values of ``pool`` from ``start`` on, wrapping around: one new tensor of ``n`` values and no pool-sized
    temporary per tensor (a rolled copy per tensor fragmented glibc's heap: 24 GB for 12 layers of 128 small
    experts)."""
    out = torch.empty(n, dtype=pool.dtype)
    done = 0
    while done < n:
        take = min(n - done, pool.numel() - start)
        out[done:done + take] = pool[start:start + take]
        done, start = done + take, 0
    return out


def build(folder: Path, size: str, layers: int, seed: int = 0) -> int:
    """Write the model (see the module docstring); returns its bytes. Reused when already built alike."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    spec = {"size": size, "layers": layers, "seed": seed, "version": 3}
    stamp = folder / BUILD_FILE
    if stamp.is_file() and json.loads(stamp.read_text()).get("spec") == spec:
        return json.loads(stamp.read_text())["bytes"]
    shutil.rmtree(folder, ignore_errors=True)
    config = _config(size, layers)
    _check_disk(folder, config)
    folder.mkdir(parents=True)
    config.architectures = ["Qwen3MoeForCausalLM"]   # as a hub config.json has it (ModelOpt's export reads it)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    disk = revert_weight_conversion(model, dict(model.state_dict()))
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 22, generator=gen) * 0.02).to(torch.bfloat16)   # tensors are windows of it: fast
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, meta in disk.items():
        parts = name.split(".")
        key = f"layer-{int(parts[2]):05d}" if parts[:2] == ["model", "layers"] else "rest"
        if meta.ndim >= 2:
            start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
            t = _window(pool, -start % pool.numel(), meta.numel()).reshape(meta.shape)   # = pool.roll(start)
        else:
            t = torch.ones(meta.shape, dtype=torch.bfloat16)
        shards.setdefault(key, {})[name] = t
    weight_map, total = {}, 0
    for i, key in enumerate(sorted(shards)):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shards[key], str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shards[key]})
        total += sum(t.numel() * 2 for t in shards[key].values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    _tokenizer(folder)
    from moequant.calibration_data import builtin_text

    docs, size = [], 0
    for doc in builtin_text()[0]:   # ~200 k characters: a byte-level tokenizer makes every byte a token
        docs.append(doc)
        size += len(doc)
        if size >= 200_000:
            break
    (folder / "calibration.txt").write_text("\n\n".join(docs), encoding="utf-8")
    stamp.write_text(json.dumps({"spec": spec, "bytes": total}))
    return total


# ------------------------------------------------------------------------------------------------ floors


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def floor_read(folder: Path, device: str) -> float:
    """Seconds to bring every tensor of every shard to ``device`` (second of two passes: page cache warm)."""
    from safetensors import safe_open

    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt", device=device) as st:
                for name in st.keys():
                    st.get_tensor(name)
        _sync(device)
        seconds = time.perf_counter() - start
    return seconds


def floor_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to ``path`` in 64 MiB pieces, fsync'ed."""
    piece = os.urandom(1 << 26)
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(piece[: min(left, len(piece))])
            left -= len(piece)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


# ------------------------------------------------------------------------------------------------ the jobs


def _peaks(device: str) -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") and torch.cuda.is_initialized() else None
    return {"peak_rss": int(status["VmHWM"].split()[0]) * 1024, "peak_gpu": gpu}


def child_moequant(folder: Path, out: Path, device: str, profile: Path | None = None) -> dict:
    from moequant.cli import main

    if profile is not None:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    code = main(["quantize", str(folder), "-o", str(out), "--recipe", RECIPE, "--device", device,
                 "--calib", str(folder / "calibration.txt"), "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN),
                 "--kv-cache", "fp8-cast", "--quiet", "--overwrite"])
    if profile is not None:
        prof.disable()
        prof.dump_stats(str(profile))
    report = json.loads((out / "moequant_report.json").read_text())
    return {"exit": code, "stages": report["seconds"], "steps": report["report"]["stage_seconds"],
            "verify_ok": report["verify_ok"]}


def child_modelopt(folder: Path, out: Path, device: str, profile: Path | None = None) -> dict:
    t0 = time.perf_counter()
    import modelopt.torch.quantization as mtq
    from modelopt.recipe import load_recipe
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from moequant.calibration_data import calibration_tokens, load_tokenizer

    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, device_map=device)
    _sync(device)
    t2 = time.perf_counter()
    text = (folder / "calibration.txt").read_text(encoding="utf-8")
    tokens = calibration_tokens([text], load_tokenizer(folder), samples=SAMPLES, seq_len=SEQ_LEN, seed=0).tokens
    batches = [b.to(device) for b in tokens.split(BATCH)]

    def forward_loop(m):
        with torch.no_grad():
            for b in batches:
                m(input_ids=b, use_cache=False)

    mtq.quantize(model, load_recipe(MODELOPT_RECIPE).quantize, forward_loop)
    _sync(device)
    t3 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=str(out))
    t4 = time.perf_counter()
    return {"stages": {"import": t1 - t0, "load": t2 - t1, "quantize": t3 - t2, "export": t4 - t3}}


def run_child(tool: str, folder: Path, out: Path, device: str, profile: Path | None = None,
              switch_interval: float | None = None) -> dict:
    """One tool's whole job in a fresh process: wall seconds (from the process start) and its peaks."""
    start = time.perf_counter()
    extra = ["--profile", str(profile)] if profile is not None and tool == "moequant" else []
    if switch_interval is not None:
        extra += ["--switch-interval", str(switch_interval)]
    env = dict(os.environ)
    if BYTECODE_CACHE:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = BYTECODE_CACHE[0]
    proc = subprocess.run([sys.executable, __file__, "--child", tool, "--dir", str(folder), "--out-dir", str(out),
                           "--device", device, *extra], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1:] or ["exit " + str(proc.returncode)], "stderr_tail": lines[-25:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "seconds": wall, "out_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


# ------------------------------------------------------------------------------------------------ table


def _row(name: str, seconds: float, model_bytes: int, floor: float, peaks: dict | None = None) -> str:
    rss = f"{peaks['peak_rss'] / 2**30:.2f}" if peaks and peaks.get("peak_rss") else "-"
    gpu = f"{peaks['peak_gpu'] / 2**30:.2f}" if peaks and peaks.get("peak_gpu") else "-"
    return (f"| {name} | {seconds:.1f} | {model_bytes / seconds / 1e9:.2f} | {seconds / floor:.1f}x | {rss} | "
            f"{gpu} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="30b-a3b")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", type=Path, default=None, help="where the model is built (default: /tmp/whole_job-...)")
    p.add_argument("--tools", default="moequant,modelopt")
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--profile", type=Path, help="cProfile moequant's last (warm) run into this file (slows it a little)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each tool (the table shows the fastest)")
    p.add_argument("--bytecode-cache", type=Path, default=None, metavar="DIR",
                   help="let the children write and reuse compiled bytecode there (PYTHONPYCACHEPREFIX; "
                        "PYTHONDONTWRITEBYTECODE dropped), as an installed environment has it; with --repeats 2 "
                        "the first run of each tool fills it")
    p.add_argument("--switch-interval", type=float, default=None, metavar="S",
                   help="the children's sys.setswitchinterval (Python's GIL hand-over period, 0.005 by default): "
                        "probes whether the reader threads' GIL use slows the compute thread")
    p.add_argument("--child", choices=("moequant", "modelopt"), help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    folder = a.dir or Path(f"/tmp/whole_job-{a.size}-{a.layers}")
    if a.child:
        if a.switch_interval is not None:
            sys.setswitchinterval(a.switch_interval)
        job = child_moequant if a.child == "moequant" else child_modelopt
        result = job(folder, a.out_dir, a.device, a.profile)
        print(json.dumps({**result, **_peaks(a.device)}))
        return
    if a.bytecode_cache is not None:
        BYTECODE_CACHE.append(str(a.bytecode_cache))
    t = time.perf_counter()
    model_bytes = build(folder, a.size, a.layers)
    print(f"model: {folder} ({model_bytes / 1e9:.2f} GB, built/checked in {time.perf_counter() - t:.1f} s)",
          flush=True)
    results = {"model_bytes": model_bytes, "layers": a.layers, "size": a.size, "device": a.device}
    results["floor_read"] = floor_read(folder, a.device)
    for tool in a.tools.split(","):
        if tool == "modelopt" and subprocess.run([sys.executable, "-c", "import modelopt.torch.quantization"],
                                                 capture_output=True).returncode != 0:
            results[tool] = {"error": ["modelopt does not import here"]}
            continue
        runs = []
        for i in range(a.repeats):
            runs.append(run_child(tool, folder, folder.parent / f"{folder.name}-out-{tool}", a.device,
                                  a.profile if i == a.repeats - 1 else None, a.switch_interval))   # the warm run
            print(tool, json.dumps(runs[-1], indent=None if "error" not in runs[-1] else 1), flush=True)
        results[tool] = min(runs, key=lambda r: r.get("seconds", float("inf")))
        results[tool + "_runs"] = runs
    out_bytes = results.get("moequant", {}).get("out_bytes") or model_bytes // 3
    results["floor_write"] = floor_write(folder.parent / f"{folder.name}.floor", out_bytes)
    floor = results["floor_read"] + results["floor_write"]
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    card = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    bytecode = (f"cached in {a.bytecode_cache} (written by each tool's first run)" if a.bytecode_cache
                else "off: every process compiles its imports" if sys.flags.dont_write_bytecode else "on")
    print(f"\n{card}; {a.size} x {a.layers} layers, {model_bytes / 1e9:.2f} GB bf16; {SAMPLES} x {SEQ_LEN} tokens; "
          f"bytecode {bytecode}")
    print("| job | seconds | GB/s | x floor | peak RSS GiB | peak GPU GiB |\n|---|---|---|---|---|---|")
    print(_row("floor: read every tensor to the device", results["floor_read"], model_bytes, floor))
    print(_row("floor: write the output, fsync", results["floor_write"], model_bytes, floor))
    for tool in a.tools.split(","):
        r = results[tool]
        if "error" in r:
            print(f"| {tool} | failed: {r['error'][0][:120]} | | | | |")
        else:
            print(_row(f"{tool} (whole job)", r["seconds"], model_bytes, floor, r))
    for tool in a.tools.split(","):
        if "stages" in results[tool]:
            stages = results[tool]["stages"]
            rest = results[tool]["seconds"] - sum(stages.values())   # process start, imports, argument parsing
            print(f"{tool} stages: start+import {rest:.1f}s, " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
        if "steps" in results[tool]:
            print(f"{tool} inside quantize: " + ", ".join(f"{k} {v:.2f}s" for k, v in results[tool]["steps"].items()))


if __name__ == "__main__":
    main()
