"""The accelerator path of the experts' channel statistics (``channel_stats._observe_experts_chunked``: experts
in padded chunks, batched matmuls) against the per-expert path the CPU runs, on the CPU and in float32 so that
the gated inputs agree to rounding: same sums of squares, X^T X and counts for every expert, within float64
summation-order noise (the paths sum in another order; no bit equality is promised between them), and
the chunked path is deterministic (the same call twice gives the same bits)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

from moequant import channel_stats
from moequant.channel_stats import ChannelStats, observe_experts
from moequant.models.experts import find_experts


@torch.no_grad()
def _stats(c, x, index, chunked: bool) -> ChannelStats:
    cs = ChannelStats(hessians=True)
    if chunked:   # what observe_experts runs on an accelerator, run here on the CPU
        e_count = c.num_experts
        expert = index.reshape(-1)
        token = torch.arange(x.shape[0]).repeat_interleave(index.shape[1])
        valid = (expert >= 0) & (expert < e_count)
        expert, token = expert[valid], token[valid]
        x64 = x.to(torch.float64)
        cs.hidden.setdefault(c.path, cs.zeros(x.shape[-1])).add(x64.square().sum(0), x.shape[0])
        counts = torch.bincount(expert, minlength=e_count)
        routed = channel_stats._routed_tokens(token, expert, counts)
        channel_stats._observe_experts_chunked(cs, c, x, x64, routed, counts, True)
    else:
        observe_experts(cs, c, x, index, True)
    return cs


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_chunked_sums_match_the_per_expert_path(family):
    model = build(family)
    c = find_experts(model, model.config.hidden_size)[0]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, model.config.hidden_size, generator=gen)
    index = torch.randint(0, c.num_experts, (200, 2), generator=gen)
    index[index == 5] = 6                                      # expert 5 gets no token
    index[:3, 1] = -1                                          # expert-parallel sentinels are not pairs
    plain = _stats(c, x, index, False)
    chunked = _stats(c, x, index, True)
    again = _stats(c, x, index, True)
    for kind in ("gate_up", "down", "gate_up_h", "down_h"):
        a, b, b2 = (getattr(s, kind)[c.path] for s in (plain, chunked, again))
        assert torch.equal(a.count, b.count), kind
        assert torch.equal(b.sq, b2.sq), kind                   # deterministic
        assert torch.allclose(a.sq, b.sq, rtol=1e-5, atol=1e-9 * float(a.sq.abs().max())), kind
        assert bool((b.sq[5] == 0).all()) and bool(b.sq.flatten(1).abs().sum(1)[[0, 1, 2, 3, 4, 6, 7]].gt(0).all())


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_sums_from_the_forwards_own_gating_match_the_side_computation(family, impl):
    """``observe_gated`` (the down inputs as the forward gated them, read by a ``GateCapture``) against
    ``observe_experts``' side computation: same counts, same sums of squares and X^T X to float64 summation
    order (float32 model: the gated rows agree to rounding), on both of its paths."""
    from moequant.channel_stats import observe_gated
    from moequant.expert_amax import GateCapture, gate_rows

    model = build(family)
    model.set_experts_implementation(impl)
    c = find_experts(model, model.config.hidden_size)[0]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, model.config.hidden_size, generator=gen)
    index = torch.randint(0, c.num_experts, (200, 2), generator=gen)
    index[index == 5] = 6                                      # expert 5 gets no token
    weights = torch.full(index.shape, 0.5)
    plain = _stats(c, x, index, False)
    for chunked in (False, True):
        capture = GateCapture(c, gate_rows(c, index))
        capture.keep = True
        with torch.no_grad():
            c.module(x, index, weights)
        assert capture.close() is not None and capture.gated is not None
        assert "_apply_gate" not in c.module.__dict__
        cs = ChannelStats(hessians=True)
        observe_gated(cs, c, capture.gated, capture.rows, chunked=chunked)
        for kind in ("down", "down_h"):
            a, b = getattr(plain, kind)[c.path], getattr(cs, kind)[c.path]
            assert torch.equal(a.count, b.count), (kind, chunked)
            # batched_mm gates rows computed by another fp32 matmul (~1e-7 relative): X^T X entries that cancel
            # to near zero differ by that times the largest entry
            assert torch.allclose(a.sq, b.sq, rtol=1e-5, atol=1e-6 * float(a.sq.abs().max())), (kind, chunked)
            assert bool((b.sq[5] == 0).all())
