"""meta_model.disk_sources: which on-disk tensor holds which rows, whatever shape transformers' revert gives them."""

import pytest
import torch

import moequant.layers.meta_model as meta_model
from moequant.models.experts import UnsupportedModelError

META = {"experts.down_proj": torch.empty(3, 4, 5, device="meta"), "norm.weight": torch.empty(6, device="meta")}


def _unbind(index):
    """Mixtral-style revert: experts unbound to per-expert tensors (what transformers 5.24 gives)."""
    out = {f"experts.{e}.w2.weight": t for e, t in enumerate(index["experts.down_proj"].unbind(0))}
    return {**out, "norm.weight": index["norm.weight"]}


@pytest.mark.parametrize("revert", [
    _unbind,
    # transformers 5.17 squeezes size-1 dims on the way: a row index [E, rows, 1] came back as [rows]
    lambda index: {k: v.squeeze() for k, v in _unbind(index).items()},
])
def test_rows_are_found_through_squeezing_and_unbinding(monkeypatch, revert):
    monkeypatch.setattr(meta_model, "revert_weight_conversion", lambda _model, index: revert(index))
    sources = meta_model.disk_sources(None, META)
    assert [name for name, _ in sources["experts.down_proj"]] == [f"experts.{e}.w2.weight" for e in range(3)]
    for e, (_, rows) in enumerate(sources["experts.down_proj"]):
        assert rows.tolist() == list(range(4 * e, 4 * e + 4))
    assert sources["norm.weight"] == [("norm.weight", sources["norm.weight"][0][1])]
    assert sources["norm.weight"][0][1].tolist() == list(range(6))


def test_a_transposed_disk_layout_is_refused_by_name(monkeypatch):
    def transposed(index):
        return {k: (v.transpose(-1, -2) if v.ndim >= 2 else v) for k, v in _unbind(index).items()}

    monkeypatch.setattr(meta_model, "revert_weight_conversion", lambda _model, index: transposed(index))
    with pytest.raises(UnsupportedModelError, match=r"experts\.down_proj.*experts\.0\.w2\.weight.*--no-stream"):
        meta_model.disk_sources(None, META)
