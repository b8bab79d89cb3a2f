"""FP8 E4M3 (moequant.formats.fp8): the 126 candidates, saturating RNE rounding, per-tensor scales."""

import pytest
import torch

from moequant.formats.fp8 import (
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    dequantize_fp8_tensor,
    e4m3_positive_values,
    fp8_tensor_scale,
    quantize_fp8_tensor,
    round_to_e4m3,
)


def test_candidates_are_the_126_positive_finite_values():
    values = e4m3_positive_values()
    assert values.dtype == torch.float32 and values.shape == (126,)
    assert values[0].item() == 2.0**-9 == E4M3_MIN_SUBNORMAL
    assert values[-1].item() == 448.0 == E4M3_MAX
    assert bool((values[1:] > values[:-1]).all())  # strictly ascending
    assert torch.equal(values.to(torch.float8_e4m3fn).to(torch.float32), values)
    assert values.to(torch.float8_e4m3fn).view(torch.uint8).tolist() == list(range(1, 127))


def test_candidate_structure():
    values = e4m3_positive_values()
    assert values[:7].tolist() == [k * 2.0**-9 for k in range(1, 8)]  # subnormals
    assert values[7].item() == 2.0**-6  # smallest normal
    assert values[-2].item() == 416.0
    # every finite positive float8_e4m3fn value is a candidate
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    positive = every[torch.isfinite(every) & (every > 0)].unique()
    assert torch.equal(positive, values)


@pytest.mark.parametrize(
    "value,expected",
    [
        (448.0, 448.0), (449.0, 448.0), (464.0, 448.0), (480.0, 448.0), (1e30, 448.0), (3.4e38, 448.0),
        (-449.0, -448.0), (-1e30, -448.0),
        (1.0625, 1.0), (1.1875, 1.25), (-1.0625, -1.0), (-1.1875, -1.25),  # ties to even mantissa
        (432.0, 448.0), (400.0, 384.0), (424.0, 416.0),  # top binade: ties 432 -> 448, 400 -> 384 (even)
        (1.5 * 2.0**-9, 2.0 * 2.0**-9), (2.5 * 2.0**-9, 2.0 * 2.0**-9), (0.5 * 2.0**-9, 0.0),  # subnormal ties
        (0.0, 0.0), (2.0**-6, 2.0**-6),
    ],
)
def test_round_to_e4m3(value, expected):
    got = round_to_e4m3(torch.tensor([value], dtype=torch.float32))
    assert got.dtype == torch.float8_e4m3fn
    assert got.to(torch.float32).item() == expected


def test_round_to_e4m3_never_nan_for_finite():
    x = torch.tensor([448.0, 460.0, 500.0, 1e10, -1e10, 3.4e38], dtype=torch.float32)
    assert bool(torch.isfinite(round_to_e4m3(x).to(torch.float32)).all())


def test_round_to_e4m3_rejects_non_float32():
    with pytest.raises(TypeError, match="float32"):
        round_to_e4m3(torch.zeros(2, dtype=torch.bfloat16))


def test_fp8_tensor_scale_and_round_trip():
    assert fp8_tensor_scale(torch.tensor(0.0)).item() == 1.0
    assert fp8_tensor_scale(torch.tensor(448.0)).item() == 1.0
    assert fp8_tensor_scale(torch.tensor(896.0)).item() == 2.0
    x = e4m3_positive_values() * 2.0  # exactly representable after dividing by the scale 2
    scale = fp8_tensor_scale(x.abs().amax())
    assert scale.item() == 2.0
    q = quantize_fp8_tensor(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(dequantize_fp8_tensor(q, scale), x)
    assert torch.equal(dequantize_fp8_tensor(quantize_fp8_tensor(-x, scale), scale), -x)
