"""The references of weighted MSE, global-scale search and four-over-six: hand-checked properties."""

import torch

from moequant.formats.four_over_six import divisor_block_scales, four_over_six_block_scales
from moequant.formats.global_search import GLOBAL_FACTORS, reference_block_search, search_global, total_error
from moequant.formats.mse import mse_block_scales_reference
from moequant.formats.nvfp4 import block_squared_error, global_scale_from_amax, max_block_scales, to_blocks
from moequant.formats.weighted_mse import channel_blocks, weighted_block_error, weighted_mse_block_scales_reference


def test_weighted_error_order_of_ops():
    blocks = torch.linspace(-1, 1, 16).reshape(1, 16)
    h = torch.arange(16, dtype=torch.float32).reshape(1, 16)
    scale = torch.tensor([[0.1]])
    err = weighted_block_error(blocks, scale, h)
    plain = block_squared_error(blocks, scale)
    assert err.shape == plain.shape == (1,)
    ones = weighted_block_error(blocks, scale, torch.ones(1, 16))
    assert torch.equal(ones, plain)  # fl(x * 1) = x: unit weights give the plain error bit for bit


def test_weighted_search_prefers_heavy_channels():
    """A block whose weights concentrate on one element: that element is reproduced better than by mse."""
    w = torch.tensor([[0.3, 1.0, 0.71, 0.52] * 4])
    blocks, gs = to_blocks(w), global_scale_from_amax(w.abs().amax())
    h = torch.full((16,), 1e-3)
    h[2] = 1.0
    s_w, e_w = weighted_mse_block_scales_reference(blocks, gs, channel_blocks(h, w))
    s_m, _ = mse_block_scales_reference(blocks, gs)
    e_m = weighted_block_error(blocks, s_m.to(torch.float32).unsqueeze(-1) * gs, channel_blocks(h, w))
    assert float(e_w) <= float(e_m)


def test_four_over_six_never_worse_than_max_and_dominated_by_mse():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    blocks, gs = to_blocks(w), global_scale_from_amax(w.abs().amax())
    scales, err = four_over_six_block_scales(blocks, gs)
    six = max_block_scales(blocks, gs)
    assert torch.equal(divisor_block_scales(blocks, gs, 6.0).view(torch.uint8), six.view(torch.uint8))
    err_max = block_squared_error(blocks, six.to(torch.float32).unsqueeze(-1) * gs)
    assert bool((err <= err_max).all()) and bool((err < err_max).any())
    _, err_mse = mse_block_scales_reference(blocks, gs)
    assert bool((err_mse <= err).all())


def test_global_search_never_worse_and_group_shared():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(16, 64, generator=gen), torch.randn(16, 64, generator=gen) * 2
    base = global_scale_from_amax(torch.maximum(q.abs().amax(), k.abs().amax()))
    search = reference_block_search("mse")
    g, found = search_global([(q, None), (k, None)], base, search)
    assert g.shape == base.shape
    chosen = float(sum(total_error(e, 0) for _, e in found))
    conventional = float(sum(total_error(search(x, base, None)[1], 0) for x in (q, k)))
    assert chosen <= conventional
    assert any(torch.equal(g, (base * f).clamp_min(2.0**-126)) for f in GLOBAL_FACTORS)


def test_global_search_per_expert():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 16, 64, generator=gen)
    base = global_scale_from_amax(w.abs().amax(dim=(-1, -2)))
    g, [(scales, err)] = search_global([(w, None)], base, reference_block_search("max"))
    assert g.shape == (4,) and scales.shape == (4, 16, 4)
    for e in range(4):  # each expert's choice equals searching it alone
        g_e, [(s_e, _)] = search_global([(w[e], None)], base[e], reference_block_search("max"))
        assert torch.equal(g[e], g_e) and torch.equal(scales[e].view(torch.uint8), s_e.view(torch.uint8))
