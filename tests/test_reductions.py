"""``reductions.amin_amax`` / ``abs_max``: the same bits as ``torch.aminmax`` on any input, NaN and inf included
(the CPU path runs ``amin`` and ``amax`` instead, which must not change a single value)."""

import pytest
import torch

from moequant.reductions import abs_max, amin_amax

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN where the other has NaN, equal values elsewhere (-0.0 == +0.0: a min over both may give either)."""
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def _inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 300, generator=g).to(dtype)
    x[0] = 0.0                                   # an all-zero slice
    x[1, 2] = -0.0                               # negative zeros
    x[2] = 1.5                                   # all equal
    x[3, 1, 7], x[3, 4, 0] = float("nan"), 2.0   # NaN beside finite values
    x[4, 0, 3], x[4, 3, 9] = float("inf"), -float("inf")
    x[5] *= torch.finfo(dtype).max / 8           # huge
    x[5, 0] = torch.finfo(dtype).tiny            # tiny
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_amin_amax_equals_aminmax(dtype, seed):
    x = _inputs(dtype, seed)
    views = {"contiguous": x, "transposed": x.mT, "flat rows": x.reshape(6, -1), "one row": x.reshape(1, -1)}
    for label, v in views.items():
        for dim in [None, -1, 0] if v.ndim > 1 else [None]:
            low, high = amin_amax(v, dim)
            ref_low, ref_high = torch.aminmax(v) if dim is None else torch.aminmax(v, dim=dim)
            assert _same_values(low, ref_low) and _same_values(high, ref_high), (label, dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_max_is_max_of_magnitudes(dtype):
    x = _inputs(dtype, 2)
    for v, dim in [(x.reshape(6, -1), -1), (x.mT, 0), (x[:3].reshape(-1), None), (x[1:2, 2], None)]:
        got, ref = abs_max(v, dim), v.abs().amax(dim if dim is not None else tuple(range(v.ndim)))
        ok = ~ref.isnan()
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(_bits(got[ok]), _bits(ref[ok])), dim   # bits: a zero comes out +0.0, as |x| has it
    assert torch.isnan(abs_max(x[3])) and torch.isinf(abs_max(x[4]))
    assert _bits(abs_max(torch.full((4, 8), -0.0, dtype=dtype), -1)).eq(0).all()


def test_empty_reduction_is_refused_like_aminmax():
    x = torch.empty(3, 0)
    for reduce in (lambda: torch.aminmax(x, dim=-1), lambda: amin_amax(x, -1), lambda: abs_max(x, -1)):
        with pytest.raises((RuntimeError, IndexError), match="non-zero size|empty"):
            reduce()
