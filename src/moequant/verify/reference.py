"""Comparison against the original model directory (safetensors, on-disk names).

Per quantized module ``<m>``: relative error ``||decoded - W||_F / ||W||_F`` with ``W = reference[<m>.weight]``,
aggregated per layer (``...layers.<L>``) and per expert (``...experts.<e>``) as sqrt(sum err^2 / sum W^2).
Outliers: tensors whose error exceeds ``OUTLIER_FACTOR`` x the median or ``OUTLIER_ABS`` (reported, not
failures: a tensor with heavy-tailed weights legitimately loses more). Unquantized tensors must be identical
(dtype and values) to the reference, and every reference tensor must be present (as itself or quantized).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict

import torch

from moequant.verify.decode import Checkpoint
from moequant.verify.report import ErrorReport, VerifyResult

OUTLIER_FACTOR = 2.0
OUTLIER_ABS = 0.5
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")
_EXPERT = re.compile(r"^(.*\.experts\.\d+)\.")


class ErrorAccumulator:
    def __init__(self, reference: Checkpoint):
        self.reference = reference
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


def check_unquantized(ckpt: Checkpoint, reference: Checkpoint, quantized: set[str], result: VerifyResult) -> None:
    """Unquantized tensors equal the reference; every reference tensor is present in some form."""
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
        elif not torch.equal(ckpt.get(name), reference.get(name)):
            result.fail("unquantized_changed", name, "values differ from the reference")
    for name in sorted(reference.tensors):
        module = name.rpartition(".")[0]
        if name not in ckpt.tensors and not (name.endswith(".weight") and module in quantized):
            result.fail("missing_tensor", name, "in the reference but not in the checkpoint")
