"""NVFP4 reference (moequant.formats.nvfp4 and .mse): errors, degenerate inputs, MSE <= max per block."""

import pytest
import torch

from moequant.formats.mse import search_block_scales_reference
from moequant.formats.nvfp4 import (
    GLOBAL_DIVISOR,
    MIN_GLOBAL_SCALE,
    WeightError,
    check_weight,
    dequantize_nvfp4,
    fake_quantize_nvfp4,
    global_scale_from_amax,
    quantize_nvfp4,
    tensor_amax,
    to_blocks,
    weight_squared_error,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: torch's intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _student_t(shape, df: int, seed: int) -> torch.Tensor:
    """Student-t with integer ``df``: normal / sqrt(chi^2(df) / df), chi^2 as a sum of df squared normals."""
    gen = _seeded(seed)
    normal = torch.randn(shape, generator=gen)
    chi2 = torch.randn((df, *shape), generator=gen).square().sum(0)
    return normal / (chi2 / df).sqrt()


def test_shape_error_names_tensor():
    with pytest.raises(WeightError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*divisible by .*16"):
        check_weight(torch.zeros(4, 24), "model.layers.0.mlp.down_proj.weight")
    with pytest.raises(WeightError, match="lm_head.weight"):
        check_weight(torch.zeros(32), "lm_head.weight")
    with pytest.raises(WeightError, match="experts.gate_up_proj.*dtype"):
        check_weight(torch.zeros(2, 16, dtype=torch.int32), "experts.gate_up_proj")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_raises_naming_tensor(bad, dtype):
    w = torch.zeros(3, 4, 32, dtype=dtype)
    w[1, 2, 17] = bad
    with pytest.raises(WeightError, match=r"mlp\.experts\.down_proj: 1 non-finite value.*\[1, 2, 17\]"):
        check_weight(w, "mlp.experts.down_proj")
    # a transposed view (read in storage order for the check): the index is still the view's
    t = w.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not t.is_contiguous()
    with pytest.raises(WeightError, match=r"mlp\.experts\.down_proj: 1 non-finite value.*\[1, 2, 17\]"):
        check_weight(t, "mlp.experts.down_proj")


def test_check_weight_accepts_good_weights():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_weight(torch.randn(2, 8, 64, generator=_seeded(0)).to(dtype), "ok")


def test_all_zero_tensor():
    w = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    gs = global_scale_from_amax(tensor_amax(w, batch_dims=1))
    assert gs.dtype == torch.float32
    assert torch.equal(gs, torch.full((2,), 1.0, dtype=torch.float32) / GLOBAL_DIVISOR)  # fp32 1/2688
    for method in ("max", "mse"):
        scales = search_block_scales_reference(w, gs, method)
        assert scales.shape == (2, 8, 4) and scales.dtype == torch.float8_e4m3fn
        assert bool((scales.to(torch.float32) == 2.0**-9).all())
        codes = quantize_nvfp4(w, gs, scales)
        assert bool((codes == 0).all())
        deq = dequantize_nvfp4(codes, gs, scales)
        assert torch.equal(deq, torch.zeros(2, 8, 64)) and not bool(torch.signbit(deq).any())


def test_global_scale_rules():
    assert global_scale_from_amax(torch.tensor(2688.0)).item() == 1.0
    assert global_scale_from_amax(torch.tensor(0.0)).item() == torch.tensor(1 / 2688, dtype=torch.float32).item()
    assert global_scale_from_amax(torch.tensor(1e-40)).item() == MIN_GLOBAL_SCALE == 2.0**-126


def test_exact_values_round_trip():
    gs = torch.tensor(2.0**-5)
    block_scale = torch.tensor([[3.0, 0.5]]).to(torch.float8_e4m3fn)  # [N=1, K/16=2]
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, 6.0])
    w = torch.cat([grid * 3.0, grid * 0.5]).reshape(1, 32) * 2.0**-5
    assert torch.equal(fake_quantize_nvfp4(w, gs, block_scale), w)
    assert weight_squared_error(w, gs, block_scale).tolist() == [[0.0, 0.0]]


def _structured_blocks() -> torch.Tensor:
    gen = _seeded(3)
    rows = [
        torch.full((64,), 0.37),
        torch.full((64,), -1.3),
        torch.linspace(-1.0, 1.0, 64),
        torch.where(torch.arange(64) % 16 == 5, 40.0, 1.0) * torch.randn(64, generator=gen).sign(),
        torch.randn(64, generator=gen) * torch.logspace(-3, 3, 64),
        torch.tensor([2.0**k for k in range(-8, 8)] * 4),
    ]
    return torch.stack(rows)  # [6, 64]


@pytest.mark.parametrize("kind", ["normal", "student_t3", "structured"])
def test_mse_never_worse_than_max_per_block(kind, capsys):
    if kind == "normal":
        w = torch.randn(4, 32, 256, generator=_seeded(1))
    elif kind == "student_t3":
        w = _student_t((4, 32, 256), 3, seed=2)
    else:
        w = _structured_blocks().unsqueeze(0)
    w = w.to(torch.bfloat16)
    gs = global_scale_from_amax(tensor_amax(w, batch_dims=1))
    err_max = weight_squared_error(w, gs, search_block_scales_reference(w, gs, "max"))
    err_mse = weight_squared_error(w, gs, search_block_scales_reference(w, gs, "mse"))
    assert bool((err_mse <= err_max).all())
    total_max, total_mse = err_max.double().sum().item(), err_mse.double().sum().item()
    assert total_mse < total_max
    with capsys.disabled():
        print(f"\n[{kind}] MSE vs max squared error: -{100 * (1 - total_mse / total_max):.1f}%")


def test_to_blocks_layout():
    w = torch.arange(64, dtype=torch.float32).reshape(2, 32)
    blocks = to_blocks(w.to(torch.bfloat16))
    assert blocks.shape == (2, 2, 16) and blocks.dtype == torch.float32
    assert blocks[1, 0].tolist() == list(range(32, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_amax_is_the_float32_abs_max(dtype):
    """``tensor_amax`` (min/max, no |w| copy) has the bits of its definition ``w.float().abs().amax()`` per
    batch index: signed zeros (an all-zero slice gives +0.0), a negative extreme, inf and NaN."""
    w = _student_t((4, 6, 32), 3, seed=21)
    w[0] = -0.0
    w[1] = 0.0
    w[2, 3, 5] = -1e4   # the extreme is negative
    w[3, 0, 0] = float("nan")
    w = w.to(dtype)
    # also a transposed view of a contiguous [E, K, N] tensor (how fused experts are stored), which is read in
    # storage order where the reduction covers both transposed dimensions
    for view in (w, w.transpose(-1, -2).contiguous().transpose(-1, -2)):
        for batch_dims in (0, 1, 2):
            got = tensor_amax(view, batch_dims)
            want = view.to(torch.float32).abs().reshape(*view.shape[:batch_dims], -1).amax(dim=-1)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.equal(got.isnan(), want.isnan())
            assert torch.equal(got.nan_to_num().view(torch.int32), want.nan_to_num().view(torch.int32)), batch_dims
    inf = torch.tensor([[1.0, float("-inf")], [0.0, -0.0]], dtype=dtype)
    assert tensor_amax(inf, 1).tolist() == [float("inf"), 0.0]
