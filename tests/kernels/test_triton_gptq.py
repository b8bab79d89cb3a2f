"""The Triton GPTQ block sweep (kernels.triton_gptq) against the torch loop it replaces (kernels.torch_gptq), bit
for bit: both compute the same float64 values in the same order and share the batched matmuls, so the codes are
equal on every problem, ill-conditioned ones included (unlike the batched path vs the per-matrix reference,
which sum in another order).

Marked ``gpu``: runs on a CUDA device, or on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, with
triton installed); skipped otherwise (CI has neither).
"""

from __future__ import annotations

import os

import pytest
import torch
from gptq_problems import problem

from moequant.formats.nvfp4 import quantize_nvfp4
from moequant.kernels.torch_gptq import gptq_codes

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                       reason="needs a CUDA GPU, or TRITON_INTERPRET=1 on the CPU"),
]


def _both(w, gs, bs, h, use=None, **kw):
    dev = [x.to(DEVICE) for x in (w, gs, bs, h)]
    use = (torch.ones(w.shape[:-2], dtype=torch.bool) if use is None else use).to(DEVICE)
    plain, ok_plain = gptq_codes(*dev, use, backend="torch", **kw)
    fast, ok_fast = gptq_codes(*dev, use, backend="triton", **kw)
    assert torch.equal(ok_plain, ok_fast)
    return plain, fast


@pytest.mark.parametrize("shape", [(3, 40, 192, 1024), (2, 130, 256, 300), (1, 1, 16, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_codes_equal_the_torch_loop(shape, seed):
    e, n, k, tokens = shape
    plain, fast = _both(*problem(e, n, k, tokens, seed))
    assert torch.equal(plain, fast)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ill_conditioned_codes_equal_too(seed):
    plain, fast = _both(*problem(3, 40, 256, 260, seed, mix=20.0))
    assert torch.equal(plain, fast)


@pytest.mark.parametrize("mix", [1.0, 20.0])
def test_act_order_codes_equal_too(mix):
    """Permuted columns carry their own element scales into the sweep: the Triton blocks then mix NVFP4 blocks."""
    w, gs, bs, h = problem(3, 40, 256, 300 if mix > 1 else 1024, 4, mix=mix)
    use = torch.tensor([True, False, True])
    plain, fast = _both(w, gs, bs, h, use, act_order=True)
    assert torch.equal(plain, fast)
    assert not torch.equal(fast, _both(w, gs, bs, h, use)[1])


def test_linear_weight_and_unused_experts():
    plain, fast = _both(*problem(None, 70, 160, 1024, 2))
    assert torch.equal(plain, fast)
    w, gs, bs, h = problem(4, 32, 128, 512, 3)
    use = torch.tensor([True, False, True, False])
    plain, fast = _both(w, gs, bs, h, use)
    assert torch.equal(plain, fast)
    assert torch.equal(fast[1].cpu(), quantize_nvfp4(w, gs, bs)[1])      # unused: round to nearest


def test_edge_values():
    """Zero rows and blocks (block scale 0: the division gives inf/NaN in both, code 7/0), exact E2M1 ties,
    huge and tiny magnitudes, a weight of all-equal blocks."""
    w, gs, bs, h = problem(2, 48, 128, 512, 5)
    w[0, :4] = 0.0
    w[1, :, 32:48] = 0.0
    w[0, 10:20] = 1e-30
    w[1, 20:30] *= 1e30
    w[0, 30:40] = 2.5
    from moequant.formats.nvfp4 import global_scale_from_amax, tensor_amax
    from moequant.formats.weighted_mse import search_weighted_reference

    gs = global_scale_from_amax(tensor_amax(w, 1))
    bs = search_weighted_reference(w, gs, h.diagonal(dim1=-2, dim2=-1).to(torch.float32))
    plain, fast = _both(w, gs, bs, h)
    assert torch.equal(plain, fast)


def test_exact_ties_round_as_encode_e2m1():
    """With a diagonal H nothing is fed back, so each value is rounded as it is: values exactly on every E2M1
    decision threshold (and their negatives, and -0.0) must take formats.fp4's tie rule in both paths."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 0.0, -0.0, 0.5, 3.0, 4.0, 1e-3, 100.0])
    w = torch.cat([ties, -ties]).repeat(2, 6, 4).reshape(2, 12, 64)          # [E, N, K], 16 values per block
    gs = torch.ones(2)
    bs = torch.ones(2, 12, 4).to(torch.float8_e4m3fn)
    h = torch.diag_embed(torch.rand(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5)
    plain, fast = _both(w, gs, bs, h)
    assert torch.equal(plain, fast)
    assert torch.equal(fast.cpu(), quantize_nvfp4(w, gs, bs))
