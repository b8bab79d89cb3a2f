"""GPU parity of the Triton block-scale search with the reference (``formats.mse``), bit for bit.

Marked ``gpu``: skipped without CUDA (CI), run on the lent GPU. The case generators take a device so the
same cases can be run on CPU through Triton's interpreter (``TRITON_INTERPRET=1``) while developing.
"""

from __future__ import annotations

import pytest
import torch

from moequant.formats.fp4 import pack_fp4
from moequant.formats.fp8 import e4m3_positive_values
from moequant.formats.mse import search_block_scales_reference
from moequant.formats.nvfp4 import global_scale_from_amax, quantize_nvfp4, tensor_amax, weight_squared_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent GPU)"),
]

THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def own_global(w: torch.Tensor) -> torch.Tensor:
    """Per-batch global scale of ``w [..., N, K]`` from its own amax."""
    return global_scale_from_amax(tensor_amax(w, w.ndim - 2))


def random_cases(gen: torch.Generator, scale: int = 1):
    """(name, w fp32, global scale or None=own) for heavy and light tails, bf16/fp16/fp32 shapes."""
    n = 96 * scale
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    yield "normal [N,K]", torch.randn(n, 256, generator=gen), None
    t = torch.distributions.StudentT(torch.tensor(2.5))
    yield "student-t [E,N,K]", t.sample((4, n // 4, 128)), None
    yield "uniform odd N", torch.rand(n + 37, 64, generator=gen) - 0.5, None
    w = torch.randn(5, 23, 80, generator=gen) * torch.logspace(-3, 2, 5).reshape(5, 1, 1)
    yield "experts of mixed magnitude", w, None
    w = torch.randn(3, 17, 48, generator=gen)
    yield "shared group scale", w, global_scale_from_amax(w.abs().amax() * 4).expand(3).clone()


def adversarial_cases(gen: torch.Generator):
    """Zeros, constants, outliers, exact FP4 ties, huge/tiny/subnormal values, odd global scales."""
    yield "all zero", torch.zeros(7, 32), None
    w = torch.randn(4, 9, 64, generator=gen)
    w[1] = 0.0
    w[2, :, :16] = 0.0
    yield "zero expert and zero blocks", w, None
    const = torch.tensor([1.0, -3.0, 1e-3, 7.5, 448.0, 2.0**-20]).repeat_interleave(16)
    yield "constant blocks", torch.cat([const, -const]).reshape(-1, 32), None
    w = torch.randn(40, 64, generator=gen) * 1e-3
    w[:, ::16] = torch.randn(40, 4, generator=gen) * 10
    yield "one outlier per block", w, None
    w = torch.zeros(40, 64)
    w[:, 5::16] = torch.randn(40, 4, generator=gen)
    yield "one non-zero per block", w, None
    ratio = torch.linspace(1.01, 12.0, 128)
    w = torch.ones(128, 16)
    w[:, 3] = ratio
    yield "outlier over 15 equal values (saturating wins)", w.reshape(32, 64), None
    yield "huge fp32 (errors overflow)", torch.randn(16, 64, generator=gen) * 1e30, None
    yield "near fp32 max", torch.randn(8, 32, generator=gen).clamp(-1, 1) * 3e38, None
    yield "tiny / subnormal", torch.randn(16, 64, generator=gen) * 1e-39, None
    yield "tiny, exponent-normalized", torch.randn(2, 16, 64, generator=gen) * 2.0**-100, None
    w = torch.randn(16, 64, generator=gen)
    yield "global scale too small (saturates)", w, own_global(w) / 64
    yield "global scale too large (tiny blocks)", w, own_global(w) * 2.0**20
    yield "global scale minimal", w * 1e-30, torch.tensor(2.0**-126)
    yield "448 * global scale overflows", w, torch.tensor(1e37)
    yield from tie_cases(gen)


def tie_cases(gen: torch.Generator):
    """Elements exactly at FP4 decision points t * s_k (and one ulp either side), power-of-two global scale."""
    gs = torch.tensor(2.0**-8)
    cand = e4m3_positive_values()[torch.randint(20, 126, (64,), generator=gen)]
    t = torch.tensor(THRESHOLDS)[torch.randint(0, 7, (64, 16), generator=gen)]
    exact = t * (cand[:, None] * gs)
    sign = torch.where(torch.rand(64, 16, generator=gen) < 0.5, -1.0, 1.0)
    yield "FP4 ties t*c*gs", (exact * sign).reshape(32, 32), gs
    up = torch.nextafter(exact, torch.full_like(exact, float("inf")))
    down = torch.nextafter(exact, torch.zeros_like(exact))
    mix = torch.where(torch.rand(64, 16, generator=gen) < 0.5, up, down)
    yield "FP4 ties +-1 ulp", mix.reshape(32, 32), gs
    gs_rand = own_global(exact)
    yield "FP4 ties, random global", exact.reshape(32, 32), gs_rand


def check_case(w: torch.Tensor, gs: torch.Tensor | None, dtype: torch.dtype, device: str, search) -> list[str]:
    """Compare scales, packed codes and errors of ``search`` against the CPU reference; return failures."""
    w = w.to(dtype)
    gs = own_global(w) if gs is None else gs
    failures = []
    for method in ("mse", "max"):
        scales, codes, errors = search(w.to(device), gs.to(device), method, return_codes=True, return_errors=True)
        ref = search_block_scales_reference(w, gs, method)
        ref_err = weight_squared_error(w, gs, ref)  # exponent-normalized for tiny tensors, as the search
        ref_codes = pack_fp4(quantize_nvfp4(w, gs, ref))
        if not torch.equal(scales.cpu().view(torch.uint8), ref.view(torch.uint8)):
            bad = int((scales.cpu().view(torch.uint8) != ref.view(torch.uint8)).sum())
            failures.append(f"{method} scales: {bad} of {ref.numel()} blocks differ")
        if not torch.equal(codes.cpu(), ref_codes):
            failures.append(f"{method} codes differ")
        if not torch.equal(errors.cpu().view(torch.int32), ref_err.view(torch.int32)):
            failures.append(f"{method} errors differ")
        if search is _search:  # quantize's one-launch entry: the same scales and errors, plus max's errors
            from moequant.kernels import triton_mse

            one = triton_mse.search_with_max_errors(w.to(device), gs.to(device), method, return_codes=True)
            max_err = weight_squared_error(w, gs, search_block_scales_reference(w, gs, "max"))
            if not (torch.equal(one[0].cpu().view(torch.uint8), ref.view(torch.uint8))
                    and torch.equal(one[1].cpu().view(torch.int32), ref_err.view(torch.int32))
                    and torch.equal(one[2].cpu().view(torch.int32), max_err.view(torch.int32))
                    and torch.equal(one[3].cpu(), ref_codes)):
                failures.append(f"{method}: search_with_max_errors differs from the reference")
    return failures


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _search(*args, **kwargs):
    from moequant.kernels import triton_mse

    return triton_mse.search_block_scales(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    for name, w, gs in random_cases(gen, scale=8):
        assert check_case(w, gs, dtype, "cuda", _search) == [], name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_matches_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    for name, w, gs in adversarial_cases(gen):
        if dtype == torch.float16 and w.abs().max() > 65504:
            continue  # not representable in fp16
        assert check_case(w, gs, dtype, "cuda", _search) == [], name


@pytest.mark.parametrize("low_margin", (0, 1))
def test_window_extension_is_exact(low_margin):
    """Start the window at or just below kA so the downward extension loop decides most blocks."""
    gen = torch.Generator().manual_seed(3)

    def search(*args, **kwargs):
        return _search(*args, **kwargs, _low_margin=low_margin)

    for name, w, gs in list(random_cases(gen, scale=2)) + list(adversarial_cases(gen)):
        assert check_case(w, gs, torch.float32, "cuda", search) == [], name


def channel_weight_cases(w: torch.Tensor, gen: torch.Generator):
    """(name, h) for w [..., N, K]: heavy-tailed, zero channels, an all-zero block, huge/tiny, per expert."""
    k = w.shape[-1]
    h = torch.rand(k, generator=gen) ** 4
    h[::7] = 0.0
    yield "heavy-tailed with zeros", h
    h = torch.rand(k, generator=gen)
    h[:16] = 0.0
    yield "one all-zero block", h
    yield "huge and tiny", torch.where(torch.rand(k, generator=gen) < 0.5, 1e30, 1e-30)
    yield "ones (= mse)", torch.ones(k)
    if w.ndim == 3:
        yield "per expert", torch.rand(w.shape[0], k, generator=gen) ** 2


def check_weighted(w, gs, h, dtype, low_margin=2) -> list[str]:
    from moequant.formats.weighted_mse import search_weighted_reference
    from moequant.kernels import triton_mse

    w = w.to(dtype)
    gs = own_global(w) if gs is None else gs
    ref = search_weighted_reference(w, gs, h)
    scales, errors, max_errors = triton_mse.search_weighted(w.cuda(), gs.cuda(), h.cuda(), return_errors=True,
                                                            _low_margin=low_margin)
    failures = []
    if not torch.equal(scales.cpu().view(torch.uint8), ref.view(torch.uint8)):
        bad = int((scales.cpu().view(torch.uint8) != ref.view(torch.uint8)).sum())
        failures.append(f"scales: {bad} of {ref.numel()} blocks differ")
    if not torch.equal(errors.cpu().view(torch.int32), weight_squared_error(w, gs, ref).view(torch.int32)):
        failures.append("plain errors differ")
    ref_max = search_block_scales_reference(w, gs, "max")
    if not torch.equal(max_errors.cpu().view(torch.int32), weight_squared_error(w, gs, ref_max).view(torch.int32)):
        failures.append("max errors differ")
    return failures


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_matches_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    for name, w, gs in list(random_cases(gen)) + list(adversarial_cases(gen)):
        if dtype == torch.float16 and w.abs().max() > 65504:
            continue
        for h_name, h in channel_weight_cases(w, gen):
            assert check_weighted(w, gs, h, dtype) == [], (name, h_name)


def test_weighted_window_extension_is_exact():
    gen = torch.Generator().manual_seed(5)
    for name, w, gs in list(random_cases(gen)) + list(adversarial_cases(gen)):
        for h_name, h in channel_weight_cases(w, gen):
            assert check_weighted(w, gs, h, torch.float32, low_margin=0) == [], (name, h_name)


def test_weighted_quantize_on_cuda_equals_the_torch_backend():
    """nvfp4-best's weight search on the GPU (Triton) gives the CPU torch twin's bytes, end to end."""
    from biased_models import biased, calib_ids, recipe

    from moequant import quantize

    model = biased("qwen3_moe").cuda()
    results = {b: quantize(model, recipe("nvfp4-best"), calib_ids(), backend=b) for b in ("triton", "torch")}
    assert results["triton"].state.backend == "triton" and results["torch"].state.backend == "torch"
    for key, s in results["torch"].state.tensors.items():
        t = results["triton"].state.tensors[key]
        assert torch.equal(t.block_scale.view(torch.uint8), s.block_scale.view(torch.uint8)), key
        # per-block errors are bit-identical; their per-expert sums run on the GPU in both (reduction order)
        torch.testing.assert_close(t.sq_error, s.sq_error, rtol=1e-5, atol=0)
        torch.testing.assert_close(t.sq_error_max, s.sq_error_max, rtol=1e-5, atol=0)


def test_dispatch_uses_triton_on_cuda():
    from moequant.kernels import search_block_scales

    w = torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16)
    scales, backend = search_block_scales(w, own_global(w), "mse", backend="triton")
    assert backend == "triton"
    assert torch.equal(scales.cpu().view(torch.uint8), search_block_scales_reference(w.cpu(), own_global(w.cpu())).view(torch.uint8))


def test_rejects_bad_inputs():
    w = torch.randn(4, 30, device="cuda")
    with pytest.raises(ValueError):
        _search(w, torch.tensor(1.0), "mse")
    with pytest.raises(ValueError):
        _search(torch.randn(4, 32, device="cuda"), torch.tensor(0.0), "mse")
    with pytest.raises(ValueError):
        _search(torch.randn(4, 32, device="cuda"), torch.tensor(1.0), "median")
