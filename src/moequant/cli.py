"""The ``moequant`` command: argument parsing and calls into the API; no quantization logic here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moequant.layers.host_memory import bound_cpu_kernel_caches

DESCRIPTION = """Quantize Hugging Face MoE LLMs to NVFP4 / FP8 checkpoints (ModelOpt-HF or compressed-tensors),
calibrating every expert, and verify what ships."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moequant", description=DESCRIPTION)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    q = sub.add_parser("quantize", help="quantize a model directory (default: the built-in demo MoE)")
    q.add_argument("model", nargs="?", help="local Hugging Face model directory or hub id such as "
                   "Qwen/Qwen3-30B-A3B (default: built-in model)")
    _model_options(q)
    q.add_argument("-o", "--output", help="output directory (default: ./<model-name>-<recipe>)")
    q.add_argument("--recipe", default="nvfp4-mse", help="built-in recipe name or YAML file (moequant recipes)")
    q.add_argument("--format", default="modelopt", choices=("modelopt", "compressed-tensors"))
    q.add_argument("--calib", default="builtin", help="calibration text file, or 'builtin'")
    q.add_argument("--samples", type=int, help="calibration sequences (default: the recipe's)")
    q.add_argument("--seq-len", type=int, help="tokens per calibration sequence (default: the recipe's)")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    q.add_argument("--kv-cache", choices=("none", "fp8", "fp8-cast"), help="override the recipe's KV cache")
    q.add_argument("--dead-experts", choices=("coverage", "route_all", "routed"),
                   help="how under-covered experts get activation scales (default: coverage)")
    q.add_argument("--smoothing", type=float, metavar="ALPHA",
                   help="fold SmoothQuant channel factors (amax_x^ALPHA / amax_w^(1-ALPHA), 0.6 measured best) into each "
                        "layer before calibrating it: W4A4 / W8A8 recipes; factors saved for the verifier")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (and discard a partial run of another model/recipe)")
    q.add_argument("--no-stream", action="store_true",
                   help="load the whole model into memory instead of streaming one decoder layer at a time "
                        "from the safetensors shards (same output; no resume)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    v = sub.add_parser("verify", help="check an exported checkpoint (exit 1 when a check fails)")
    v.add_argument("checkpoint")
    v.add_argument("--reference", help="original model directory or hub id: report weight error per "
                   "tensor/layer/expert")
    v.add_argument("--revision", help="branch, tag or commit of a --reference hub id (default: main)")
    v.add_argument("--engine", choices=("vllm",),
                   help="also check the engine's loader contract (vllm: vLLM 0.26.0, read from its source)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    i = sub.add_parser("inspect", help="what a checkpoint or model directory holds")
    i.add_argument("path", help="checkpoint, model directory or hub id")
    _model_options(i)
    e = sub.add_parser("eval", help="perplexity and KL of the shipped checkpoint on held-out text")
    e.add_argument("model", nargs="?", help="original model directory or hub id (default: built-in model)")
    _model_options(e)
    e.add_argument("--quantized", help="exported checkpoint to evaluate against MODEL")
    e.add_argument("--data", default="builtin", help="held-out text file, or 'builtin' (speeches 2001+)")
    e.add_argument("--windows", type=int, default=8)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--device", default="auto")
    e.add_argument("--ranges", type=int, default=10, metavar="N",
                   help="list the N quantized inputs whose held-out amax most exceeds what their input scale "
                        "represents (default: 10)")
    e.add_argument("--quiet", action="store_true")
    sub.add_parser("recipes", help="list the built-in recipes")
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", help="branch, tag or commit of a hub id (default: main)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model's own Python code (config.json auto_map); only for "
                        "models whose code you trust (default: refuse such models)")


def _model_ref(arg: str | None, revision: str | None, log) -> tuple[str | Path, bool]:
    """(what the user typed, or the built-in model's directory; whether it is the built-in model)."""
    if arg is not None:
        return arg, False
    if revision is not None:
        from moequant.model_ref import ModelDirError

        raise ModelDirError("--revision applies to a hub id given as MODEL; the built-in model has none")
    from moequant.demo import builtin_model_dir

    return builtin_model_dir(log=log), True


def _quiet_libraries() -> None:
    """--quiet: no progress bars from transformers either (this process is ours to configure)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def _cmd_quantize(a) -> int:
    from moequant.quantize_command import BUILTIN_SAMPLES, BUILTIN_SEQ_LEN, quantize_model, summary_lines

    if a.quiet:
        _quiet_libraries()
    log = (lambda *_: None) if a.quiet else print
    model, builtin = _model_ref(a.model, a.revision, log)
    samples = a.samples if a.samples is not None else (BUILTIN_SAMPLES if builtin else None)
    seq_len = a.seq_len if a.seq_len is not None else (BUILTIN_SEQ_LEN if builtin else None)
    calib = None if a.calib == "builtin" else a.calib
    outcome = quantize_model(model, Path(a.output) if a.output else None, a.recipe, a.format, calib, samples,
                             seq_len, a.device, a.kv_cache, a.dead_experts, a.overwrite, progress=not a.quiet,
                             log=log, stream=not a.no_stream, revision=a.revision,
                             trust_remote_code=a.trust_remote_code, smoothing=a.smoothing)
    if outcome is None:   # torchrun rank > 0: rank 0 prints the summary
        return 0
    print("\n".join(summary_lines(outcome, a.format)))
    print(f"report: {outcome.out_dir / 'report.html'}")
    return 0 if outcome.verify.ok else 1


def _cmd_verify(a) -> int:
    from moequant.model_ref import resolve_model
    from moequant.verify import verify

    if a.revision is not None and a.reference is None:
        from moequant.model_ref import ModelDirError

        raise ModelDirError("--revision applies to a --reference hub id; give --reference or drop --revision")
    reference = resolve_model(a.reference, a.revision) if a.reference is not None else None
    result = verify(a.checkpoint, reference=reference, engine=a.engine)
    print(result.to_json() if a.json else result.summary())
    return 0 if result.ok else 1


def _cmd_eval(a) -> int:
    from moequant.evaluate import evaluate
    from moequant.model_ref import resolve_model
    from moequant.quantize_command import resolve_device

    if a.quiet:
        _quiet_libraries()
    model, _ = _model_ref(a.model, a.revision, print)
    model_dir = resolve_model(model, a.revision, trust_remote_code=a.trust_remote_code)
    result = evaluate(model_dir, a.quantized, a.data, a.windows, a.seq_len, resolve_device(a.device),
                      progress=not a.quiet, trust_remote_code=a.trust_remote_code)
    print(result.summary(a.ranges))
    return 0


def _cmd_inspect(a) -> int:
    from moequant.inspect_ckpt import inspect_path
    from moequant.model_ref import resolve_model

    path = resolve_model(a.path, a.revision, trust_remote_code=a.trust_remote_code)
    print("\n".join(inspect_path(path, trust_remote_code=a.trust_remote_code)))
    return 0


def _cmd_recipes(_a) -> int:
    from moequant.recipe import builtin_recipes

    for name, description in builtin_recipes().items():
        print(f"{name:26s} {description}")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause: moequant's own errors, a corrupt safetensors file the library reports, and the
    operating system's (a missing or unreadable file, a path that is a file or a directory where the other is
    needed, a full disk: ``OSError`` and its subclasses FileNotFoundError, PermissionError, ...)."""
    from safetensors import SafetensorError

    from moequant.errors import MoequantError

    return (MoequantError, SafetensorError, OSError)


COMMANDS = {"quantize": _cmd_quantize, "verify": _cmd_verify, "eval": _cmd_eval, "inspect": _cmd_inspect,
            "recipes": _cmd_recipes}


def main(argv: list[str] | None = None) -> int:
    bound_cpu_kernel_caches()   # the process is ours: before any CPU matmul (quantize and eval run many)
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the library wrote
        print(f"moequant: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
