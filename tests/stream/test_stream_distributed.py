"""2 processes over gloo (samples dealt out, amax reduced, weight search split) write one process's bytes."""

from pathlib import Path

import torch.multiprocessing as mp
from dist_worker import rank_main, run


def test_two_gloo_processes_equal_one(model_dir, tmp_path):
    src = model_dir("qwen3_moe", dead_experts=True)   # under-covered experts: the coverage pass is reduced too
    mp.spawn(rank_main, args=(2, str(tmp_path / "rendezvous"), str(src), str(tmp_path / "two")), nprocs=2,
             join=True)
    run(str(src), str(tmp_path / "one"))
    one = {p.name: p.read_bytes() for p in sorted(Path(tmp_path / "one").iterdir())}
    two = {p.name: p.read_bytes() for p in sorted(Path(tmp_path / "two").iterdir())}
    assert sorted(one) == sorted(two)
    for name, data in one.items():
        assert two[name] == data, name
