"""2 and 8 processes over gloo (samples dealt out, amax reduced, weight search split by groups and expert
ranges) write one process's bytes."""

import socket
from pathlib import Path

import pytest
import torch

import torch.multiprocessing as mp
from dist_worker import cli_rank_main, rank_main, run


FLOORED = "floored.yaml"   # nvfp4-mse with the experts' layer floor (calibration.input_floor: layer)
SMOOTHED = "smoothed.yaml"   # nvfp4-best with smoothing: the factors' statistics are reduced across ranks
RECIPE_FILES = {FLOORED: "weights: {format: nvfp4, method: mse}\ncalibration: {input_floor: layer}\n",
                SMOOTHED: "weights: {format: nvfp4, method: weighted_mse}\nsmoothing: {enabled: true, down: true}\n"}


def files_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("recipe", ["nvfp4-mse", "nvfp4-best", "nvfp4-gptq", FLOORED, SMOOTHED])
def test_two_gloo_processes_equal_one(model_dir, tmp_path, recipe):   # best, gptq: float64 sums
    src = model_dir("qwen3_moe", dead_experts=True)   # under-covered experts: the coverage pass is reduced too
    if recipe in RECIPE_FILES:   # floor: a max taken before the ranks' MAX reduction: still one process's bytes
        Path(tmp_path / recipe).write_text(RECIPE_FILES[recipe])
        recipe = str(tmp_path / recipe)
    mp.spawn(rank_main, args=(2, str(tmp_path / "rendezvous"), str(src), str(tmp_path / "two"), "gloo", 2, recipe),
             nprocs=2, join=True)
    run(str(src), str(tmp_path / "one"), recipe=recipe)
    one, two = files_bytes(tmp_path / "one"), files_bytes(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for name, data in one.items():
        assert two[name] == data, name


def _same_files(a: Path, b: Path) -> None:
    one, other = files_bytes(a), files_bytes(b)
    assert sorted(one) == sorted(other)
    for name, data in one.items():
        assert other[name] == data, name


def test_eight_gloo_processes_equal_one(model_dir, tmp_path):
    """8 ranks on a layer of two experts projections and one attention group: every rank gets work (expert
    ranges), and the bytes are one process's. One sequence per batch: 8 batches, one per rank."""
    src = model_dir("qwen3_moe", dead_experts=True)
    mp.spawn(rank_main, args=(8, str(tmp_path / "rendezvous"), str(src), str(tmp_path / "eight"), "gloo", 1,
                              "nvfp4-mse", 8), nprocs=8, join=True)
    run(str(src), str(tmp_path / "one"), batch_size=1, samples=8)
    _same_files(tmp_path / "one", tmp_path / "eight")


def test_expert_ranges_give_every_rank_work(model_dir):
    """The unit split: with 8 ranks, a MoE layer's experts projections are cut into expert ranges so that all 8
    ranks search something; the ranges of a target cover its experts exactly once, in order."""
    from moequant import discover
    from moequant.layers.ranks import Ranks
    from moequant.quantize_command import load_model

    plan = discover(load_model(model_dir("qwen3_moe")))
    layer0 = [t for t in plan.targets if t.layer == 0]
    for world in (1, 2, 3, 8):
        mine = []
        for rank in range(world):
            r = Ranks.__new__(Ranks)
            r.rank, r.world = rank, world
            mine.append(r.my_units(layer0))
        assert all(mine), f"world {world}: a rank without work"
        for t in (t for t in layer0 if t.kind == "experts"):
            ranges = sorted((u[0].expert_offset, u[0].shape[0]) for m in mine for u in m if u[0].key == t.key)
            starts = [o for o, _ in ranges]
            assert starts[0] == 0 and sum(n for _, n in ranges) == t.shape[0], (world, t.key, ranges)
            assert all(o + n == nxt for (o, n), nxt in zip(ranges, starts[1:] + [t.shape[0]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_nccl_gpus_equal_one_gpu(model_dir, tmp_path):
    """The NCCL path (one GPU per rank: amax all-reduced, weight search split, rank 0 writes). One sequence per
    forward on both sides, so that a GEMM's batch size cannot change a row's result between the two runs."""
    src = model_dir("qwen3_moe", dead_experts=True)
    mp.spawn(rank_main, args=(2, str(tmp_path / "rendezvous"), str(src), str(tmp_path / "two"), "nccl", 1),
             nprocs=2, join=True)
    run(str(src), str(tmp_path / "one"), batch_size=1, device="cuda:0")
    one, two = files_bytes(tmp_path / "one"), files_bytes(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for name, data in one.items():
        assert two[name] == data, name


def test_the_cli_under_torchrun_joins_and_leaves_its_group(model_dir, tmp_path):
    """``moequant quantize`` with torchrun's variables: the CLI joins the gloo group itself, rank 0 writes what
    one process writes, and every rank has left the group when the command returns (a group left for
    interpreter exit can abort the process there)."""
    src = model_dir("qwen3_moe", dead_experts=True)
    common = ["quantize", str(src), "--recipe", "nvfp4-mse", "--samples", "16", "--seq-len", "32", "--quiet",
              "--device", "cpu"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "left").mkdir()
    mp.spawn(cli_rank_main, args=(2, port, [*common, "-o", str(tmp_path / "two")], str(tmp_path / "left")),
             nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "left").iterdir()) == ["0", "1"]
    from moequant.cli import main
    assert main([*common, "-o", str(tmp_path / "one")]) == 0
    weights = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}   # noqa: E731
    assert weights(tmp_path / "one") and weights(tmp_path / "one") == weights(tmp_path / "two")
