"""``quantize_model``: the whole job, read top to bottom (the CLI only parses arguments and calls this).

    model dir -> streamed quantize + export, one decoder layer in memory, resumable (``layers/streamed.py``)
              (or, ``stream=False``: load the whole model -> quantize layer by layer -> export (atomic))
              -> verify
    -> summary + report.html + moequant_report.json in the output directory
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch

from moequant.calibration_data import load_tokenizer
from moequant.export import export
from moequant.export.outdir import output_lock, reported_os_errors
from moequant.export.writer import _check_target
from moequant.html_report import render
from moequant.layers.in_memory import QuantResult, quantize
from moequant.layers.ranks import ProcessGroupFromEnv, Ranks
from moequant.layers.streamed import quantize_streamed
from moequant.model_ref import ModelDirError, check_model_dir, model_name, resolve_model
from moequant.recipe import load_recipe
from moequant.verify import VerifyResult, verify

BUILTIN_SAMPLES, BUILTIN_SEQ_LEN = 16, 256  # the default model on a 2-core CPU: well under a minute


@dataclass
class QuantizeOutcome:
    out_dir: Path
    result: QuantResult
    verify: VerifyResult
    seconds: dict[str, float] = field(default_factory=dict)
    size_before: int = 0
    size_after: int = 0


def weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def load_model(model_dir: Path, trust_remote_code: bool = False):
    """A local HF causal LM (its dtype as saved); errors name the directory and say what to do."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    config = check_model_dir(model_dir, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    except SafetensorError as err:
        raise ModelDirError(f"{model_dir}: corrupt or truncated safetensors file ({err}); re-download it") from None
    except ValueError as err:
        raise ModelDirError(f"{model_dir}: cannot load {type(config).__name__} as a causal LM ({err})") from None
    return model.eval()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelDirError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def _overrides(samples, seq_len, kv_cache, dead_experts, smoothing=None) -> dict:
    out, calib = {}, {}
    if kv_cache is not None:
        out["kv_cache"] = kv_cache
    if smoothing is not None:
        out["smoothing"] = {"enabled": True, "alpha": smoothing}
    if samples is not None:
        calib["samples"] = samples
    if seq_len is not None:
        calib["seq_len"] = seq_len
    if dead_experts is not None:
        calib["dead_experts"] = dead_experts
    if calib:
        out["calibration"] = calib
    return out


def quantize_model(model: str | Path, out: Path | None = None, recipe: str = "nvfp4-mse", fmt: str = "modelopt",
                   calib=None, samples: int | None = None, seq_len: int | None = None, device: str = "auto",
                   kv_cache: str | None = None, dead_experts: str | None = None, overwrite: bool = False,
                   progress: bool = True, log=print, stream: bool = True, revision: str | None = None,
                   trust_remote_code: bool = False, smoothing: float | None = None) -> QuantizeOutcome | None:
    """Quantize ``model`` with ``recipe`` and write a verified checkpoint to ``out``.

    ``model``: a local model directory or a hub id (``revision``; ``model_ref.resolve_model``).
    ``trust_remote_code``: let transformers import the model directory's own code (``auto_map``).
    ``out`` (default ``./<model name>-<recipe>``) must not be, lie inside, or contain the model directory,
    even with ``overwrite``: the source is never touched.
    ``stream`` (default): one decoder layer in memory at a time, read from the safetensors shards, with a
    journal next to ``out`` that a rerun of a killed run continues from (``layers/streamed.py``); False: load
    the whole model, then quantize and export it (``layers/in_memory.quantize`` + ``export.export``): same bytes.
    ``smoothing``: fold SmoothQuant channel factors with this alpha into each layer (``moequant.smoothing``).
    Under ``torchrun`` every rank calls this (``layers/ranks.py``); ranks other than 0 return None."""
    seconds = {}
    rec = load_recipe(recipe, **_overrides(samples, seq_len, kv_cache, dead_experts, smoothing))
    out = Path(out) if out is not None else Path.cwd() / f"{model_name(model)}-{rec.name}"
    _check_target(out, overwrite)   # before a download: an -o that cannot be written fails at once
    model_dir = resolve_model(model, revision, trust_remote_code=trust_remote_code)
    _check_target(out, overwrite, source_dir=model_dir)
    group = ProcessGroupFromEnv(resolve_device(device))   # under torchrun: join the group, this rank's GPU
    try:
        return _run(group, model_dir, out, rec, fmt, calib, overwrite, progress, stream, trust_remote_code, model,
                    seconds)
    finally:
        group.leave(barrier=False)   # after an error (a group left on success is not left twice)


def _run(group, model_dir, out, rec, fmt, calib, overwrite, progress, stream, trust_remote_code, model, seconds):
    device = group.device
    if not stream and Ranks.current() is not None:
        raise ModelDirError("--no-stream runs in one process; under torchrun quantize streams (drop --no-stream)")
    check_model_dir(model_dir, trust_remote_code)
    needs_text = rec.input_scheme or rec.kv_cache == "fp8" or rec.needs_channel_stats
    tokenizer = load_tokenizer(model_dir, trust_remote_code) if needs_text else None
    with _output_lock(out):   # the whole run, reports included: a second run on this output fails at once
        if stream:
            t = time.perf_counter()
            result = quantize_streamed(model_dir, out, rec, fmt, calib, tokenizer=tokenizer, device=device,
                                       overwrite=overwrite, progress=progress,
                                       trust_remote_code=trust_remote_code)
            seconds["quantize+export (streamed)"] = time.perf_counter() - t
            group.leave(barrier=True)   # every rank is done with the collectives; rank 0 verifies alone
            if result is None:   # a torchrun rank other than 0: it computed and sent; rank 0 wrote and verifies
                return None
        else:
            result = _quantize_in_memory(model_dir, out, rec, fmt, calib, tokenizer, device, overwrite, progress,
                                         seconds, trust_remote_code)
        t = time.perf_counter()
        checked = verify(out)
        seconds["verify"] = time.perf_counter() - t
        outcome = QuantizeOutcome(out, result, checked, seconds, weights_size(model_dir), weights_size(out))
        with reported_os_errors(out):
            write_reports(outcome, model_name(model), rec.name, fmt)
    return outcome


def _output_lock(out: Path):
    """The output's lock (``export/outdir.py``); under torchrun only rank 0 takes it: it alone writes."""
    ranks = Ranks.current()
    return output_lock(out) if ranks is None or ranks.writer else contextlib.nullcontext()


def _quantize_in_memory(model_dir, out, rec, fmt, calib, tokenizer, device, overwrite, progress,
                        seconds, trust_remote_code) -> QuantResult:
    t = time.perf_counter()
    model = load_model(model_dir, trust_remote_code)
    seconds["load"] = time.perf_counter() - t
    t = time.perf_counter()
    result = quantize(model, rec, calib, tokenizer=tokenizer, device=device, progress=progress)
    seconds["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    export(model, result.state, out, format=fmt, overwrite=overwrite, source_dir=model_dir, recipe=rec)
    seconds["export"] = time.perf_counter() - t
    return result


def summary_lines(o: QuantizeOutcome, fmt: str) -> list[str]:
    state, report = o.result.state, o.result.report
    experts = state.plan.expert_targets()
    n_experts = sum(t.shape[0] for t in experts if t.param_name != "down_proj")
    under = sum(len(c.under_covered) for c in report.coverage)
    lines = [
        f"output              {o.out_dir}  ({fmt})",
        f"recipe              {report.recipe}; calibration: {report.calibration or 'none needed'}",
        f"tensors quantized   {len(state.plan.targets)} targets -> {len(state.records())} on-disk weights",
        f"experts             {n_experts} in {len(experts) // 2} MoE layers; {under} under-covered "
        f"(policy {report.policy}, < {report.min_tokens} tokens) -- all got scales, none from nothing",
        f"groups              {len(report.groups)} sharing one global scale (q/k/v, gate/up, ...)",
        weight_error_line(report, o.result.state.method),
        f"verify              {'OK' if o.verify.ok else 'FAILED: ' + o.verify.summary()}",
        f"size                {o.size_before / 2**20:.1f} MiB -> {o.size_after / 2**20:.1f} MiB",
        "time                " + ", ".join(f"{k} {v:.1f}s" for k, v in {**o.seconds}.items()),
    ]
    if report.floor_summary() is not None:
        lines.append(f"input floor         {report.floor_summary()}")
    fallback = report.gptq_fallback()
    if fallback:
        lines.append(f"gptq fallback       {sum(map(len, fallback.values()))} experts / linears in {len(fallback)} "
                     "targets keep round-to-nearest codes (too few calibration tokens, or a failed "
                     "factorization); moequant_report.json lists each with its reason")
    notes = report.notes[:SHOWN_NOTES] + ([f"... {len(report.notes) - SHOWN_NOTES} more in moequant_report.json"]
                                          if len(report.notes) > SHOWN_NOTES else [])
    return lines + [f"note                {n}" for n in notes] + coverage_lines(report.coverage)


def weight_error_line(report, method: str) -> str:
    """The shipped weights' mean relative squared error against max scales', lower or higher: GPTQ trades this
    error for the layers' output error, so its codes are farther from the weights than round to nearest's."""
    shipped, baseline = report.weight_error_totals()
    change = 100 * (shipped / baseline - 1) if baseline > 0 else 0.0
    why = "; gptq lowers the layers' output error, not this one" if method == "gptq" else ""
    return (f"weight error        mean relative squared error {shipped:.4f} shipped vs {baseline:.4f} with max scales "
            f"({abs(change):.1f}% {'lower' if change <= 0 else 'higher'}{why})")


SHOWN_CONTAINERS, SHOWN_EXPERTS, SHOWN_NOTES = 4, 12, 4


def coverage_lines(coverage) -> list[str]:
    """The under-covered experts for the terminal: each remedy said once, then up to ``SHOWN_CONTAINERS`` MoE
    layers with up to ``SHOWN_EXPERTS`` experts each (``e<id>:<routed tokens>``), the rest counted. report.html
    and the JSON report name every one (a 48-layer model listed in full would print thousands of lines)."""
    by_remedy: dict[str, dict[str, list[str]]] = {}
    for c in coverage:
        for e, n, what in c.under_covered:
            by_remedy.setdefault(what, {}).setdefault(c.path, []).append(f"e{e}:{n}")
    lines = []
    for what, paths in by_remedy.items():
        lines.append(f"  under-covered -> {what}:")
        shown = list(paths.items())[:SHOWN_CONTAINERS]
        for path, experts in shown:
            more = f" (+{len(experts) - SHOWN_EXPERTS} more)" if len(experts) > SHOWN_EXPERTS else ""
            lines.append(f"    {path}: {' '.join(experts[:SHOWN_EXPERTS])}{more}")
        rest = list(paths.values())[SHOWN_CONTAINERS:]
        if rest:
            lines.append(f"    ... {sum(map(len, rest))} more in {len(rest)} more layers: every one in report.html "
                         "and moequant_report.json")
    return lines


def _plain(obj):
    if is_dataclass(obj):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_reports(o: QuantizeOutcome, name: str, recipe: str, fmt: str) -> None:
    """report.html and moequant_report.json into the (already complete) output directory, atomically."""
    lines = summary_lines(o, fmt)
    files = {
        "report.html": render(o.result.state, o.result.report, lines, f"moequant: {name} / {recipe}"),
        "moequant_report.json": json.dumps({"summary": lines, "report": _plain(o.result.report),
                                            "seconds": o.seconds, "verify_ok": o.verify.ok}, indent=1),
    }
    for name, text in files.items():
        tmp = o.out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, o.out_dir / name)
