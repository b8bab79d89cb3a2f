"""A smoothed checkpoint's factors, read back to undo them before comparing with the reference.

``moequant_smoothing/factors.safetensors`` (written by a run with the recipe key ``smoothing``; its layout is in
docs/checkpoint-formats.md, "Smoothing factors"): tensors ``f<n>`` (float32 [K] or [E, K]) and the metadata
``entries``: {on-disk tensor name: [[factor, axis, divide, expert, offset], ...]}: along ``axis`` of that tensor
(a quantized module's ``<m>.weight``, whatever the format stores (compressed-tensors: ``weight_packed``): of its
decoded [out, in] weight), element ``r`` was divided (``divide``) or multiplied by
``factor[expert][offset + r]``. Undoing multiplies where it divided and divides where it multiplied.

Checks (``smoothing``): the file reads, its factors are finite and > 0, every entry names a tensor of the
checkpoint and fits the factor; with a reference, a smoothed unquantized tensor (norm, router) undone must equal
the reference within one rounding of its dtype (``unquantized_changed`` otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moequant.verify.report import VerifyResult

SMOOTHING_FILE = "moequant_smoothing/factors.safetensors"
FORMAT = "moequant-smoothing-1"


class Factors:
    def __init__(self, factors: dict[str, torch.Tensor], entries: dict[str, list]):
        self.factors, self.entries = factors, entries

    def undo(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (on-disk tensor ``name``, decoded) with its smoothing undone, float64."""
        x = x.to(torch.float64)
        for key, axis, divide, expert, offset in self.entries.get(name, ()):
            f = self.factors[key]
            f = (f[expert] if expert is not None else f).to(torch.float64)
            f = f[offset:offset + x.shape[axis]]
            shape = [1] * x.ndim
            shape[axis] = f.numel()
            x = x * f.reshape(shape) if divide else x / f.reshape(shape)
        return x


def load_factors(path: Path, tensors: dict, result: VerifyResult) -> Factors | None:
    """The checkpoint's smoothing factors (None if it has none or they fail a check, which is recorded)."""
    file = Path(path) / SMOOTHING_FILE
    if not file.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            meta = fh.metadata() or {}
            factors = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        entries = json.loads(meta["entries"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        result.fail("smoothing", SMOOTHING_FILE, f"unreadable smoothing factors: {err}")
        return None
    ok = True
    for key, f in sorted(factors.items()):
        if not (f.dtype == torch.float32 and bool(torch.isfinite(f).all()) and bool((f > 0).all())):
            result.fail("smoothing", f"{SMOOTHING_FILE}:{key}", "factors must be finite float32 > 0")
            ok = False
    for name, found in sorted(entries.items()):
        if name not in tensors and f"{name}_packed" not in tensors:   # compressed-tensors: <m>.weight_packed
            result.fail("smoothing", name, f"listed in {SMOOTHING_FILE} but not a tensor of the checkpoint")
            ok = False
        for key, axis, _divide, expert, offset in found:
            f = factors.get(key)
            if f is None or (expert is not None) != (f.ndim == 2) or offset < 0:
                result.fail("smoothing", name, f"entry {[key, axis, expert, offset]} does not fit its factor")
                ok = False
    return Factors(factors, entries) if ok else None


def check_smoothed_unquantized(name: str, value: torch.Tensor, reference: torch.Tensor, factors: Factors,
                               result: VerifyResult) -> None:
    """A smoothed unquantized tensor, undone, equals the reference within one rounding of its dtype."""
    undone = factors.undo(name, value)
    ref = reference.to(torch.float64)
    eps = torch.finfo(value.dtype).eps if value.dtype.is_floating_point else 0.0
    bad = (undone - ref).abs() > eps * ref.abs()
    if bool(bad.any()):
        worst = float(((undone - ref).abs() / ref.abs().clamp_min(1e-30)).max())
        result.fail("unquantized_changed", name, f"differs from the reference after undoing its smoothing factors "
                    f"(worst relative difference {worst:.2e}, allowed {eps:.1e})")
