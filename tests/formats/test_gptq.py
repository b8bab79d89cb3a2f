"""The GPTQ reference (formats.gptq): it lowers the output error at fixed scales, and its edge cases."""

import torch
from gptq_problems import inputs, problem

from moequant.formats import gptq
from moequant.formats.fp4 import E2M1_MAGNITUDES, decode_e2m1
from moequant.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4, weight_squared_error


def _objective(w, gs, bs, codes, h):
    return float(gptq.output_error(w, dequantize_nvfp4(codes, gs, bs), h))


def test_lowers_the_output_error_at_the_weighted_searchs_scales():
    """The point of the method: at the very scales weighted_mse ships, GPTQ's codes give a lower
    tr((W - Q) H (W - Q)^T) than round to nearest, by a clear margin on correlated inputs."""
    for seed in range(3):
        w, gs, bs, h = problem(None, 48, 128, 2048, seed)
        codes, ok = gptq.gptq_codes_reference(w, gs, bs, h)
        rtn = quantize_nvfp4(w, gs, bs)
        assert ok
        ratio = _objective(w, gs, bs, codes, h) / _objective(w, gs, bs, rtn, h)
        assert ratio < 0.85, (seed, ratio)
        assert torch.equal(codes[:, 0], rtn[:, 0])  # nothing is fed back into the first column


def test_diagonal_h_gives_round_to_nearest_exactly():
    w, gs, bs, h = problem(None, 32, 64, 512, 1)
    codes, ok = gptq.gptq_codes_reference(w, gs, bs, torch.diag(h.diagonal()))
    assert ok and torch.equal(codes, quantize_nvfp4(w, gs, bs))


def test_codes_are_canonical_e2m1_within_the_block_range():
    w, gs, bs, h = problem(None, 32, 96, 1024, 2, mix=3.0)
    codes, _ = gptq.gptq_codes_reference(w, gs, bs, h)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert not bool((codes == 8).any())  # -0 is never produced
    assert set(decode_e2m1(codes).abs().unique().tolist()) <= set(E2M1_MAGNITUDES)
    scale = gptq.column_scales(gs, bs, w.shape[-1])
    deq = dequantize_nvfp4(codes, gs, bs)
    assert torch.equal(deq, decode_e2m1(codes) * scale) and bool((deq.abs() <= 6 * scale).all())


def test_dead_channels_keep_their_weights_and_get_no_feedback():
    w, gs, bs, h = problem(None, 24, 64, 1024, 3)
    dead = torch.tensor([5, 17, 40])
    h[dead, :] = 0
    h[:, dead] = 0
    codes, ok = gptq.gptq_codes_reference(w, gs, bs, h)
    rtn = quantize_nvfp4(w, gs, bs)
    assert ok
    assert torch.equal(codes[:, dead], rtn[:, dead]) and bool((codes[:, dead] != 0).any())
    assert not torch.equal(codes, rtn)


def test_failed_factorization_falls_back_to_round_to_nearest():
    w, gs, bs, h = problem(None, 16, 32, 256, 4)
    for bad in (-torch.eye(32, dtype=torch.float64), torch.full((32, 32), float("nan"), dtype=torch.float64)):
        codes, ok = gptq.gptq_codes_reference(w, gs, bs, bad)
        assert not ok and torch.equal(codes, quantize_nvfp4(w, gs, bs))


def test_output_error_is_the_mean_squared_output_error():
    gen = torch.Generator().manual_seed(5)
    x = inputs(300, 32, gen)
    w, q = torch.randn(8, 32, generator=gen), torch.randn(8, 32, generator=gen)
    direct = float(((x @ (w.double() - q.double()).T) ** 2).sum() / 300)
    assert abs(float(gptq.output_error(w, q, x.T @ x / 300)) - direct) <= 1e-10 * direct  # float64, other order


def test_plain_error_of_round_to_nearest_codes_is_nvfp4s_bit_for_bit():
    w, gs, bs, _ = problem(3, 16, 64, 64, 6)
    assert torch.equal(gptq.code_block_squared_error(w, quantize_nvfp4(w, gs, bs), gs, bs),
                       weight_squared_error(w, gs, bs))


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    """U from one factorization of J H J (step 3) is the textbook U = cholesky(H^-1, upper) of the damped H:
    upper triangular, positive diagonal, U^T U H = I, equal to the textbook route to float64 rounding."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 300, 96, generator=gen, dtype=torch.float64) * torch.rand(3, 1, 96, generator=gen).add(0.1)
    h = x.transpose(1, 2) @ x / 300
    h[1, :, 5] = h[1, 5, :] = 0.0                                    # a dead channel: H_kk = 1, then damped
    u, ok = gptq.inverse_factor(h)
    assert bool(ok.all())
    assert torch.equal(u, u.triu()) and bool((u.diagonal(dim1=-2, dim2=-1) > 0).all())
    damped = h.clone()
    d = damped.diagonal(dim1=-2, dim2=-1)
    d.masked_fill_(d == 0, 1.0)
    d.add_(gptq.DAMP * d.mean(-1, keepdim=True))
    eye = torch.eye(96, dtype=torch.float64).expand(3, 96, 96)
    assert torch.allclose(u.transpose(1, 2) @ u @ damped, eye, atol=1e-9)
    textbook = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert torch.allclose(u, textbook, rtol=1e-10, atol=1e-12 * float(textbook.abs().max()))


def test_column_order_and_its_inverse():
    h = torch.diag(torch.tensor([1.0, 5.0, 5.0, 0.5, 9.0], dtype=torch.float64))
    order = gptq.column_order(h)
    assert order.tolist() == [4, 1, 2, 0, 3]                     # decreasing H_kk, ties in index order
    x = torch.arange(10.0).reshape(2, 5)
    assert torch.equal(gptq.permute_columns(x, order)[0], torch.tensor([4.0, 1.0, 2.0, 0.0, 3.0]))
    assert torch.equal(gptq.unpermute_columns(gptq.permute_columns(x, order), order), x)
    assert torch.equal(gptq.permute_columns(h, order, square=True).diagonal(),
                       torch.tensor([9.0, 5.0, 5.0, 1.0, 0.5], dtype=torch.float64))


def test_act_order_with_diagonal_h_is_still_round_to_nearest():
    w, gs, bs, h = problem(None, 16, 64, 256, 7)
    diag = torch.diag(h.diagonal())
    assert torch.equal(gptq.gptq_codes_reference(w, gs, bs, diag, act_order=True)[0], quantize_nvfp4(w, gs, bs))
