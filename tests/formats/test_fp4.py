"""Golden tables for FP4 E2M1 (moequant.formats.fp4): encode, decode, pack order."""

import pytest
import torch

from moequant.formats.fp4 import (
    E2M1_MAGNITUDES,
    decode_e2m1,
    encode_e2m1,
    pack_fp4,
    round_to_e2m1,
    unpack_fp4,
)


def _below(x: float) -> float:
    return torch.nextafter(torch.tensor(x), torch.tensor(-float("inf"))).item()


def _above(x: float) -> float:
    return torch.nextafter(torch.tensor(x), torch.tensor(float("inf"))).item()


# value -> code (sign << 3 | magnitude index); every tie of RNE with ties to the even code, both sides of it
GOLDEN_ENCODE = [
    (0.0, 0), (-0.0, 0), (1e-45, 0), (-1e-45, 0),
    (0.25, 0), (_above(0.25), 1), (0.5, 1), (_below(0.75), 1), (0.75, 2),
    (1.0, 2), (1.25, 2), (_above(1.25), 3), (1.5, 3), (_below(1.75), 3), (1.75, 4),
    (2.0, 4), (2.5, 4), (_above(2.5), 5), (3.0, 5), (_below(3.5), 5), (3.5, 6),
    (4.0, 6), (5.0, 6), (_above(5.0), 7), (6.0, 7),
    (6.5, 7), (7.0, 7), (1e30, 7), (3.4e38, 7),  # saturation, never overflow
    (-0.25, 0), (-0.5, 9), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14), (-5.0, 14),
    (-6.0, 15), (-7.0, 15), (-1e30, 15),
]


@pytest.mark.parametrize("value,code", GOLDEN_ENCODE)
def test_encode_golden(value, code):
    got = encode_e2m1(torch.tensor([value], dtype=torch.float32))
    assert got.dtype == torch.uint8
    assert int(got[0]) == code, f"{value!r} -> {int(got[0])}, expected {code}"


def test_encode_golden_vectorized_matches_table():
    values = torch.tensor([v for v, _ in GOLDEN_ENCODE], dtype=torch.float32)
    codes = torch.tensor([c for _, c in GOLDEN_ENCODE], dtype=torch.uint8)
    assert torch.equal(encode_e2m1(values), codes)
    assert torch.equal(encode_e2m1(values.reshape(-1, 1)).reshape(-1), codes)  # shape-agnostic


def test_negative_zero_encodes_to_plus_zero():
    assert int(encode_e2m1(torch.tensor([-0.0]))[0]) == 0
    assert int(encode_e2m1(torch.tensor([-0.1]))[0]) == 0  # magnitude rounds to 0: no sign bit


def test_decode_table():
    expected = list(E2M1_MAGNITUDES) + [-m for m in E2M1_MAGNITUDES]
    assert expected[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    got = decode_e2m1(torch.arange(16, dtype=torch.uint8))
    assert got.dtype == torch.float32
    assert got.tolist() == expected


def test_decode_ignores_high_nibble():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(decode_e2m1(codes), decode_e2m1(codes & 0x0F))


def test_every_value_round_trips():
    values = torch.tensor(list(E2M1_MAGNITUDES) + [-m for m in E2M1_MAGNITUDES[1:]])
    assert torch.equal(round_to_e2m1(values), values)
    assert torch.equal(decode_e2m1(encode_e2m1(values)), values)


def test_encode_rejects_non_float32():
    with pytest.raises(TypeError, match="float32"):
        encode_e2m1(torch.zeros(4, dtype=torch.bfloat16))


def test_pack_nibble_order():
    packed = pack_fp4(torch.tensor([1, 2], dtype=torch.uint8))
    assert packed.tolist() == [0x21]  # element 0 in the low nibble
    packed = pack_fp4(torch.tensor([[0xF, 0x0, 0x3, 0xA]], dtype=torch.uint8))
    assert packed.tolist() == [[0x0F, 0xA3]]


def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 32), generator=gen, dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (3, 5, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_fp4(packed), codes)
    assert torch.equal(pack_fp4(unpack_fp4(packed)), packed)


def test_pack_odd_length_raises():
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
