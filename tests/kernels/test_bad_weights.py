"""Every block-scale search, reference or fast, refuses NaN / inf weights with WeightError (huge finite
magnitudes are searched alike by both; the pipeline bounds them, see formats.nvfp4.check_weight)."""

import pytest
import torch

from moequant import kernels
from moequant.formats.global_search import reference_block_search
from moequant.formats.mse import search_block_scales_reference
from moequant.formats.nvfp4 import WeightError, global_scale_from_amax

G = global_scale_from_amax(torch.tensor(3.0))
H = torch.ones(32)


def _searches():
    yield "reference max", lambda w: search_block_scales_reference(w, G, "max")
    yield "reference mse", lambda w: search_block_scales_reference(w, G, "mse")
    for method in ("max", "mse", "weighted_mse", "four_over_six"):
        h = H if method == "weighted_mse" else None
        yield f"reference {method}", lambda w, m=method, h=h: reference_block_search(m)(w, G, h)
        yield f"fast {method}", lambda w, m=method, h=h: kernels.block_search(m, "torch")(w, G, h)
    yield "fast errors", lambda w: kernels.weight_squared_error(w, G, torch.ones(4, 2, dtype=torch.float8_e4m3fn))
    yield "fast max+errors", lambda w: kernels.search_with_max_errors(w, G, "mse", "torch")
    yield "fast weighted", lambda w: kernels.search_weighted_with_errors(w, G, H, "torch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name,search", list(_searches()), ids=[n for n, _ in _searches()])
def test_bad_weight_is_refused(name, search, bad):
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    w[2, 17] = bad
    with pytest.raises(WeightError, match="non-finite"):
        search(w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["max", "mse"])
def test_bad_weight_is_refused_by_triton(method):
    w = torch.randn(4, 32, device="cuda")
    w[1, 3] = float("nan")
    with pytest.raises(WeightError, match="non-finite"):
        kernels.search_block_scales(w, G.cuda(), method, "triton")
    with pytest.raises(WeightError, match="non-finite"):
        kernels.search_weighted_block_scales(w, G.cuda(), H.cuda(), "triton")
