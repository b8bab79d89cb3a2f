"""The verifier's result: a list of failures (tensor + check + message), warnings, stats and errors."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Failure:
    check: str      # e.g. "experts_complete", "fused_group_global_scale", "scale_positive", "dtype"
    tensor: str     # the tensor, module or file concerned
    message: str


@dataclass
class ErrorReport:
    """Relative weight error ||decoded - reference|| / ||reference|| (Frobenius), per tensor / layer / expert."""

    per_tensor: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, float] = field(default_factory=dict)
    per_expert: dict[str, float] = field(default_factory=dict)
    outliers: list[str] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


@dataclass
class VerifyResult:
    path: str
    format: str | None = None
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    errors: ErrorReport | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, check: str, tensor: str, message: str) -> None:
        self.failures.append(Failure(check, tensor, message))

    def failed_checks(self) -> set[str]:
        return {f.check for f in self.failures}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def to_json(self, indent: int | None = 2) -> str:
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return json.dumps(clean(self.to_dict()), indent=indent, sort_keys=True)

    def summary(self) -> str:
        head = f"{self.path}: {'OK' if self.ok else 'FAILED'} ({self.format}, {len(self.failures)} failure(s))"
        lines = [head] + [f"  [{f.check}] {f.tensor}: {f.message}" for f in self.failures[:50]]
        if len(self.failures) > 50:
            lines.append(f"  ... {len(self.failures) - 50} more")
        lines += [f"  warning: {w}" for w in self.warnings[:20]]
        if self.errors is not None and self.errors.summary:
            s = self.errors.summary
            lines.append(f"  relative weight error: min {s['min']:.4f} median {s['median']:.4f} max {s['max']:.4f}"
                         f", {len(self.errors.outliers)} outlier(s)")
        return "\n".join(lines)
