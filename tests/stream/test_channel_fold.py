"""Distributed weighted_mse: per-call channel sums from every rank are added in one process's order."""

import pytest
import torch

import moequant.layers.ranks as distributed
from moequant.calibrate import CalibrationError
from moequant.channel_stats import ChannelStats


def _ranks(world: int, batches: int, rank: int = 0) -> distributed.Ranks:
    r = distributed.Ranks.__new__(distributed.Ranks)
    r.rank, r.world, r.device, r.batches = rank, world, torch.device("cpu"), batches
    return r


def _parts(batches: int, calls: int, seed: int) -> list[torch.Tensor]:
    """Sums whose float64 addition order matters: magnitudes over 40 decades."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(5, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-20, 20, (5,), generator=gen)
             for _ in range(batches * calls)]
    for b, value in enumerate([1e16, 1.0, -1e16]):  # channel 0: the 1.0 is lost next to 1e16, in this order only
        parts[b * calls][0] = value
    return parts


@pytest.mark.parametrize("world,batches,calls", [(2, 3, 1), (3, 7, 2), (4, 9, 1)])
def test_fold_equals_one_process(monkeypatch, world, batches, calls):
    parts = _parts(batches, calls, seed=world * 10 + batches)
    one = torch.zeros(5, dtype=torch.float64)
    for p in parts:  # one process: batch after batch, each batch's calls in order
        one += p
    per_rank = {r: [p for b in range(r, batches, world) for p in parts[b * calls:(b + 1) * calls]]
                for r in range(world)}
    stats = {}
    for r in range(world):
        cs = ChannelStats(record_parts=True)
        sums = cs.linear.setdefault("model.layers.0.q_proj.weight", cs.zeros(5))
        for p in per_rank[r]:
            sums.add(p, 3)
        stats[r] = cs

    def all_gather_object(out, obj):
        for r in range(world):
            out[r] = [(k, key, s.parts, s.count) for k, key, s in stats[r].under("model.layers.0.")]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    _ranks(world, batches)._fold_channel_sums(stats[0], "model.layers.0.")
    folded = stats[0].linear["model.layers.0.q_proj.weight"]
    assert torch.equal(folded.sq, one) and int(folded.count) == 3 * batches * calls and folded.parts is None
    naive = sum((sum(per_rank[r], torch.zeros(5, dtype=torch.float64)) for r in range(world)),
                torch.zeros(5, dtype=torch.float64))
    assert not torch.equal(naive, one)  # the data is order-sensitive: a per-rank all-reduce would differ


def test_mismatched_call_counts_are_refused(monkeypatch):
    cs = ChannelStats(record_parts=True)
    cs.linear.setdefault("model.layers.0.q_proj.weight", cs.zeros(5)).add(torch.ones(5), 1)

    def all_gather_object(out, obj):
        out[0], out[1] = obj, [(k, key, parts + parts, c) for k, key, parts, c in obj]  # rank 1: twice the calls

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    with pytest.raises(CalibrationError, match="observed calls"):
        _ranks(2, 2)._fold_channel_sums(cs, "model.layers.0.")
