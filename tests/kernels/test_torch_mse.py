"""Parity: kernels.torch_mse.search_block_scales returns the reference's bytes on every block."""

import pytest
import torch

from moequant import kernels
from moequant.formats.fp8 import e4m3_positive_values
from moequant.formats.mse import search_block_scales_reference
from moequant.formats.nvfp4 import global_scale_from_amax, tensor_amax, weight_squared_error
from moequant.kernels import torch_mse, torch_pack

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: torch's intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _student_t(shape, df: int, seed: int) -> torch.Tensor:
    gen = _gen(seed)
    normal = torch.randn(shape, generator=gen)
    chi2 = torch.randn((df, *shape), generator=gen).square().sum(0)
    return normal / (chi2 / df).sqrt()


def _own_global(w: torch.Tensor) -> torch.Tensor:
    return global_scale_from_amax(tensor_amax(w, batch_dims=w.ndim - 2))


def assert_parity(w: torch.Tensor, global_scale: torch.Tensor, methods=("max", "mse")) -> float:
    """torch.equal on the E4M3 bytes for each method, and on the fp32 error bits at those scales and at the
    "max" method's (``search_with_max_errors``: one pass gives both).

    Returns the mean number of candidates the MSE search evaluated per block.
    """
    before = w.clone()
    width = 0.0
    for method in methods:
        ref = search_block_scales_reference(w, global_scale, method)
        fast, width_m = torch_mse.search_block_scales_with_stats(w, global_scale, method)
        assert fast.dtype == torch.float8_e4m3fn and fast.shape == ref.shape
        diff = (fast.view(torch.uint8) != ref.view(torch.uint8)).nonzero()
        assert diff.numel() == 0, f"{method}: {diff.shape[0]} blocks differ, first at {diff[0].tolist()}"
        width = width_m if method == "mse" else width
        err_ref = weight_squared_error(w, global_scale, ref)  # the twin of the error must match bit for bit
        err_fast = torch_mse.weight_squared_error(w, global_scale, ref)
        assert torch.equal(err_fast.view(torch.int32), err_ref.view(torch.int32)), f"{method}: errors differ"
        one_pass = torch_mse.search_block_scales_with_errors(w, global_scale, method)  # errors from the search
        assert torch.equal(one_pass[0].view(torch.uint8), ref.view(torch.uint8)), f"{method}: one-pass scales"
        assert torch.equal(one_pass[1].view(torch.int32), err_ref.view(torch.int32)), f"{method}: one-pass errors"
        with_max = torch_mse.search_with_max_errors(w, global_scale, method)  # "max"'s errors from the same pass
        err_max = weight_squared_error(w, global_scale, search_block_scales_reference(w, global_scale, "max"))
        assert torch.equal(with_max[0].view(torch.uint8), ref.view(torch.uint8)), f"{method}: with-max scales"
        assert torch.equal(with_max[1].view(torch.int32), err_ref.view(torch.int32)), f"{method}: with-max errors"
        assert torch.equal(with_max[2].view(torch.int32), err_max.view(torch.int32)), f"{method}: max errors"
    assert torch.equal(w, before), "the input weight was modified"
    return width


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["normal", "t2", "t3"])
def test_random_weights(kind, dtype, capsys):
    shape = (2, 64, 256)
    w = torch.randn(shape, generator=_gen(0)) if kind == "normal" else _student_t(shape, int(kind[1]), seed=1)
    w = (w * 0.02).to(dtype)
    width = assert_parity(w, _own_global(w))
    assert width < 24
    with capsys.disabled():
        print(f"\n[{kind} {dtype}] mean candidates evaluated per block: {width:.1f} of 126")


def test_batched_per_expert_global_scales():
    w = torch.randn(4, 32, 128, generator=_gen(2)) * torch.tensor([1.0, 1e-3, 30.0, 0.1]).reshape(4, 1, 1)
    w = w.to(torch.bfloat16)
    gs = _own_global(w)
    assert gs.shape == (4,)
    assert_parity(w, gs)
    assert_parity(w[0], gs[0])  # 2-D weight, 0-d global scale
    assert_parity(w, gs.max())  # one scalar global scale for every expert (a group)
    assert_parity(w.reshape(2, 2, 32, 128), gs.reshape(2, 2))  # two leading batch dimensions


@pytest.mark.parametrize("factor", [1.0, 2.0, 7.3, 64.0, 0.5, 0.13, 1 / 64])
def test_outside_global_scale_larger_and_smaller(factor):
    """A group's global scale is larger than the tensor's own; a smaller one forces saturation."""
    w = _student_t((2, 32, 128), 3, seed=3).to(torch.bfloat16)
    assert_parity(w, _own_global(w) * factor)


def test_zero_constant_and_outlier_blocks():
    gen = _gen(4)
    w = torch.randn(48, 128, generator=gen)
    w[0:8] = 0.0  # all-zero blocks
    w[8:16, :64] = 0.37  # constant blocks
    w[16:24] = -1.3
    w[24:40] = torch.randn(16, 128, generator=gen) * 1e-3
    w[24:40, 5::16] = 2.5  # one outlier per block
    w[40:44, :16] = -0.0
    w = w.to(torch.bfloat16)
    assert_parity(w, _own_global(w))
    assert_parity(torch.zeros(2, 8, 64), _own_global(torch.zeros(2, 8, 64)))  # all zero: 1/2688


@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 1e-20, 1e18])
def test_huge_and_tiny_magnitudes(magnitude):
    base = torch.randn(2, 16, 64, generator=_gen(5))
    w = (base * magnitude).to(torch.float32)
    assert_parity(w, _own_global(w))
    mixed = base.clone()
    mixed[0, :8] *= magnitude  # huge/tiny blocks next to ordinary ones under one global scale
    assert_parity(mixed, _own_global(mixed))
    assert_parity(mixed, torch.tensor(1.0))


def test_weird_global_scales_go_to_reference():
    w = torch.randn(2, 8, 64, generator=_gen(6))
    for gs in (1e-38, 1e-42, 1e36, 0.0):
        assert_parity(w, torch.tensor([gs, 1.0 / 2688]))


def test_fp4_rounding_ties():
    """Elements exactly at an E2M1 tie for some candidate scale: w = t * c * g with an exact product."""
    candidates = e4m3_positive_values()
    gen = _gen(7)
    rows = []
    for global_f32 in (2.0**-8, 1.0 / 2688):
        for c_index in (3, 40, 60, 90, 110, 125):
            scale = candidates[c_index] * global_f32  # the s the search computes, fp32
            ties = torch.tensor(TIES)[torch.randint(0, len(TIES), (8, 64), generator=gen)]
            sign = torch.randint(0, 2, (8, 64), generator=gen) * 2.0 - 1.0
            rows.append((ties * sign * scale, torch.tensor(global_f32)))
    for w, gs in rows:
        assert_parity(w, gs)  # fp32: t * s is exact for power-of-two g, a near-tie otherwise
        assert_parity(w.to(torch.bfloat16), gs)
    mixed = torch.cat([w for w, _ in rows[:6]])  # ties for several candidates within one tensor
    assert_parity(mixed, torch.tensor(2.0**-8))


def test_block_max_on_fp8_boundaries():
    """amax / 6 / g exactly on an E4M3 value, or exactly half way between two (the "max" rounding ties)."""
    candidates = e4m3_positive_values()
    mids = (candidates[1:] + candidates[:-1]) / 2
    global_f32 = 2.0**-7
    gen = _gen(8)
    for targets in (candidates, mids):
        amax = targets * 6.0 * global_f32  # [m] exact in fp32 and bf16
        body = torch.rand(targets.numel(), 16, generator=gen) * amax[:, None]
        body[:, 3] = -amax
        w = body  # [m, 16]: one block per row
        assert_parity(w, torch.tensor(global_f32))
        assert_parity(w.to(torch.bfloat16), torch.tensor(global_f32))


def test_non_contiguous_input_and_chunking(monkeypatch):
    w = torch.randn(2, 256, 48, generator=_gen(9)).transpose(-1, -2)  # [2, 48, 256], not contiguous
    monkeypatch.setattr(torch_mse, "BLOCKS_PER_CHUNK", 100)  # chunks that cut rows and experts unevenly
    assert_parity(w, _own_global(w))


def test_errors():
    with pytest.raises(ValueError, match="divisible by 16"):
        torch_mse.search_block_scales(torch.zeros(4, 24), torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown block-scale method"):
        torch_mse.search_block_scales(torch.zeros(4, 32), torch.tensor(1.0), "l1")


def test_backend_dispatch_reports_torch():
    w = torch.randn(8, 64, generator=_gen(10)).to(torch.bfloat16)
    scales, used = kernels.search_block_scales(w, _own_global(w), "mse", backend="torch")
    assert used == "torch"
    assert torch.equal(scales.view(torch.uint8), search_block_scales_reference(w, _own_global(w)).view(torch.uint8))


def test_fuzz_block_magnitudes_and_global_scales():
    """Blocks spanning 12 decades under one global scale, times a random outside factor: many windows cut."""
    for seed in range(12):
        gen = _gen(100 + seed)
        w = torch.randn(2, 16, 64, generator=gen) if seed % 2 else _student_t((2, 16, 64), 2 + seed % 3, seed)
        w = w * 10.0 ** (torch.rand(2, 16, 4, 1, generator=gen) * 12 - 8).repeat_interleave(16, -2).squeeze(-1)
        factor = 10.0 ** (torch.rand((), generator=gen) * 6 - 3)
        w = w.to([torch.float32, torch.bfloat16, torch.float16][seed % 3])
        assert bool(torch.isfinite(w).all())
        assert_parity(w, _own_global(w) * factor)


def test_weight_squared_error_any_scales():
    gen = _gen(11)
    w = _student_t((3, 16, 64), 3, seed=11).to(torch.bfloat16)
    bits = torch.randint(1, 127, (3, 16, 4), generator=gen, dtype=torch.int32).to(torch.uint8)
    block_scale = bits.view(torch.float8_e4m3fn)
    for gs in (_own_global(w), _own_global(w) * 1e-6, torch.tensor([1e-45, 0.0, float("inf")])):
        ref = weight_squared_error(w, gs, block_scale)
        fast = torch_mse.weight_squared_error(w, gs, block_scale)
        assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent GPU)")
def test_cuda_tensors_give_the_cpu_reference_bytes():
    """The vectorized path on CUDA must reproduce the CPU reference (IEEE divisions, no reciprocal tricks)."""
    for seed in range(6):
        w = _student_t((4, 64, 256), 2 + seed % 2, seed=200 + seed) * 10.0 ** (seed - 3)
        w = w.to([torch.float32, torch.bfloat16][seed % 2])
        gs = _own_global(w) * 2.0 ** (seed - 2)
        for method in ("max", "mse"):
            ref = search_block_scales_reference(w, gs, method)
            fast = torch_mse.search_block_scales(w.cuda(), gs.cuda(), method).cpu()
            assert torch.equal(fast.view(torch.uint8), ref.view(torch.uint8)), method
        err_fast = torch_mse.weight_squared_error(w.cuda(), gs.cuda(), ref.cuda()).cpu()
        assert torch.equal(err_fast.view(torch.int32), weight_squared_error(w, gs, ref).view(torch.int32))


def test_quantize_pack_nvfp4_gives_the_reference_bytes():
    """The export's packed codes: every E2M1 tie and boundary (both signs, +-1 ulp), zeros, saturation."""
    from moequant.formats.fp4 import pack_fp4
    from moequant.formats.nvfp4 import quantize_nvfp4

    points = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 6.5, 7.0,
                           1e6])
    near = torch.cat([points, torch.nextafter(points, points + 1), torch.nextafter(points, points - 1).abs()])
    gen = _gen(12)
    for global_f32 in (2.0**-8, 1.0 / 2688):
        scale = e4m3_positive_values()[60] * global_f32
        w = near[torch.randint(0, near.numel(), (40, 256), generator=gen)] * scale
        w = w * (torch.randint(0, 2, w.shape, generator=gen) * 2.0 - 1.0)
        w[0, :16] = -0.0
        block = torch.full((40, 16), float(e4m3_positive_values()[60])).to(torch.float8_e4m3fn)
        gs = torch.tensor(global_f32)
        assert torch.equal(torch_pack.quantize_pack_nvfp4(w, gs, block), pack_fp4(quantize_nvfp4(w, gs, block)))
    for seed in range(4):
        w = _student_t((300, 512), 3, seed=300 + seed).to([torch.float32, torch.bfloat16][seed % 2])
        gs = _own_global(w) * (0.25, 1.0, 3.0, 1e-30)[seed]
        for method in ("max", "mse"):
            block = torch_mse.search_block_scales(w, gs, method)
            fast = torch_pack.quantize_pack_nvfp4(w, gs, block)
            assert torch.equal(fast, pack_fp4(quantize_nvfp4(w, gs, block))), (seed, method)


def test_quantize_pack_nvfp4_batched_experts_give_the_reference_bytes():
    """[E, N, K] with one global scale per expert (the per-layer step packs a fused experts tensor in one call):
    the reference's bytes, also with an all-zero expert, a row count that is not a multiple of the work item,
    and one scalar global scale shared by every expert."""
    from moequant.formats.fp4 import pack_fp4
    from moequant.formats.nvfp4 import quantize_nvfp4

    w = _student_t((5, 301, 64), 3, seed=41).to(torch.bfloat16)
    w[2] = 0
    gs = torch.stack([_own_global(w[e]) if e != 2 else torch.tensor(1.0) for e in range(5)])
    for method in ("max", "mse"):
        block = torch_mse.search_block_scales(w, gs, method)
        assert torch.equal(torch_pack.quantize_pack_nvfp4(w, gs, block), pack_fp4(quantize_nvfp4(w, gs, block)))
        one = gs.max()
        block = torch_mse.search_block_scales(w, one, method)
        assert torch.equal(torch_pack.quantize_pack_nvfp4(w, one, block), pack_fp4(quantize_nvfp4(w, one, block)))
    with pytest.raises(ValueError, match="one global scale per leading index"):
        torch_pack.quantize_pack_nvfp4(w, gs[:3], torch_mse.search_block_scales(w, gs, "max"))


def test_error_loop_compiled_and_plain_python_agree(monkeypatch):
    """The error loop runs compiled by TorchScript (GIL-free) where available, else as Python: same bits."""
    w = _student_t((2, 48, 256), 3, seed=13).to(torch.bfloat16)
    gs = _own_global(w)
    compiled = torch_mse.search_block_scales_with_errors(w, gs, "mse")
    if hasattr(torch, "jit"):
        assert torch_mse._errors_runner() is not torch_mse._errors_loop, "TorchScript compile failed: slow path"
    monkeypatch.setattr(torch_mse, "_SCRIPTED", [None])
    assert torch_mse._errors_runner() is torch_mse._errors_loop
    plain = torch_mse.search_block_scales_with_errors(w, gs, "mse")
    assert torch.equal(compiled[0].view(torch.uint8), plain[0].view(torch.uint8))
    assert torch.equal(compiled[1].view(torch.int32), plain[1].view(torch.int32))
    assert_parity(w, gs)  # the plain path against the reference too
