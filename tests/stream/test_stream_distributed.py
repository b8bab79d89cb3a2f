"""2 processes over gloo (samples dealt out, amax reduced, weight search split) write one process's bytes."""

from pathlib import Path

import pytest
import torch

import torch.multiprocessing as mp
from dist_worker import rank_main, run


FLOORED = "floored.yaml"   # nvfp4-mse with the experts' layer floor (calibration.input_floor: layer)


@pytest.mark.parametrize("recipe", ["nvfp4-mse", "nvfp4-best", "nvfp4-gptq", FLOORED])   # best, gptq: float64 sums
def test_two_gloo_processes_equal_one(model_dir, tmp_path, recipe):
    src = model_dir("qwen3_moe", dead_experts=True)   # under-covered experts: the coverage pass is reduced too
    if recipe == FLOORED:   # a max taken before the ranks' MAX reduction: still one process's bytes
        recipe = str(tmp_path / FLOORED)
        Path(recipe).write_text("weights: {format: nvfp4, method: mse}\ncalibration: {input_floor: layer}\n")
    mp.spawn(rank_main, args=(2, str(tmp_path / "rendezvous"), str(src), str(tmp_path / "two"), "gloo", 2, recipe),
             nprocs=2, join=True)
    run(str(src), str(tmp_path / "one"), recipe=recipe)
    one = {p.name: p.read_bytes() for p in sorted(Path(tmp_path / "one").iterdir())}
    two = {p.name: p.read_bytes() for p in sorted(Path(tmp_path / "two").iterdir())}
    assert sorted(one) == sorted(two)
    for name, data in one.items():
        assert two[name] == data, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_nccl_gpus_equal_one_gpu(model_dir, tmp_path):
    """The NCCL path (one GPU per rank: amax all-reduced, weight search split, rank 0 writes). One sequence per
    forward on both sides, so that a GEMM's batch size cannot change a row's result between the two runs."""
    src = model_dir("qwen3_moe", dead_experts=True)
    mp.spawn(rank_main, args=(2, str(tmp_path / "rendezvous"), str(src), str(tmp_path / "two"), "nccl", 1),
             nprocs=2, join=True)
    run(str(src), str(tmp_path / "one"), batch_size=1, device="cuda:0")
    one = {p.name: p.read_bytes() for p in sorted(Path(tmp_path / "one").iterdir())}
    two = {p.name: p.read_bytes() for p in sorted(Path(tmp_path / "two").iterdir())}
    assert sorted(one) == sorted(two)
    for name, data in one.items():
        assert two[name] == data, name
