"""The batched GPTQ (kernels.torch_gptq) against the per-matrix reference (formats.gptq).

The two sum the float64 updates in another order (column blocks of 128 vs 16), so they are compared by codes on
well-conditioned problems (where a last-bit difference cannot reach an E2M1 decision boundary in practice; it
holds on every seed below) and by the objective on ill-conditioned ones (relative tolerance 1e-6: a flipped code
moves the objective by far more than float64 noise, far less than 1e-6 of it only if it is a near tie)."""

import pytest
import torch
from gptq_problems import problem

from moequant.formats import gptq
from moequant.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from moequant.kernels import torch_gptq
from moequant.kernels.torch_gptq import gptq_codes


def _reference(w, gs, bs, h):
    return torch.stack([gptq.gptq_codes_reference(w[e], gs[e], bs[e], h[e])[0] for e in range(w.shape[0])])


def _objective(w, gs, bs, codes, h):
    return gptq.output_error(w, dequantize_nvfp4(codes, gs, bs), h)


@pytest.mark.parametrize("shape", [(3, 40, 192, 1024), (2, 32, 320, 4096), (1, 16, 64, 256)])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_codes_equal_the_reference(shape, seed):
    e, n, k, tokens = shape
    w, gs, bs, h = problem(e, n, k, tokens, seed)
    codes, ok = gptq_codes(w, gs, bs, h, torch.ones(e, dtype=torch.bool))
    assert bool(ok.all())
    assert torch.equal(codes, _reference(w, gs, bs, h))


def test_linear_weight_without_expert_axis():
    w, gs, bs, h = problem(None, 24, 160, 1024, 2)
    codes, ok = gptq_codes(w, gs, bs, h, torch.tensor(True))
    assert ok.shape == () and bool(ok)
    assert torch.equal(codes, gptq.gptq_codes_reference(w, gs, bs, h)[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ill_conditioned_objective_within_tolerance(seed):
    e, n, k = 3, 40, 256
    w, gs, bs, h = problem(e, n, k, 260, seed, mix=20.0)   # barely more tokens than channels, strongly mixed
    codes, _ = gptq_codes(w, gs, bs, h, torch.ones(e, dtype=torch.bool))
    ref = _reference(w, gs, bs, h)
    batched, plain = _objective(w, gs, bs, codes, h), _objective(w, gs, bs, ref, h)
    assert bool(((batched - plain).abs() <= 1e-6 * plain).all()), (batched, plain)
    assert bool((plain < _objective(w, gs, bs, quantize_nvfp4(w, gs, bs), h)).all())


def test_unused_experts_get_round_to_nearest_and_chunks_change_nothing(monkeypatch):
    w, gs, bs, h = problem(4, 32, 128, 512, 3)
    use = torch.tensor([True, False, True, False])
    whole, ok = gptq_codes(w, gs, bs, h, use)
    assert ok.tolist() == [True, False, True, False]
    rtn = quantize_nvfp4(w, gs, bs)
    assert torch.equal(whole[1], rtn[1]) and torch.equal(whole[3], rtn[3])
    assert not torch.equal(whole[0], rtn[0])
    monkeypatch.setattr(torch_gptq, "CHUNK_BYTES", 128 * 128 * 8)   # one expert per chunk
    assert torch.equal(gptq_codes(w, gs, bs, h, use)[0], whole)


def test_shape_mismatch_is_refused():
    w, gs, bs, h = problem(2, 16, 64, 128, 4)
    with pytest.raises(ValueError, match="do not fit"):
        gptq_codes(w, gs, bs, h[0], torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_act_order_batched_equals_reference_and_lowers_the_objective(seed):
    """Columns by decreasing H_kk: the batched twin's codes are the reference's (same order, per expert), and on
    inputs with channels of very different sizes the objective falls well below the natural order's."""
    e, n, k = 3, 48, 256
    w, gs, bs, h = problem(e, n, k, 2048, seed)
    use = torch.ones(e, dtype=torch.bool)
    ordered, ok = gptq_codes(w, gs, bs, h, use, act_order=True)
    assert bool(ok.all())
    ref = torch.stack([gptq.gptq_codes_reference(w[i], gs[i], bs[i], h[i], act_order=True)[0] for i in range(e)])
    assert torch.equal(ordered, ref)
    natural = _objective(w, gs, bs, gptq_codes(w, gs, bs, h, use)[0], h)
    assert bool((_objective(w, gs, bs, ordered, h) < 0.95 * natural).all())


def test_act_order_keeps_unused_experts_round_to_nearest_and_chunking():
    w, gs, bs, h = problem(4, 32, 128, 512, 5)
    use = torch.tensor([True, False, True, True])
    whole, ok = gptq_codes(w, gs, bs, h, use, act_order=True)
    assert ok.tolist() == [True, False, True, True]
    assert torch.equal(whole[1], quantize_nvfp4(w, gs, bs)[1])
    assert torch.equal(whole[0], gptq.gptq_codes_reference(w[0], gs[0], bs[0], h[0], act_order=True)[0])
    one = gptq_codes(w, gs, bs, h, use, act_order=True, chunk_bytes=128 * 128 * 8)[0]   # one expert per chunk
    assert torch.equal(one, whole)
