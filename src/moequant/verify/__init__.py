"""Independent verifier of NVFP4 / FP8 checkpoints (ModelOpt-HF and compressed-tensors).

    verify(path, reference=None, engine=None) -> VerifyResult  (.ok, .failures, .warnings, .stats, .errors, .to_json())

Written from the format descriptions (docs/checkpoint-formats.md), not from the exporter: this package imports
nothing from ``moequant.formats``, ``kernels``, ``quantize``, ``export`` or ``state`` (a test scans its imports).
Checks, each failure naming the tensor and the check:
  files       every shard readable, not truncated, every indexed tensor present;
  config_keys the keys the engines require (``spec.py``);
  tensor_set / dtype / shape   per quantized linear, per format;
  scale_positive   all block, global, input and KV scales finite and > 0;
  decoded_finite   no NaN/inf in any decoded weight (NVFP4: proven from the scales when
                   fl(6 * max block scale (*|/) global) is finite, else decoded and scanned);
  fused_group_*    q/k/v, gate/up (dense, shared and every routed expert), w1/w3, q_a/kv_a: all quantized or none,
                   identical global and input scales;
  experts_complete every expert of every MoE layer (count from config.json) with all its projections;
  exclude_list     the exclude/ignore list covers exactly the unquantized linears;
  kv_scales        right names, for all attention layers or none;
  smoothing        a smoothed checkpoint's factors file (``smoothing.py``) reads and fits the tensors it names.
With ``engine="vllm"``: also the loader contract of vLLM 0.26.0 (``engine_vllm.py``, checks ``vllm_*``): what
vLLM's weight loader asks for, how its exclude rules resolve, w1/w3 scales, input scales, KV-scale renaming.
With ``reference`` (the original model directory): relative weight error per tensor / layer / expert with
outliers flagged (warnings) and wrong tensors failed (``relative_error`` >= 0.5, see ``reference.py``),
unquantized tensors identical, no tensor missing; a smoothed checkpoint is compared with its factors undone.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import torch

from moequant.verify import checks
from moequant.verify.decode import Checkpoint, CheckpointError
from moequant.verify.engine_vllm import check_vllm
from moequant.verify.reference import ErrorAccumulator, check_unquantized, fail_wrong_tensors
from moequant.verify.report import ErrorReport, Failure, VerifyResult
from moequant.verify.smoothing import load_factors
from moequant.verify.spec import FormatSpec, expected_experts, parse_spec

__all__ = ["ENGINES", "ErrorReport", "Failure", "VerifyResult", "iter_decoded", "main", "verify"]


def _check_files(ckpt: Checkpoint, result: VerifyResult) -> None:
    for file, message in sorted(ckpt.file_errors.items()):
        result.fail("files", file, message)
    if ckpt.weight_map is None:
        return
    for name, file in sorted(ckpt.weight_map.items()):
        if file not in ckpt.file_errors and name not in ckpt.tensors:
            result.fail("files", name, f"listed in the index under {file} but absent from that shard")


def _check_values(ckpt: Checkpoint, spec: FormatSpec, inv: checks.Inventory, result: VerifyResult,
                  errors: ErrorAccumulator | None) -> None:
    decoded_ok = 0
    for module in inv.quantized:
        if not checks.check_module_layout(spec, module, inv.modules[module], result):
            continue
        maxima: dict[str, torch.Tensor] = {}
        if not checks.scale_values(ckpt, spec, module, result, maxima):
            continue
        # decoded_finite: proven from the scales when it can be (NVFP4 codes are all finite), else decoded
        # and scanned; the weights are decoded anyway when they are compared with a reference
        proven = checks.nvfp4_decodes_finite(ckpt, spec, module, maxima)
        w = checks.decode_module(ckpt, spec, module) if errors is not None or not proven else None
        if not proven:
            bad = ~torch.isfinite(w)
            if bool(bad.any()):
                result.fail("decoded_finite", module, f"{int(bad.sum())} decoded value(s) are NaN or inf")
                continue
        decoded_ok += 1
        if errors is not None:
            errors.add(module, w, result)
    result.stats["quantized_modules"] = len(inv.quantized)
    result.stats["decoded_modules"] = decoded_ok
    result.stats["unquantized_linears"] = len(inv.unquantized_linear)


ENGINES = ("vllm",)


def verify(path: str | os.PathLike, reference: str | os.PathLike | None = None,
           engine: str | None = None) -> VerifyResult:
    """Check the checkpoint at ``path`` (and compare it with ``reference`` if given; with ``engine="vllm"`` also
    check it against vLLM 0.26.0's loader); never raises on a bad checkpoint: every problem is a ``Failure``."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    result = VerifyResult(str(path))
    try:
        ckpt = Checkpoint(path)
    except CheckpointError as err:
        result.fail("files", str(path), str(err))
        return result
    with ckpt, _one_thread():
        _verify(ckpt, path, reference, result)
        if engine == "vllm":
            check_vllm(ckpt, result)
        return result


@contextmanager
def _one_thread():
    """torch's intra-op thread count set to 1 meanwhile (process-wide; restored in ``finally``). The checks
    run thousands of small reductions; parallel ones cost milliseconds each whenever the other core is busy
    (measured on a loaded 2-core machine: a uint8 min over 55k bytes took 10 ms with 2 threads, 7 us with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _verify(ckpt: Checkpoint, path, reference, result: VerifyResult) -> VerifyResult:
    _check_files(ckpt, result)
    try:
        spec = parse_spec(ckpt, result)
        config = ckpt.json("config.json")
    except CheckpointError as err:
        result.fail("config_keys", str(path), str(err))
        return result
    if spec is None:
        return result
    inv = checks.build_inventory(ckpt)
    factors = load_factors(path, ckpt.tensors, result)
    errors = None
    if reference is not None:
        try:
            ref = Checkpoint(reference)
        except CheckpointError as err:
            result.fail("reference", str(reference), str(err))
            ref = None
        errors = ErrorAccumulator(ref, factors) if ref is not None else None
    _check_values(ckpt, spec, inv, result, errors)
    checks.check_fused_groups(ckpt, spec, inv, result)
    checks.check_experts(inv, expected_experts(config), result)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings")) is True
    checks.check_exclude_list(spec, inv, result, tied_lm_head=tied)
    checks.check_kv(ckpt, spec, inv, result)
    if errors is not None:
        check_unquantized(ckpt, errors.reference, set(inv.quantized), result, factors)
        result.errors = errors.report()
        fail_wrong_tensors(result.errors, result)
        errors.reference.close()
        result.warnings += [f"outlier relative error {result.errors.per_tensor[m]:.4f}: {m}"
                            for m in result.errors.outliers]
    return result


def iter_decoded(path: str | os.PathLike):
    """Yield (module name, float32 decoded weight) for every quantized module that passes the layout checks."""
    ckpt = Checkpoint(path)
    result = VerifyResult(str(path))
    spec = parse_spec(ckpt, result)
    if spec is None:
        raise CheckpointError(f"{path}: " + "; ".join(f"{f.tensor}: {f.message}" for f in result.failures))
    inv = checks.build_inventory(ckpt)
    for module in inv.quantized:
        if checks.check_module_layout(spec, module, inv.modules[module], result):
            yield module, checks.decode_module(ckpt, spec, module)


def main(argv: list[str] | None = None) -> int:
    """``python -m moequant.verify CHECKPOINT [--reference DIR] [--engine vllm] [--json]``; exit 1 on any failure."""
    parser = argparse.ArgumentParser(prog="moequant-verify", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--reference", default=None, help="original model directory (safetensors)")
    parser.add_argument("--engine", choices=ENGINES, help="also check the loader contract of this engine")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args(argv)
    result = verify(args.checkpoint, args.reference, args.engine)
    print(result.to_json() if args.json else result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
