"""``disk_slices``: which rows of an in-memory parameter each on-disk tensor holds, from the index values that
``revert_weight_conversion`` moves (replaced here by hand-written conversions, so each case is exact)."""

import pytest
import torch

from moequant.models.disk_names import UnsupportedModelError
from moequant.models import disk_names


def _with_conversion(monkeypatch, convert):
    monkeypatch.setattr(disk_names, "revert_weight_conversion", lambda _model, state: convert(state))


def test_a_linear_split_in_two_on_disk_gets_each_half_s_own_rows(monkeypatch):
    # a fused [8, 4] weight stored as two [4, 4] tensors: the second holds rows 4..7, not 0..3
    _with_conversion(monkeypatch, lambda s: {"a.weight": s["w"][:4], "b.weight": s["w"][4:]})
    out = disk_slices_of({"w": ((8, 4), False, None)})
    assert out["w"] == [("a.weight", None, (0, 4, 1)), ("b.weight", None, (4, 8, 1))]


def test_per_expert_tensors_map_to_their_expert_and_interleaved_rows(monkeypatch):
    # [E=3, N=4, K] experts; on disk one tensor per expert and per half (interleaved gate/up: rows 0,2 / 1,3)
    def convert(s):
        return {f"e{e}.{r}": s["x"][e, start::2] for e in range(3) for r, start in (("gate", 0), ("up", 1))}

    _with_conversion(monkeypatch, convert)
    out = disk_slices_of({"x": ((3, 4, 16), False, 3)})
    assert out["x"] == [(f"e{e}.{r}", e, (start, start + 3, 2)) for e in range(3) for r, start in (("gate", 0), ("up", 1))]


def test_a_whole_fused_tensor_is_one_entry(monkeypatch):
    _with_conversion(monkeypatch, lambda s: {"x.fused": s["x"]})
    assert disk_slices_of({"x": ((3, 4, 16), False, 3)})["x"] == [("x.fused", None, (0, 4, 1))]


@pytest.mark.parametrize("convert, message", [
    (lambda s: {"bad": s["x"][0:2].reshape(-1)[2:6]}, "mixes experts"),                  # rows of experts 0 and 1
    (lambda s: {"bad": s["x"][0][[0, 1, 3]]}, "not a regular row slice"),                 # 0, 1, 3
    (lambda s: {"bad": s["x"][0].flip(0)}, "not a regular row slice"),                    # descending
])
def test_irregular_on_disk_tensors_are_refused_by_name(monkeypatch, convert, message):
    _with_conversion(monkeypatch, convert)
    with pytest.raises(UnsupportedModelError, match=f"on-disk tensor bad .*{message}|on-disk tensor bad {message}"):
        disk_slices_of({"x": ((3, 4, 16), False, 3)})


def disk_slices_of(params):
    return disk_names.disk_slices(torch.nn.Module(), params)
