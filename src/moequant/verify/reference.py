"""Comparison against the original model directory (safetensors, on-disk names).

Per quantized module ``<m>``: relative error ``||decoded - W||_F / ||W||_F`` with ``W = reference[<m>.weight]``,
aggregated per layer (``...layers.<L>``) and per expert (``...experts.<e>``) as sqrt(sum err^2 / sum W^2).
Outliers: tensors whose error exceeds ``OUTLIER_FACTOR`` x the median or ``OUTLIER_ABS`` (reported, not
failures: a tensor with heavy-tailed weights legitimately loses more). Unquantized tensors must be identical
(dtype and values) to the reference, and every reference tensor must be present (as itself or quantized).

Wrong tensors (failures, check ``relative_error``): a relative error of ``WRONG_ERROR`` = 0.5 or more (a
relative squared error >= 0.25: a quarter of the weight's energy is error), or a non-finite one (a reference
of zeros decoding to non-zeros). Honest quantization stays far below: measured worst per tensor and expert,
relative squared error 0.0097 (NVFP4 "max"), 0.0072 ("mse"), 0.0008 (FP8) over the test fixtures of every
family, 0.0091 / 0.0066 / 0.0007 on the built-in SmolLM2 MoE; and by construction per block: with
round-to-nearest codes on a grid that holds 0, no element's error exceeds its magnitude, and with "max"
block scales the worst block (one value at the top, fifteen just below a rounding step, or a subnormal E4M3
scale rounded down) stays near 0.1. What reaches 0.25 is a decode that is not the weight: corrupt or
mis-scaled block / global scales (a global scale 1.6x too large gives 0.36), codes of another tensor, or a
tensor so small next to its group's global scale that it decodes to zeros (1.0).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict

import torch

from moequant.verify.decode import Checkpoint
from moequant.verify.report import ErrorReport, VerifyResult
from moequant.verify.smoothing import Factors, check_smoothed_unquantized

OUTLIER_FACTOR = 2.0
OUTLIER_ABS = 0.5
WRONG_ERROR = 0.5
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")
_EXPERT = re.compile(r"^(.*\.experts\.\d+)\.")


class ErrorAccumulator:
    def __init__(self, reference: Checkpoint, factors: Factors | None = None):
        self.reference, self.factors = reference, factors
        self.sums: dict[str, dict[str, list[float]]] = {"tensor": {}, "layer": defaultdict(lambda: [0.0, 0.0]),
                                                        "expert": defaultdict(lambda: [0.0, 0.0])}

    def add(self, module: str, decoded: torch.Tensor, result: VerifyResult) -> None:
        name = f"{module}.weight"
        if name not in self.reference.tensors:
            result.fail("reference", name, "quantized module has no weight in the reference checkpoint")
            return
        ref = self.reference.get(name).to(torch.float64)
        if tuple(ref.shape) != tuple(decoded.shape):
            result.fail("shape", module, f"decodes to {list(decoded.shape)}, reference is {list(ref.shape)}")
            return
        if self.factors is not None:   # a smoothed checkpoint: compare with its factors undone
            decoded = self.factors.undo(name, decoded)
        err = float((decoded.to(torch.float64) - ref).square().sum())
        norm = float(ref.square().sum())
        self.sums["tensor"][module] = [err, norm]
        for kind, pattern in (("layer", _LAYER), ("expert", _EXPERT)):
            match = pattern.match(module + ".")
            if match:
                acc = self.sums[kind][match[1]]
                acc[0] += err
                acc[1] += norm

    def report(self) -> ErrorReport:
        def rel(pair):
            err, norm = pair
            return math.sqrt(err / norm) if norm > 0 else (0.0 if err == 0 else math.inf)

        rep = ErrorReport({k: rel(v) for k, v in self.sums["tensor"].items()},
                          {k: rel(v) for k, v in self.sums["layer"].items()},
                          {k: rel(v) for k, v in self.sums["expert"].items()})
        values = list(rep.per_tensor.values())
        if values:
            median = statistics.median(values)
            rep.summary = {"min": min(values), "median": median, "max": max(values), "tensors": len(values)}
            limit = min(OUTLIER_ABS, OUTLIER_FACTOR * median) if median > 0 else OUTLIER_ABS
            rep.outliers = sorted(k for k, v in rep.per_tensor.items() if not v <= limit)
        return rep


def fail_wrong_tensors(errors: ErrorReport, result: VerifyResult) -> None:
    """A failure naming the on-disk weight of every module whose relative error says it is not that weight."""
    for module, value in sorted(errors.per_tensor.items()):
        if not value < WRONG_ERROR:
            result.fail("relative_error", f"{module}.weight",
                        f"relative error {value:.3f} against the reference (>= {WRONG_ERROR}; honest NVFP4 stays "
                        "near 0.1): the decoded weight is not this tensor; its scales or codes are corrupt, or it "
                        "is too small for its group's global scale: re-quantize it (or exclude it)")


def check_unquantized(ckpt: Checkpoint, reference: Checkpoint, quantized: set[str], result: VerifyResult,
                      factors: Factors | None = None) -> None:
    """Unquantized tensors equal the reference (smoothed ones: once their factors are undone, within one rounding
    of their dtype); every reference tensor is present in some form."""
    for name, info in sorted(ckpt.tensors.items()):
        module, _, suffix = name.rpartition(".")
        if (module in quantized and suffix != "bias") or name.endswith((".k_scale", ".v_scale")):
            continue
        if name not in reference.tensors:
            result.fail("reference", name, "not in the reference checkpoint (renamed or invented tensor)")
            continue
        ref = reference.tensors[name]
        if ref.dtype != info.dtype or ref.shape != info.shape:
            result.fail("dtype", name, f"{info.dtype} {list(info.shape)} but the reference has {ref.dtype} "
                        f"{list(ref.shape)}: unquantized tensors must keep their original dtype")
        elif factors is not None and name in factors.entries:
            check_smoothed_unquantized(name, ckpt.get(name), reference.get(name), factors, result)
        elif not torch.equal(ckpt.get(name), reference.get(name)):
            result.fail("unquantized_changed", name, "values differ from the reference")
    for name in sorted(reference.tensors):
        module = name.rpartition(".")[0]
        if name not in ckpt.tensors and not (name.endswith(".weight") and module in quantized):
            result.fail("missing_tensor", name, "in the reference but not in the checkpoint")
