"""``meta_model.read_tensors`` reads every on-disk tensor on one of several threads (``MOEQUANT_READ_THREADS``):
each parameter must come out exactly as its on-disk pieces say, whatever order the threads finish in, for
consecutive pieces (per-expert tensors), interleaved pieces (gate/up rows alternating) and whole tensors."""

import pytest
import torch
from safetensors.torch import save_file

from moequant.layers import meta_model
from moequant.layers.meta_model import BufferPool, read_tensors
from moequant.safetensors_source import SafetensorsSource, ShardError


@pytest.fixture()
def shards(tmp_path):
    gen = torch.Generator().manual_seed(0)
    experts = torch.randn(6, 8, 16, generator=gen).to(torch.bfloat16)   # [E, 2I, H]: gate rows 0::2, up 1::2
    norm = torch.randn(16, generator=gen)
    tensors = {f"e{e}.gate": experts[e, 0::2].clone() for e in range(6)}
    tensors |= {f"e{e}.up": experts[e, 1::2].clone() for e in range(6)}
    tensors["norm"] = norm
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return SafetensorsSource(tmp_path), experts, norm


def _plan(experts, norm):
    parts = []
    for e in range(6):   # rows of the flattened [E * 2I, H] parameter
        parts += [(f"e{e}.gate", torch.arange(e * 8, e * 8 + 8, 2)), (f"e{e}.up", torch.arange(e * 8 + 1, e * 8 + 8, 2))]
    return {"experts": (torch.empty(experts.shape, dtype=experts.dtype, device="meta"), parts),
            "norm": (torch.empty(norm.shape, dtype=torch.float32, device="meta"), [("norm", torch.arange(16))])}


@pytest.mark.parametrize("pool", [None, BufferPool()])
def test_every_piece_lands_in_its_rows(shards, pool):
    source, experts, norm = shards
    for _ in range(5):   # thread timing differs run to run; the result may not
        got = read_tensors(source, _plan(experts, norm), "cpu", pool)
        assert torch.equal(got["experts"], experts) and torch.equal(got["norm"], norm)
        if pool is not None:
            pool.give(got.values())


def test_a_piece_whose_rows_collide_is_refused_before_any_read(shards):
    source, experts, norm = shards
    plan = _plan(experts, norm)
    meta, parts = plan["experts"]
    parts[1] = ("e0.up", torch.arange(0, 8, 2))   # e0.up claims e0.gate's rows: two threads would write them
    with pytest.raises(ShardError, match="do not hold every row of experts exactly once"):
        read_tensors(source, plan)


@pytest.mark.parametrize("value", ["0", "-2", "four", ""])
def test_a_bad_thread_count_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(meta_model.READERS_ENV, value)
    with pytest.raises(ValueError, match="MOEQUANT_READ_THREADS=.*whole number >= 1"):
        meta_model._reader_count()
