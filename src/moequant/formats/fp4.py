"""FP4 E2M1: encode, decode, and pack two codes per byte.

E2M1 represents +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}. A 4-bit code is ``sign << 3 | magnitude_index`` where
``magnitude_index`` indexes ``E2M1_MAGNITUDES`` (so the 3 low bits are exactly the E2M1 exponent/mantissa bits).

Rounding: round to nearest, ties to even (of the code, i.e. to the value whose mantissa bit is 0), and saturate
at +-6. This is what Blackwell's ``cvt.rn.satfinite.e2m1x2.f32`` does, so our codes are the ones the hardware
would produce from the same scaled value; saturation (instead of overflow to inf/NaN, which E2M1 cannot
represent) is what every NVFP4 engine expects for values slightly above 6 after block-scale rounding.
The ties, explicitly: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
"""

from __future__ import annotations

import torch

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0

# Magnitude index k is chosen when |x| falls in (lower, upper]; the inclusive side of each bound is the
# side of the even code (index 0, 2, 4, 6). Pairs: (threshold, inclusive) between index k and k+1.
_THRESHOLDS = (
    (0.25, True),   # 0 | 0.5   tie -> 0   (even)
    (0.75, False),  # 0.5 | 1   tie -> 1   (even)
    (1.25, True),   # 1 | 1.5   tie -> 1
    (1.75, False),  # 1.5 | 2   tie -> 2
    (2.5, True),    # 2 | 3     tie -> 2
    (3.5, False),   # 3 | 4     tie -> 4
    (5.0, True),    # 4 | 6     tie -> 4
)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already divided by their scale) to E2M1 codes (uint8 in [0, 15]).

    ``x`` must be finite float32. -0.0 encodes as +0 (code 0): the sign bit is set only for x < 0 whose
    magnitude rounds to a non-zero value, so decoding never yields -0.0 and codes are canonical.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"encode_e2m1 expects float32, got {x.dtype}")
    mag = x.abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for threshold, tie_goes_down in _THRESHOLDS:
        above = mag > threshold if tie_goes_down else mag >= threshold
        index += above.to(torch.uint8)
    negative = (x < 0) & (index > 0)
    return index | (negative.to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, low 4 bits) to float32 values."""
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest E2M1 value (as float32), same rule as ``encode_e2m1``."""
    return decode_e2m1(encode_e2m1(x))


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[..., K]`` (K even) into bytes ``[..., K/2]``: element 2j in the LOW nibble, 2j+1 in the high.

    This is the order the engines read: vLLM's reference dequantizer ``break_fp4_bytes``
    (vllm/model_executor/layers/quantization/utils/nvfp4_emulation_utils.py) takes ``byte & 0x0F`` as the
    first element and ``byte >> 4`` as the second, and TensorRT-LLM / ModelOpt pack with
    ``codes[..., 0::2] | codes[..., 1::2] << 4`` (modelopt/torch/quantization/qtensor/nvfp4_tensor.py).
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_fp4``: bytes ``[..., K/2]`` to codes ``[..., K]``."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)
