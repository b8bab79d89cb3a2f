"""vLLM 0.26.0 serves what moequant ships (issue 15): load, generate, prompt log-probs vs our fake-quant (H200).

For tiny Qwen3-MoE, Mixtral (on-disk w1/w2/w3), DeepSeek-V3 (MLA) and Llama models, sized for vLLM's kernels
(hidden 256, expert intermediate 256, real MLA dims kv_lora_rank 512 / rope 64), and the built-in model
(``moequant.demo``, when its GGUF is installed), each quantized by ``moequant.quantize_command.quantize_model`` (what
``moequant quantize`` runs) twice:
  * ``nvfp4-mse`` exported as ModelOpt-HF (W4A4 on disk; on Hopper vLLM runs NVFP4 as Marlin W4A16 and ignores
    the input scales, so our side is compared weights-only: ``load_fake_quantized(..., activations=False)``);
  * ``fp8`` exported as compressed-tensors (W8A8 static per-tensor; our side with FP8 activation fake-quant).
Each checkpoint goes to vLLM's offline ``LLM(path)`` with no quantization flag, in its own process (a few at a
time on the one GPU): greedy generation (tokens/s) and prompt log-probs (top ``k``) on held-out windows (the
State of the Union speeches from 2001 on; tiny models have a byte-level tokenizer of 256 tokens, so their
"text" is the same speeches as bytes and their perplexities say nothing about language).
Per checkpoint: loads, mean KL(vLLM || ours) and top-1 agreement over next-token distributions, perplexity
under vLLM, ours, and the unquantized model (float32, transformers), tokens/s.
KL is exact when ``k`` covers the vocabulary (tiny models); otherwise over vLLM's top ``k`` plus one bucket
for the rest of the mass, a lower bound of the full KL (coarse-graining never increases KL).

    python3 bench/engine_check.py all --work /tmp/ec --out $OUT          # on the GPU machine, vLLM installed

How it ran (2026-12-04, docs/engines.md has the table): ``bench/vllm_carry.py`` carried vLLM 0.26.0 (wheel without
FA2 and the Rust frontend), the 26 wheels its offline path imports that the image lacks, and the GGUF in five
59 MiB parts over consecutive warm calls; then, with ``PYTHONPATH=/tmp/site:src``,
``--models qwen3_moe,mixtral,deepseek_v3,llama --parallel 4`` (149 s) and ``--models builtin --parallel 2`` (182 s).
Second run (same day): ModelOpt's wheels joined the carried stream (five parts; the first two calls already ran
other benchmarks with what had arrived), then ``--models qwen3_moe,mixtral,deepseek_v3,llama --parallel 4 --w4a4``
(222 s) and ``--models builtin --parallel 3 --w4a4 --control`` (275 s, ModelOpt's calibration and export included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
WINDOWS, SEQ_LEN, TOPK_BIG = 8, 512, 20
GEN_PROMPT, GEN_NEW = 64, 128
FORMATS = (("nvfp4-mse", "modelopt"), ("fp8", "compressed-tensors"))
# how vLLM runs a checkpoint (engine arguments) and how our fake-quant reproduces it; NVFP4 on Hopper: Marlin W4A16
# by default, W4A4 through vLLM's emulation kernels when asked (kernels/linear/nvfp4/emulation.py,
# fused_moe/experts/nvfp4_emulation_moe.py: per-16 dynamic E4M3 activation block scales under the static global)
MODES = {"w4a16": ({}, False), "w8a8": ({}, True),
         "w4a4": ({"linear_backend": "emulation", "moe_backend": "emulation"}, True)}
MODE_LABEL = {"w4a16": "W4A16 (Marlin; input scales unused)", "w8a8": "W8A8 (static per-tensor)",
              "w4a4": "W4A4 (vLLM emulation backends)"}
ATTN = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=256,
            max_position_embeddings=2048, tie_word_embeddings=False)
SIZES = {  # overrides of tests/tiny_models.py: dims that Marlin (k % 128, n % 64), CUTLASS FP8 and MLA accept
    "qwen3_moe": dict(ATTN, intermediate_size=512, moe_intermediate_size=256),
    "mixtral": dict(ATTN, intermediate_size=256),
    "deepseek_v3": dict(ATTN, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=512,
                        moe_intermediate_size=256, q_lora_rank=256, kv_lora_rank=512, qk_rope_head_dim=64,
                        qk_nope_head_dim=128, v_head_dim=128, head_dim=64),
    "llama": dict(ATTN, intermediate_size=512),
}
# what a bench row catches, records with its exact message, and goes on past (third-party code raises all of these)
ROW_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError, KeyError, IndexError, AssertionError, OSError,
              ImportError, NotImplementedError)
# FlashInfer is not carried: without this switch vLLM 0.26.0's GPU sampler imports it unconditionally while loading
# (v1/sample/ops/topk_topp_sampler.py flashinfer_sampler_supported -> ModuleNotFoundError: No module named 'flashinfer')
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
            "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def byte_tokenizer():
    """A byte-level tokenizer of exactly 256 tokens (GPT-2's byte-to-character map, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(keep, chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = chr(chars[keep.index(10)])  # newline doubles as EOS between documents
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos)


def build_tiny(family: str, folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_models

    cls, config = tiny_models._configs()[family]
    for key, value in SIZES[family].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = cls(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():   # as tiny_models.build: every parameter gets real values
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    model.to(torch.bfloat16).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def models(work: Path, log, names: list[str]) -> dict[str, Path]:
    out = {}
    for family in [n for n in SIZES if n in names]:
        try:
            out[family] = build_tiny(family, work / "models" / family)
        except ROW_ERRORS as err:
            log(f"{family}: tiny model not built: {type(err).__name__}: {err}")
    from moequant import demo

    if "builtin" not in names:
        return out
    try:
        demo.gguf_path()
    except demo.DemoUnavailable as err:  # the GGUF was not carried: skip the built-in model, say so
        log(f"builtin: skipped ({err})")
        return out
    out["builtin"] = demo.builtin_model_dir(log=log)
    return out


def check_contract(job: dict, ckpt: Path) -> None:
    """``moequant verify --engine vllm`` on the checkpoint, recorded in the job."""
    from moequant.verify import verify

    contract = verify(ckpt, engine="vllm")
    job["contract"] = contract.ok
    job["contract_summary"] = contract.summary()[-600:]


def quantize_all(dirs: dict[str, Path], work: Path, log, device: str = "cuda") -> list[dict]:
    from moequant.quantize_command import quantize_model

    jobs = []
    for name, model_dir in dirs.items():
        for recipe, fmt in FORMATS:
            out = work / "ckpt" / f"{name}-{recipe}-{fmt}"
            job = {"model": name, "recipe": recipe, "format": fmt, "model_dir": str(model_dir), "ckpt": str(out)}
            t = time.perf_counter()
            try:
                outcome = quantize_model(model_dir, out, recipe, fmt, samples=16, seq_len=256, device=device,
                                         overwrite=True, progress=False, log=lambda *_: None)
                job["verify"] = outcome.verify.ok
                check_contract(job, out)
            except ROW_ERRORS as err:
                job["error"] = f"quantize: {type(err).__name__}: {err}"
            job["quantize_s"] = round(time.perf_counter() - t, 1)
            log(f"{name} {recipe} {fmt}: {job.get('error', 'exported')} ({job['quantize_s']} s)")
            jobs.append(job)
    return jobs


def modelopt_control(model_dir: Path, work: Path, log) -> dict:
    """The control: ModelOpt 0.47's own NVFP4 checkpoint of ``model_dir`` (its MSE recipe, ``bench/quality_peers.py``'s
    ``run_modelopt``, on the calibration windows ``quantize_all`` gives moequant: 16 x 256 tokens), through the same
    vLLM runs and comparison; our fake-quant reads it as it reads any ModelOpt-HF checkpoint."""
    sys.path.insert(0, str(REPO / "bench"))
    import quality_peers as qp

    from moequant.calibration_data import calibration_tokens, load_tokenizer
    from moequant.recipe import CalibrationSpec

    out = work / "ckpt" / "builtin-modelopt-0.47-mse"
    job = {"model": "builtin", "recipe": "ModelOpt 0.47 MSE, control", "format": "modelopt", "model_dir": str(model_dir),
           "ckpt": str(out)}
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    try:
        calib = calibration_tokens(None, load_tokenizer(model_dir), samples=16, seq_len=256,
                                   seed=CalibrationSpec().seed).tokens
        args = argparse.Namespace(torch_dtype=torch.float32, device="cuda", model="moe", in_memory=False)
        _, _, notes = qp.run_modelopt("mse", Path(model_dir), calib, args, out)
        job["notes"] = notes
        check_contract(job, out)
    except ROW_ERRORS as err:
        job["error"] = f"ModelOpt: {type(err).__name__}: {err}"
    job["quantize_s"] = round(time.perf_counter() - t, 1)
    log(f"builtin ModelOpt control: {job.get('error', 'exported')} ({job['quantize_s']} s); "
        f"vLLM contract {'ok' if job.get('contract') else job.get('contract_summary', '?')}")
    return job


def heldout_ids(model_dir: str) -> torch.Tensor:
    from moequant.calibration_data import load_tokenizer
    from moequant.evaluate import eval_windows

    return eval_windows(load_tokenizer(model_dir), None, WINDOWS, SEQ_LEN)[0]


def vllm_job(ckpt: str, ids_path: str, result_path: str, topk: int, mode: str) -> None:
    """One checkpoint in vLLM (own process) in ``mode``: load, greedy generation, prompt log-probs. Writes a .pt."""
    from vllm import LLM, SamplingParams

    ids = torch.load(ids_path)
    t = time.perf_counter()
    llm = LLM(model=ckpt, skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.1,
              kv_cache_memory_bytes=2 << 30, max_model_len=2048, max_logprobs=topk, seed=0, **MODES[mode][0])
    load_s = time.perf_counter() - t
    prompts = [{"prompt_token_ids": w[:GEN_PROMPT].tolist()} for w in ids]
    greedy = SamplingParams(temperature=0.0, max_tokens=GEN_NEW, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:1], greedy, use_tqdm=False)   # warm-up
    t = time.perf_counter()
    gen = llm.generate(prompts, greedy, use_tqdm=False)
    gen_s = time.perf_counter() - t
    n_gen = sum(len(o.outputs[0].token_ids) for o in gen)
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=topk, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": w.tolist()} for w in ids], scoring, use_tqdm=False)
    top_ids, top_lp, tok_lp, top1 = [], [], [], []
    for w, o in zip(ids, outs):
        rows = list(o.prompt_logprobs)[1:]
        for pos, row in enumerate(rows, start=1):
            items = sorted(row.items(), key=lambda kv: kv[1].rank)
            best = [(tid, lp.logprob) for tid, lp in items if lp.rank <= topk][:topk]
            top_ids.append([tid for tid, _ in best])
            top_lp.append([v for _, v in best])
            tok_lp.append(row[int(w[pos])].logprob)
            top1.append(next(tid for tid, lp in items if lp.rank == 1))
    torch.save({"load_s": load_s, "tokens_per_s": n_gen / gen_s, "gen_tokens": n_gen,
                "greedy": [list(o.outputs[0].token_ids) for o in gen],
                "top_ids": torch.tensor(top_ids), "top_lp": torch.tensor(top_lp, dtype=torch.float64),
                "tok_lp": torch.tensor(tok_lp, dtype=torch.float64), "top1": torch.tensor(top1)}, result_path)


def run_vllm(jobs: list[dict], work: Path, parallel: int, log) -> None:
    pending = [j for j in jobs if "error" not in j]
    running = []
    env = dict(os.environ, **VLLM_ENV)
    while pending or running:
        while pending and len(running) < parallel:
            j = pending.pop(0)
            stem = stem_of(j)
            j["ids"], j["result"], j["log"] = (str(work / f"{stem}.ids.pt"), str(work / f"{stem}.vllm.pt"),
                                               str(work / f"{stem}.vllm.log"))
            torch.save(heldout_ids(j["model_dir"]), j["ids"])
            j["topk"] = 256 if j["model"] != "builtin" else TOPK_BIG
            cmd = [sys.executable, __file__, "vllm", j["ckpt"], j["ids"], j["result"], str(j["topk"]), j["mode"]]
            running.append((j, subprocess.Popen(cmd, env=env, stdout=open(j["log"], "w"), stderr=subprocess.STDOUT),
                            time.perf_counter()))
        time.sleep(1)
        for item in list(running):
            j, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            j["vllm_s"] = round(time.perf_counter() - t0, 1)
            if proc.returncode != 0 or not Path(j["result"]).is_file():
                tail = Path(j["log"]).read_text(errors="replace").strip().splitlines()[-25:]
                errs = [ln for ln in tail if "Error" in ln or "error" in ln] or tail[-3:]
                j["error"] = f"vllm (rc {proc.returncode}): " + " | ".join(errs[-3:])[-900:]
            log(f"{stem_of(j)}: vLLM {'ok' if 'error' not in j else j['error']} ({j['vllm_s']} s)")


def stem_of(job: dict) -> str:
    return f"{Path(job['ckpt']).name}-{job['mode']}"


def with_modes(jobs: list[dict], w4a4: bool) -> list[dict]:
    """One vLLM run per checkpoint and mode: FP8 as W8A8; NVFP4 as W4A16 (Marlin) and, with ``w4a4``, also W4A4
    through vLLM's emulation backends."""
    out = []
    for j in jobs:
        modes = ["w8a8"] if j["format"] == "compressed-tensors" else ["w4a16"] + (["w4a4"] if w4a4 else [])
        out += [dict(j, mode=m) for m in modes]
    return out


def max_over_experts(src: Path, dst: Path) -> int:
    """A copy of ``src`` whose per-expert ``input_scale`` tensors hold their layer's max (w1/w3 and w2 apart): what
    vLLM 0.26.0 runs when a MoE backend reduces them (FP8: ``process_fp8_input_tensor_strategy_moe``; NVFP4
    emulation: ``convert_to_nvfp4_moe_kernel_format``). Returns how many groups it reduced (0: nothing to reduce)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    reduced = 0
    for f in sorted(dst.glob("*.safetensors")):
        tensors, groups = load_file(f), {}
        for k in tensors:
            if ".experts." in k and k.endswith(".input_scale"):
                head, _, rest = k.partition(".experts.")
                side = "w2" if rest.split(".")[1] in ("down_proj", "w2") else "w13"
                groups.setdefault((head, side), []).append(k)
        reduced += len(groups)
        for keys in groups.values():
            top = torch.stack([tensors[k].float().reshape(()) for k in keys]).max()
            for k in keys:
                tensors[k] = top.reshape(tensors[k].shape).to(tensors[k].dtype).clone()
        save_file(tensors, f, metadata={"format": "pt"})
    return reduced


@torch.no_grad()
def _our_logprobs(model, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = model.to(dtype)
    device = next(model.parameters()).device
    return torch.cat([model(w[None].to(device)).logits[0, :-1].float().log_softmax(-1).cpu() for w in ids])


def _distance(v: dict, ours: torch.Tensor, target: torch.Tensor) -> dict:
    """KL(vLLM || ours) per position (exact when vLLM's top k covers the vocabulary, else over the top k plus one
    bucket for the rest: a lower bound), top-1 agreement, our perplexity."""
    q_top = ours.gather(-1, v["top_ids"]).double()
    p_top = v["top_lp"].exp()
    kl = (p_top * (v["top_lp"] - q_top)).sum(-1)
    p_rest = (1 - p_top.sum(-1)).clamp_min(0)
    q_rest = (1 - q_top.exp().sum(-1)).clamp_min(1e-30)
    kl = kl + torch.where(p_rest > 1e-12, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), 0.0)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agree": float((ours.argmax(-1) == v["top1"]).double().mean()),
            "ppl": math.exp(float(-ours.gather(-1, target[:, None]).mean()))}


@torch.no_grad()
def compare(job: dict, work: Path, device: str = "cuda") -> None:
    """Our fake-quant forward of the same checkpoint vs vLLM's prompt log-probs, in vLLM's mode, three ways:
    ``fp32`` (our reference: float32, per-expert input scales as shipped), ``bf16`` (vLLM's dtype) and ``same``:
    bf16 with the MoE input scales reduced to their max over experts where vLLM reduces them (W8A8 and W4A4
    MoE; otherwise ``same`` is ``bf16``)."""
    from moequant.fake_quant_model import load_fake_quantized, load_original

    ids = torch.load(job["ids"])
    v = torch.load(job["result"])
    target = ids[:, 1:].reshape(-1)
    original = load_original(job["model_dir"], device)
    job["ppl_unquantized"] = math.exp(float(-_our_logprobs(original, ids).gather(-1, target[:, None]).mean()))
    del original
    activations = MODES[job["mode"]][1]
    job["compared_as"] = MODE_LABEL[job["mode"]]
    ckpt = Path(job["ckpt"])
    job["vs"] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = _our_logprobs(load_fake_quantized(job["model_dir"], ckpt, device, activations=activations), ids, dtype)
        job["vs"][name] = _distance(v, ours, target)
    job["vs"]["same"] = job["vs"]["bf16"]
    maxed = work / f"{stem_of(job)}-max-over-experts"
    if activations and max_over_experts(ckpt, maxed):
        ours = _our_logprobs(load_fake_quantized(job["model_dir"], maxed, device, activations=True), ids,
                             torch.bfloat16)
        job["vs"]["same"] = _distance(v, ours, target)
        job["same_note"] = "bf16, input scales max over experts"
    shutil.rmtree(maxed, ignore_errors=True)
    job["kl_exact"] = v["top_ids"].shape[1] >= ours.shape[1]
    job["ppl_vllm"] = math.exp(float(-v["tok_lp"].mean()))
    job["tokens_per_s"], job["load_s"] = v["tokens_per_s"], v["load_s"]


def table(jobs: list[dict]) -> str:
    head = ("| model | format (recipe) | loads | compared as | KL (vLLM‖ours fp32) | top-1 | KL (vLLM‖ours same mode) | "
            "top-1 | ppl vLLM | ppl ours fp32 | ppl ours same mode | ppl unquantized | tokens/s |")
    rows = [head, "|" + " --- |" * 13]
    for j in jobs:
        ok = "error" not in j and "vs" in j
        loads = "y" if "result" in j and Path(j["result"]).is_file() else "n"
        if ok:
            bound = "" if j["kl_exact"] else " (top-20 bound)"
            f32, same = j["vs"]["fp32"], j["vs"]["same"]
            rows.append(f"| {j['model']} | {j['format']} ({j['recipe']}) | {loads} | {j['compared_as']} | "
                        f"{f32['kl_mean']:.5f}{bound} | {100 * f32['top1_agree']:.2f}% | "
                        f"{same['kl_mean']:.5f}{bound} | {100 * same['top1_agree']:.2f}% | {j['ppl_vllm']:.3f} | "
                        f"{f32['ppl']:.3f} | {same['ppl']:.3f} | {j['ppl_unquantized']:.3f} | "
                        f"{j['tokens_per_s']:.0f} |")
        else:
            rows.append(f"| {j['model']} | {j['format']} ({j['recipe']}) | {loads} | {j.get('mode', '?')}: "
                        f"{j.get('error', '?')[:300]} |" + " |" * 9)
    return "\n".join(rows)


def versions() -> dict:
    import importlib.metadata as md

    out = {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for dist in ("vllm", "torch", "transformers", "triton", "compressed-tensors", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def run_all(work: Path, out_dir: Path, parallel: int, names: list[str], w4a4: bool, control: bool) -> None:
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(*args):
        msg = " ".join(str(a) for a in args)
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.perf_counter()
    dirs = models(work, log, names)
    jobs = quantize_all(dirs, work, log)
    if control and "builtin" in dirs:
        jobs.append(modelopt_control(dirs["builtin"], work, log))
    jobs = with_modes(jobs, w4a4)
    log(f"built and quantized in {time.perf_counter() - t0:.0f} s")
    run_vllm(jobs, work, parallel, log)
    for j in jobs:
        if "error" in j:
            continue
        try:
            compare(j, work)
        except ROW_ERRORS as err:
            j["error"] = f"compare: {type(err).__name__}: {err}"
            log(traceback.format_exc()[-1500:])
    report = f"{json.dumps(versions())}\n\n{table(jobs)}\n"
    print(report, flush=True)
    tag = "-".join(names) + ("-w4a4" if w4a4 else "") + ("-control" if control else "")
    (out_dir / f"engine_check-{tag}.md").write_text(report)
    (out_dir / f"engine_check-{tag}.json").write_text(json.dumps({"versions": versions(), "jobs": jobs}, indent=1))
    logs = []
    for j in jobs:
        if "log" in j and Path(j["log"]).is_file():
            text = Path(j["log"]).read_text(errors="replace").splitlines()
            logs += [f"===== {stem_of(j)}"] + [ln for ln in text if "WARN" in ln or "rror" in ln or "backend" in ln
                                                 or "Using" in ln][-40:]
    (out_dir / f"engine_check_logs-{tag}.txt").write_text("\n".join(lines + logs)[-4_000_000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("--work", type=Path, default=Path("/tmp/ec"))
    a.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/ec_out")))
    a.add_argument("--parallel", type=int, default=3)
    a.add_argument("--models", default=",".join([*SIZES, "builtin"]), help="comma-separated: %(default)s")
    a.add_argument("--w4a4", action="store_true", help="also run every NVFP4 checkpoint as W4A4 through vLLM's "
                   "emulation backends (linear_backend=moe_backend='emulation')")
    a.add_argument("--control", action="store_true", help="add ModelOpt 0.47's checkpoint of the built-in model "
                   "(needs modelopt importable; see bench/quality_peers.py)")
    v = sub.add_parser("vllm")
    v.add_argument("ckpt")
    v.add_argument("ids")
    v.add_argument("result")
    v.add_argument("topk", type=int)
    v.add_argument("mode", choices=tuple(MODES))
    args = parser.parse_args()
    if args.cmd == "all":
        run_all(args.work, args.out, args.parallel, args.models.split(","), args.w4a4, args.control)
    else:
        vllm_job(args.ckpt, args.ids, args.result, args.topk, args.mode)


if __name__ == "__main__":
    main()
