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
"""

from __future__ import annotations

import argparse
import json
import math
import os
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


def quantize_all(dirs: dict[str, Path], work: Path, log, device: str = "cuda") -> list[dict]:
    from moequant.quantize_command import quantize_model
    from moequant.verify import verify

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
                contract = verify(out, engine="vllm")
                job["contract"] = contract.ok
                job["contract_summary"] = contract.summary()[-600:]
            except ROW_ERRORS as err:
                job["error"] = f"quantize: {type(err).__name__}: {err}"
            job["quantize_s"] = round(time.perf_counter() - t, 1)
            log(f"{name} {recipe} {fmt}: {job.get('error', 'exported')} ({job['quantize_s']} s)")
            jobs.append(job)
    return jobs


def heldout_ids(model_dir: str) -> torch.Tensor:
    from moequant.calibration_data import load_tokenizer
    from moequant.evaluate import eval_windows

    return eval_windows(load_tokenizer(model_dir), None, WINDOWS, SEQ_LEN)[0]


def vllm_job(ckpt: str, ids_path: str, result_path: str, topk: int) -> None:
    """One checkpoint in vLLM (own process): load, greedy generation, prompt log-probs. Writes a .pt."""
    from vllm import LLM, SamplingParams

    ids = torch.load(ids_path)
    t = time.perf_counter()
    llm = LLM(model=ckpt, skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.1,
              kv_cache_memory_bytes=2 << 30, max_model_len=2048, max_logprobs=topk, seed=0)
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
            stem = Path(j["ckpt"]).name
            j["ids"], j["result"], j["log"] = (str(work / f"{stem}.ids.pt"), str(work / f"{stem}.vllm.pt"),
                                               str(work / f"{stem}.vllm.log"))
            torch.save(heldout_ids(j["model_dir"]), j["ids"])
            j["topk"] = 256 if j["model"] != "builtin" else TOPK_BIG
            cmd = [sys.executable, __file__, "vllm", j["ckpt"], j["ids"], j["result"], str(j["topk"])]
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
            log(f"{Path(j['ckpt']).name}: vLLM {'ok' if 'error' not in j else j['error']} ({j['vllm_s']} s)")


@torch.no_grad()
def _our_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model(w[None].to(device)).logits[0, :-1].float().log_softmax(-1).cpu() for w in ids])


@torch.no_grad()
def compare(job: dict, device: str = "cuda") -> None:
    """Our fake-quant forward of the same checkpoint in vLLM's mode vs vLLM's prompt log-probs."""
    from moequant.fake_quant_model import load_fake_quantized, load_original

    ids = torch.load(job["ids"])
    v = torch.load(job["result"])
    target = ids[:, 1:].reshape(-1)
    original = load_original(job["model_dir"], device)
    job["ppl_unquantized"] = math.exp(float(-_our_logprobs(original, ids).gather(-1, target[:, None]).mean()))
    del original
    activations = job["format"] == "compressed-tensors"   # FP8 W8A8 runs as such; NVFP4 on Hopper is W4A16
    ours = _our_logprobs(load_fake_quantized(job["model_dir"], job["ckpt"], device, activations=activations), ids)
    job["mode"] = "W8A8 (static per-tensor)" if activations else "W4A16 (Marlin; input scales unused)"
    q_top = ours.gather(-1, v["top_ids"])
    p_top = v["top_lp"].exp()
    kl = (p_top * (v["top_lp"] - q_top.double())).sum(-1)
    p_rest = (1 - p_top.sum(-1)).clamp_min(0)
    q_rest = (1 - q_top.double().exp().sum(-1)).clamp_min(1e-30)
    kl = kl + torch.where(p_rest > 1e-12, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), 0.0)
    job["kl_mean"] = float(kl.mean())
    job["kl_max"] = float(kl.max())
    job["kl_exact"] = v["top_ids"].shape[1] >= ours.shape[1]
    job["top1_agree"] = float((ours.argmax(-1) == v["top1"]).double().mean())
    job["ppl_vllm"] = math.exp(float(-v["tok_lp"].mean()))
    job["ppl_ours"] = math.exp(float(-ours.gather(-1, target[:, None]).mean()))
    job["tok_lp_absdiff_mean"] = float((v["tok_lp"] - ours.gather(-1, target[:, None])[:, 0].double()).abs().mean())
    job["tokens_per_s"], job["load_s"] = v["tokens_per_s"], v["load_s"]


def table(jobs: list[dict]) -> str:
    head = ("| model | format (recipe) | loads | compared as | mean KL (vLLM‖ours) | top-1 agree | ppl vLLM | "
            "ppl ours | ppl unquantized | tokens/s |")
    rows = [head, "|" + " --- |" * 10]
    for j in jobs:
        ok = "error" not in j and "kl_mean" in j
        loads = "y" if "result" in j and Path(j["result"]).is_file() else "n"
        if ok:
            kl = f"{j['kl_mean']:.5f}{'' if j['kl_exact'] else ' (top-20 bound)'}"
            rows.append(f"| {j['model']} | {j['format']} ({j['recipe']}) | {loads} | {j['mode']} | {kl} | "
                        f"{100 * j['top1_agree']:.2f}% | {j['ppl_vllm']:.3f} | {j['ppl_ours']:.3f} | "
                        f"{j['ppl_unquantized']:.3f} | {j['tokens_per_s']:.0f} |")
        else:
            rows.append(f"| {j['model']} | {j['format']} ({j['recipe']}) | {loads} | {j.get('error', '?')[:300]} "
                        "| | | | | | |")
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


def run_all(work: Path, out_dir: Path, parallel: int, names: list[str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(*args):
        msg = " ".join(str(a) for a in args)
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.perf_counter()
    jobs = quantize_all(models(work, log, names), work, log)
    log(f"built and quantized in {time.perf_counter() - t0:.0f} s")
    run_vllm(jobs, work, parallel, log)
    for j in jobs:
        if "error" in j:
            continue
        try:
            compare(j)
        except ROW_ERRORS as err:
            j["error"] = f"compare: {type(err).__name__}: {err}"
            log(traceback.format_exc()[-1500:])
    report = f"{json.dumps(versions())}\n\n{table(jobs)}\n"
    print(report, flush=True)
    tag = "-".join(names)
    (out_dir / f"engine_check-{tag}.md").write_text(report)
    (out_dir / f"engine_check-{tag}.json").write_text(json.dumps({"versions": versions(), "jobs": jobs}, indent=1))
    logs = []
    for j in jobs:
        if "log" in j and Path(j["log"]).is_file():
            text = Path(j["log"]).read_text(errors="replace").splitlines()
            logs += [f"===== {Path(j['ckpt']).name}"] + [ln for ln in text if "WARN" in ln or "rror" in ln][-40:]
    (out_dir / f"engine_check_logs-{tag}.txt").write_text("\n".join(lines + logs)[-4_000_000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("--work", type=Path, default=Path("/tmp/ec"))
    a.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/ec_out")))
    a.add_argument("--parallel", type=int, default=3)
    a.add_argument("--models", default=",".join([*SIZES, "builtin"]), help="comma-separated: %(default)s")
    v = sub.add_parser("vllm")
    v.add_argument("ckpt")
    v.add_argument("ids")
    v.add_argument("result")
    v.add_argument("topk", type=int)
    args = parser.parse_args()
    if args.cmd == "all":
        run_all(args.work, args.out, args.parallel, args.models.split(","))
    else:
        vllm_job(args.ckpt, args.ids, args.result, args.topk)


if __name__ == "__main__":
    main()
