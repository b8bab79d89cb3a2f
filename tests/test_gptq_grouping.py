"""GPTQ's cost: linears reading one input run as one stacked call, experts in memory-bounded chunks; neither
changes a code (bit for bit against separate calls, one expert per chunk, and an up-front normalized H)."""

import pytest
import torch
from biased_models import biased, calib_ids, recipe
from tiny_models import build

from moequant import gptq_step, quantize
from moequant.kernels import torch_gptq

SAMPLES = 8


def _run(model, batch_size=2):
    return quantize(model, recipe("nvfp4-gptq", samples=SAMPLES, calibration={"min_tokens": 4}),
                    calib_ids(SAMPLES), batch_size=batch_size)


def _counting(monkeypatch) -> list:
    calls, real = [], gptq_step.gptq_codes

    def counted(w, *args, **kwargs):
        calls.append(tuple(w.shape))
        return real(w, *args, **kwargs)

    monkeypatch.setattr(gptq_step, "gptq_codes", counted)
    return calls


def _assert_same(a, b):
    assert a.state.tensors.keys() == b.state.tensors.keys()
    for key, s in a.state.tensors.items():
        o = b.state.tensors[key]
        assert torch.equal(s.codes, o.codes), key
        assert torch.equal(s.gptq_status, o.gptq_status), key
        assert torch.equal(s.sq_error, o.sq_error), key


@pytest.fixture(scope="module")
def dense():
    return build("llama")


def test_grouped_linears_are_one_call_with_the_codes_of_separate_calls(dense, monkeypatch):
    calls = _counting(monkeypatch)
    stacked = _run(dense)
    stacked_calls = list(calls)
    calls.clear()
    monkeypatch.setattr(gptq_step, "_stackable", lambda *_: False)   # what ran before: one call per linear
    separate = _run(dense)
    layers = len(dense.model.layers)
    assert len(calls) == 7 * layers and len(stacked_calls) == 4 * layers   # q/k/v and gate/up: one call each
    hidden = dense.config.hidden_size
    qkv = dense.config.hidden_size + 2 * dense.config.num_key_value_heads * dense.config.head_dim
    assert (qkv, hidden) in stacked_calls and (2 * dense.config.intermediate_size, hidden) in stacked_calls
    _assert_same(stacked, separate)
    changed = sum(int((stacked.state.tensors[k].codes != v.codes).any()) for k, v in
                  quantize(dense, recipe("nvfp4-best", samples=SAMPLES), calib_ids(SAMPLES),
                           batch_size=2).state.tensors.items())
    assert changed == len(stacked.state.tensors)   # the stacked call did round by GPTQ, every linear


def test_experts_one_per_chunk_equal_one_chunk(monkeypatch):
    model = biased("qwen3_moe")
    whole = _run(model)
    calls = _counting(monkeypatch)
    seen_chunks = []
    batch = torch_gptq._gptq_batch

    def per_chunk(w, *args):
        seen_chunks.append(w.shape[0])
        return batch(w, *args)

    monkeypatch.setattr(torch_gptq, "_gptq_batch", per_chunk)
    monkeypatch.setattr(torch_gptq, "CHUNK_BYTES", 1)   # one expert per chunk
    chunked = _run(model)
    assert calls and set(seen_chunks) == {1}
    _assert_same(whole, chunked)


def test_sums_divided_per_chunk_equal_an_up_front_normalized_h(monkeypatch):
    """Before, ``hessians`` built X^T X / T for a whole projection first; the kernel now divides per chunk."""
    model = biased("qwen3_moe")
    lazy = _run(model)
    real = gptq_step.gptq_codes

    def up_front(w, gs, bs, xtx, use, tokens=None, **kwargs):
        return real(w, gs, bs, xtx / tokens[..., None, None], use, **kwargs)

    monkeypatch.setattr(gptq_step, "gptq_codes", up_front)
    _assert_same(lazy, _run(model))
