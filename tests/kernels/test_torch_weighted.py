"""Parity: kernels.torch_weighted and kernels.block_search return the references' bytes on every block."""

import pytest
import torch

from moequant import kernels
from moequant.formats.fp8 import e4m3_positive_values
from moequant.formats.global_search import reference_block_search, search_global
from moequant.formats.mse import search_block_scales_reference
from moequant.formats.nvfp4 import WeightError, global_scale_from_amax, tensor_amax
from moequant.formats.weighted_mse import search_weighted_reference
from moequant.kernels import torch_weighted

TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _own_global(w: torch.Tensor) -> torch.Tensor:
    return global_scale_from_amax(tensor_amax(w, batch_dims=w.ndim - 2))


def _weights(shape, seed: int, kind: str = "lognormal") -> torch.Tensor:
    gen = _gen(seed)
    if kind == "lognormal":  # activations: a few channels 100x the others, like real LLM inputs
        return torch.randn(shape, generator=gen).mul(2.0).exp()
    if kind == "sparse":
        h = torch.rand(shape, generator=gen)
        return torch.where(torch.rand(shape, generator=gen) < 0.5, torch.zeros_like(h), h)
    return torch.ones(shape)


def assert_parity(w, gs, h):
    before = w.clone()
    ref = search_weighted_reference(w, gs, h)
    fast = torch_weighted.search_weighted(w, gs, h)
    diff = (fast.view(torch.uint8) != ref.view(torch.uint8)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} blocks differ, first at {diff[0].tolist()}"
    assert torch.equal(w, before)
    return ref


@pytest.mark.parametrize("kind", ["lognormal", "sparse", "ones"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_random_weights(kind, dtype):
    w = (torch.randn(3, 24, 128, generator=_gen(1)) * torch.rand(3, 24, 1, generator=_gen(2))).to(dtype)
    assert_parity(w, _own_global(w), _weights((128,), 3, kind))
    assert_parity(w, _own_global(w), _weights((3, 128), 4, kind))  # per expert


def test_unit_weights_equal_plain_mse():
    w = torch.randn(2, 16, 64, generator=_gen(5))
    gs = _own_global(w)
    assert torch.equal(assert_parity(w, gs, torch.ones(64)).view(torch.uint8),
                       search_block_scales_reference(w, gs, "mse").view(torch.uint8))


def test_adversarial_blocks_and_scales():
    gen = _gen(6)
    w = torch.randn(48, 128, generator=gen)
    w[0:8] = 0.0
    w[8:16, :64] = 0.37
    w[24:40] = torch.randn(16, 128, generator=gen) * 1e-3
    w[24:40, 5::16] = 2.5
    h = _weights((128,), 7)
    h[:16] = 0.0  # a block with all-zero weights: every candidate ties at 0
    h[40] = 1e30  # one huge weight: errors overflow to inf for some candidates
    for gs in (_own_global(w), _own_global(w) * 3, _own_global(w) / 5, torch.tensor(1e-42), torch.tensor(1e36)):
        assert_parity(w, gs, h)
        assert_parity(w.to(torch.bfloat16), gs, h)
    for magnitude in (1e-30, 1e18):
        assert_parity(w * magnitude, _own_global(w * magnitude), h)


def test_fp4_ties_and_chunking(monkeypatch):
    candidates = e4m3_positive_values()
    gen = _gen(8)
    for c_index in (3, 60, 110, 125):
        scale = candidates[c_index] * 2.0**-8
        ties = torch.tensor(TIES)[torch.randint(0, len(TIES), (8, 64), generator=gen)]
        assert_parity(ties * scale, torch.tensor(2.0**-8), _weights((64,), c_index))
    monkeypatch.setattr(torch_weighted, "BLOCKS_PER_CHUNK", 100)
    w = torch.randn(2, 256, 48, generator=gen).transpose(-1, -2)
    assert_parity(w, _own_global(w), _weights((2, 256), 9))


def test_bad_channel_weights():
    w = torch.randn(4, 32)
    for h in (torch.ones(16), -torch.ones(32), torch.full((32,), float("nan"))):
        with pytest.raises(WeightError):
            torch_weighted.search_weighted(w, _own_global(w), h)
    with pytest.raises(kernels.BackendUnavailable):
        kernels.search_weighted_block_scales(w, _own_global(w), torch.ones(32), backend="triton")


@pytest.mark.parametrize("method", ["max", "mse", "weighted_mse", "four_over_six"])
@pytest.mark.parametrize("weighted", [False, True])
def test_global_search_fast_equals_reference(method, weighted):
    if method == "weighted_mse" and not weighted:
        pytest.skip("weighted_mse needs channel weights")
    gen = _gen(10)
    experts = torch.randn(3, 16, 64, generator=gen) * torch.rand(3, 1, 64, generator=gen)
    q, k = torch.randn(16, 64, generator=gen), torch.randn(8, 64, generator=gen) * 3
    h = _weights((64,), 11) if weighted else None
    for members, base in (([(experts, h)], _own_global(experts)),
                          ([(q, h), (k, h)], global_scale_from_amax(torch.maximum(q.abs().amax(), k.abs().amax())))):
        g_ref, found_ref = search_global(members, base, reference_block_search(method))
        g_fast, found_fast = search_global(members, base, kernels.block_search(method, "torch"))
        assert torch.equal(g_ref, g_fast) and g_ref.shape == base.shape
        for (s_ref, e_ref), (s_fast, e_fast) in zip(found_ref, found_fast):
            assert torch.equal(s_ref.view(torch.uint8), s_fast.view(torch.uint8))
            assert torch.equal(e_ref.view(torch.int32), e_fast.view(torch.int32))
