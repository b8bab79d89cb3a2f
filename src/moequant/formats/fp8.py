"""FP8 E4M3 (``torch.float8_e4m3fn``): rounding, the candidate list, and per-tensor FP8 quantization.

E4M3 "fn": 4 exponent bits (bias 7), 3 mantissa bits, no infinities, one NaN pattern per sign; the finite
maximum is 448. Positive finite non-zero values: 7 subnormals (k * 2^-9, k = 1..7) and 119 normals
(2^-6 .. 448) = 126 values. Casting with torch rounds to nearest even; values above 448 would become NaN, so
``round_to_e4m3`` clamps to +-448 first (saturating, as the engines' ``satfinite`` conversions do).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
# Per-tensor FP8 weights decode as q * scale with |q| >= 2^-9 when non-zero: every decoded value is a normal
# float32 iff scale = amax / 448 >= 2^-117, i.e. amax >= 448 * 2^-117 (= 7 * 2^-111, ~2.7e-33). Below it the
# scale and the decoded values are subnormals with fewer significant bits (decoded differently by engines
# that multiply in another order). Nothing else in FP8 weight quantization depends on the magnitude:
# q = e4m3(w / scale) is the same for w and 2^k w (the quotient is unchanged), and there is no error search.
MIN_WEIGHT_AMAX = E4M3_MAX * 2.0**-117


def e4m3_positive_values(device: torch.device | str | None = None) -> torch.Tensor:
    """The 126 positive finite E4M3 values as float32, ascending (the MSE search candidates)."""
    bits = torch.arange(1, 127, dtype=torch.uint8, device=device)  # 0x01..0x7E; 0x7F is NaN
    values = bits.view(torch.float8_e4m3fn).to(torch.float32)
    return values


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest E4M3 (ties to even), saturating at +-448. Returns ``float8_e4m3fn``."""
    if x.dtype != torch.float32:
        raise TypeError(f"round_to_e4m3 expects float32, got {x.dtype}")
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 scale ``amax / 448`` (float32). A zero amax gives scale 1.0 (all values are zero)."""
    amax = amax.to(torch.float32)
    divisor = torch.tensor(E4M3_MAX, dtype=torch.float32, device=amax.device)  # IEEE division on CUDA too
    return torch.where(amax > 0, amax / divisor, torch.ones_like(amax))


def quantize_fp8_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 per-tensor quantization: ``e4m3(x / scale)`` with saturation; ``scale`` broadcasts against x."""
    return round_to_e4m3(x.to(torch.float32) / scale.to(torch.float32))


def dequantize_fp8_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in float32."""
    return q.to(torch.float32) * scale.to(torch.float32)
