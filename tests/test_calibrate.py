"""Observers: outputs untouched under every policy and experts implementation, statistics checked against
a plain recomputation, KV-cache scales against what the cache really stores, hooks always removed."""

import copy

import pytest
import torch
from biased_models import BIASED_FAMILIES, calib_ids, observe, prepared
from torch import nn

from moequant import discover
from moequant.calibrate import (
    POLICIES,
    ActivationStats,
    CalibrationError,
    ExpertsObservation,
    check_gating,
    finish_experts,
    linear_input_amax,
)
from moequant.discover import decoder_layers
from moequant.models.experts import ExpertsContainer, UnsupportedModelError, find_experts

FAMILIES = BIASED_FAMILIES + ("gpt_oss", "qwen2_moe")
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_logits_bit_identical_under_every_policy(family, impl):
    model, plan, containers = prepared(family)
    model = copy.deepcopy(model)
    model.set_experts_implementation(impl)
    containers = {c.path: c for c in find_experts(model, model.config.hidden_size)}
    ids = calib_ids(2, 24)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    for policy in POLICIES:
        logits, stats = observe(model, plan, containers, policy, ids)
        assert torch.equal(logits, reference), (family, impl, policy)
        assert stats.experts and stats.kv_amax and stats.linear_amax
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def _plain_expert_stats(container: ExpertsContainer, x, index, family):
    """Per-expert (tokens, gate_up amax, down amax) written out directly, without the library's helpers."""
    e_count = container.num_experts
    tokens, gate_up, down = torch.zeros(e_count, dtype=torch.int64), torch.zeros(e_count), torch.zeros(e_count)
    m = container.module
    for e in range(e_count):
        rows = (index == e).any(dim=-1).nonzero().flatten()
        tokens[e] = rows.numel()
        if not rows.numel():
            continue
        xs = x[rows]
        gate_up[e] = xs.abs().max()
        if family == "gpt_oss":
            h = xs @ m.gate_up_proj[e] + m.gate_up_proj_bias[e]
            gate, up = h[..., ::2].clamp(max=m.limit), h[..., 1::2].clamp(-m.limit, m.limit)
            inner = (up + 1) * gate * torch.sigmoid(gate * m.alpha)
        else:
            gate, up = nn.functional.linear(xs, m.gate_up_proj[e]).chunk(2, dim=-1)
            inner = m.act_fn(gate) * up
        down[e] = inner.abs().max()
    return tokens, gate_up, down


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_routed_statistics_match_a_plain_recomputation(family, impl, monkeypatch):
    """Under grouped_mm and batched_mm the down input amax is read from the forward's own gating (no second
    gate_up: the side computation is never called); under eager it is computed beside the forward."""
    import moequant.calibrate as calibrate

    model, plan, containers = prepared(family)
    model = copy.deepcopy(model)
    model.set_experts_implementation(impl)
    containers = {c.path: c for c in find_experts(model, model.config.hidden_size)}
    side_calls = []
    real = calibrate.routed_gated_amax
    monkeypatch.setattr(calibrate, "routed_gated_amax", lambda *a: side_calls.append(1) or real(*a))
    seen = {}
    handles = [c.module.register_forward_pre_hook(
        lambda _m, args, p=path: seen.setdefault(p, []).append((args[0].clone(), args[1].clone())))
        for path, c in containers.items()]
    try:
        _, stats = observe(model, plan, containers, "routed", calib_ids(), kv=False)
    finally:
        for h in handles:
            h.remove()
    for path, c in containers.items():
        x = torch.cat([a for a, _ in seen[path]])
        index = torch.cat([b for _, b in seen[path]])
        tokens, gate_up, down = _plain_expert_stats(c, x, index, family)
        obs = stats.experts[path]
        assert torch.equal(obs.tokens, tokens) and obs.total_tokens == x.shape[0]
        assert torch.equal(obs.gate_up_amax, gate_up)
        torch.testing.assert_close(obs.down_amax, down, rtol=1e-6, atol=0)   # matmul shapes may differ
        assert (tokens == 0).any(), f"{path}: the biased router should leave some expert without tokens"
        assert "_apply_gate" not in c.module.__dict__
    assert bool(side_calls) == (impl == "eager"), (impl, len(side_calls))


def test_coverage_costs_measurably_less_than_route_all():
    """128 experts (some never routed), top-8, 512 tokens: coverage runs only the under-covered experts, so it
    does a fraction of route_all's expert x token evaluations, and gives them the same scales. (Seconds are
    printed, not asserted: at this size per-call overhead, not expert compute, decides the time on a shared
    2-core machine; the GPU test below times a realistic size.)"""
    from tiny_models import _configs

    cls, config = _configs()["qwen3_moe"]
    config = copy.deepcopy(config)
    config.num_experts, config.hidden_size, config.moe_intermediate_size, config.num_hidden_layers = 128, 128, 128, 1
    config.num_experts_per_tok = 8
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.05
        model.model.layers[0].mlp.gate.weight[120:, 0] = -3.0
    plan, ids = discover(model), calib_ids(4, 128)
    containers = {c.path: c for c in find_experts(model, 128)}
    (path, c), = containers.items()
    records, scales = {}, {}
    for policy in ("coverage", "route_all"):
        _, stats = observe(model, plan, containers, policy, ids, kv=False)
        gate_up, down, records[policy] = finish_experts(stats.experts[path], c, policy, min_tokens=2)
        scales[policy] = (gate_up, down)
    cov, full = records["coverage"], records["route_all"]
    under = [e for e, _, _ in cov.under_covered]
    assert 4 <= len(under) < 32 and 0 in cov.tokens, (len(under), sorted(cov.tokens))
    assert cov.main_evals == 8 * 512 and cov.extra_evals == len(under) * 512
    assert full.main_evals == 128 * 512 and full.extra_evals == 0
    assert cov.main_evals + cov.extra_evals < full.main_evals / 4
    print(f"observation: coverage {cov.main_seconds + cov.extra_seconds:.4f}s ({len(under)} under-covered) vs "
          f"route_all {full.main_seconds:.4f}s")
    for i in range(2):
        assert torch.equal(scales["coverage"][i][under], scales["route_all"][i][under])


def test_hooks_are_removed_when_the_forward_fails():
    model, plan, containers = prepared("qwen3_moe")
    layers_path, layers = decoder_layers(model)
    with pytest.raises(IndexError):
        observe(model, plan, containers, "coverage", torch.full((1, 4), 10_000))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_a_forward_that_fails_inside_the_gating_leaves_no_capture_behind(impl, monkeypatch):
    model, plan, containers = prepared("qwen3_moe")
    model = copy.deepcopy(model)
    model.set_experts_implementation(impl)
    containers = {c.path: c for c in find_experts(model, model.config.hidden_size)}
    experts_class = type(next(iter(containers.values())).module)

    def broken(self, gate_up_out):
        raise RuntimeError("gating failed")

    monkeypatch.setattr(experts_class, "_apply_gate", broken)
    with pytest.raises(RuntimeError, match="gating failed"):
        observe(model, plan, containers, "coverage", calib_ids(1, 8), kv=False)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all("_apply_gate" not in c.module.__dict__ for c in containers.values())


def test_errors_name_the_module():
    model, plan, containers = prepared("qwen3_moe")
    key = "model.layers.0.self_attn.o_proj.weight"
    with pytest.raises(CalibrationError, match="no calibration token reached model.layers.0.self_attn.o_proj"):
        linear_input_amax(plan, ActivationStats(), [key])
    c = next(iter(containers.values()))
    with pytest.raises(CalibrationError, match="received no calibration token"):
        finish_experts(ExpertsObservation.empty(c.path, c.num_experts, True), c, "coverage", 16)

    class Plain(nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="has no _apply_gate"):
        check_gating(ExpertsContainer("x.experts", Plain(), c.layout, 8, 32, 64))
    with pytest.raises(ValueError, match="unknown dead-experts policy"):
        observe(model, plan, containers, "everyone", calib_ids(1, 4))


def test_group_members_share_the_max():
    model, plan, containers = prepared("qwen3_moe")
    stats = ActivationStats()
    keys = [t.key for t in plan.targets if t.kind == "linear"]
    for k in keys:
        stats.linear_amax[k] = torch.tensor(float(len(k)))   # distinct values per member
    amax = linear_input_amax(plan, stats, keys)
    for group in plan.groups:
        expected = max(float(len(k)) for k in group)
        assert all(float(amax[k]) == expected for k in group)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_chunked_expert_evaluation_matches_per_expert(family, monkeypatch):
    """The accelerator path (padded chunks of experts) agrees with the CPU path (one matmul per expert)."""
    from moequant import expert_amax

    model, _, containers = prepared(family)
    for c in containers.values():
        x = torch.randn(48, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        index = torch.stack([torch.arange(48) % 7, (torch.arange(48) * 3 + 1) % 5 + 2], dim=1)   # expert 7 dead
        expert, token = index.reshape(-1), torch.arange(48).repeat_interleave(2)
        counts = torch.bincount(expert, minlength=c.num_experts)
        with torch.no_grad():
            routed = expert_amax.routed_gated_amax(c, x, token, expert, counts)
            every = expert_amax.gated_amax_many(c, x, list(range(c.num_experts)))
            with monkeypatch.context() as mp:
                mp.setattr(expert_amax, "_chunk_size", lambda *_: 3)
                mp.setattr(expert_amax, "GATED_CHUNK_EXPERTS", 3)
                chunked_routed = expert_amax.routed_gated_amax(c, x, token, expert, counts)
                chunked_every = expert_amax.gated_amax_many(c, x, list(range(c.num_experts)))
                chunked_some = expert_amax.gated_amax_many(c, x, [6, 2])
        torch.testing.assert_close(chunked_routed, routed.float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(chunked_every, every, rtol=1e-6, atol=0)
        assert torch.equal(chunked_some, chunked_every[[6, 2]])
        assert float(routed[7]) == 0.0 and (routed[:7] > 0).all()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_grouped_gemm_path_matches_the_padded_chunks(family, monkeypatch):
    """The GPU path (grouped GEMM over pairs sorted by expert, sizes never read on the host), forced on here,
    gives the padded-chunk path's values, with expert-parallel sentinels (-1, E) and rows cut into chunks."""
    from moequant import expert_amax

    model, _, containers = prepared(family)
    for c in containers.values():
        e_count = c.num_experts
        x = torch.randn(48, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        index = torch.stack([torch.arange(48) % 7, (torch.arange(48) * 3 + 1) % 5 + 2], dim=1)   # expert 7 dead
        index[3, 0], index[10, 1], index[11, 1] = -1, e_count, e_count + 5                      # sentinels
        expert, token = index.reshape(-1), torch.arange(48).repeat_interleave(2)
        valid = (expert >= 0) & (expert < e_count)
        counts = torch.bincount(expert[valid], minlength=e_count)
        with torch.no_grad():
            padded = expert_amax.routed_gated_amax(c, x, token[valid], expert[valid], counts)
            sentinel = torch.where(valid, expert, e_count)
            with monkeypatch.context() as mp:
                mp.setattr(expert_amax, "_grouped_mm_usable", lambda *_: True)
                grouped = expert_amax.routed_gated_amax(c, x, token, sentinel, counts)
                mp.setattr(expert_amax, "GATED_CHUNK_ELEMENTS", 2 * c.intermediate * 13)   # chunks of 13 rows
                grouped_chunks = expert_amax.routed_gated_amax(c, x, token, sentinel, counts)
        # Chunks of 13 rows vs one GEMM of all rows: the BLAS picks its kernel and blocking by the row count, so
        # each entry's sum over H (= 64 products) may be added in another order -- not bitwise equal (seen: 1 ulp,
        # 1.2e-7 relative, deepseek_v3 on a 2-core machine). The order changes a sum by at most H * 2^-24 times the
        # sum of |products|, ~4e-6 of the amax here (the amax entry has no cancellation to speak of): rtol 1e-5.
        # Still tight enough for a chunk that credits rows to the wrong expert: the live experts' values lie more
        # than 10x the tolerance apart (asserted), so an expert's value mixed up with another's cannot pass.
        torch.testing.assert_close(grouped_chunks, grouped, rtol=1e-5, atol=0)
        live = grouped[:7]
        assert ((live[:, None] - live[None]).abs() / live[None] + torch.eye(7)).min() > 10 * 1e-5
        assert float(grouped[7]) == 0.0 and float(grouped_chunks[7]) == 0.0 and (grouped[:7] > 0).all()


@pytest.mark.gpu
def test_batched_expert_evaluation_does_not_depend_on_its_chunk():
    """On an accelerator experts are evaluated in padded chunks; an expert's value must not depend on which
    other experts share its chunk (coverage and route_all then agree bitwise)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from moequant.calibrate import gated_amax_many

    for family in ("qwen3_moe", "gpt_oss"):
        model = copy.deepcopy(prepared(family)[0]).cuda()
        (c,) = [c for c in find_experts(model, model.config.hidden_size) if c.path.endswith("layers.0.mlp.experts")]
        x = torch.randn(96, model.config.hidden_size, device="cuda")
        every = gated_amax_many(c, x, list(range(c.num_experts)))
        for e in range(c.num_experts):
            assert torch.equal(gated_amax_many(c, x, [e]), every[e:e + 1]), (family, e)
        assert torch.equal(gated_amax_many(c, x, [5, 1, 6]), every[[5, 1, 6]])


@pytest.mark.gpu
def test_coverage_is_faster_than_route_all_at_a_realistic_size():
    """Hidden 2048, 128 experts top-8, 16k tokens on the GPU: expert compute dominates, coverage wins."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tiny_models import _configs

    cls, config = _configs()["qwen3_moe"]
    config = copy.deepcopy(config)
    config.num_experts, config.num_experts_per_tok, config.num_hidden_layers = 128, 8, 1
    config.hidden_size, config.moe_intermediate_size, config.num_attention_heads, config.head_dim = 2048, 1024, 16, 128
    torch.manual_seed(0)
    model = cls(config).to(torch.bfloat16).cuda().eval()
    plan, ids = discover(model), calib_ids(32, 512, vocab=128).cuda()
    containers = {c.path: c for c in find_experts(model, 2048)}
    (path, c), = containers.items()
    seconds = {}
    for _ in range(2):   # the second round counts (the first warms up)
        for policy in ("coverage", "route_all"):
            _, stats = observe(model, plan, containers, policy, ids, kv=False)
            record = finish_experts(stats.experts[path], c, policy, min_tokens=16)[2]
            seconds[policy] = record.main_seconds + record.extra_seconds
    print(f"observation on {torch.cuda.get_device_name()}: coverage {seconds['coverage']:.4f}s vs route_all "
          f"{seconds['route_all']:.4f}s")
    assert seconds["coverage"] < seconds["route_all"] / 2, seconds
