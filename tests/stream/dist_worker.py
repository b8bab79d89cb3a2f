"""One rank of a 2-process run, gloo on CPUs or NCCL on GPUs (spawned by test_stream_distributed.py)."""

import torch
import torch.distributed as dist

from moequant.data import load_tokenizer
from moequant.recipe import load_recipe
from moequant.stream import quantize_streamed

RECIPE = {"kv_cache": "fp8", "calibration": {"samples": 6, "seq_len": 32}}


def run(src: str, out: str, batch_size: int = 2, device: str = "cpu", recipe: str = "nvfp4-mse") -> None:
    quantize_streamed(src, out, load_recipe(recipe, **RECIPE), "modelopt", tokenizer=load_tokenizer(src),
                      batch_size=batch_size, max_shard_bytes=40_000, device=device)


def rank_main(rank: int, world: int, rendezvous: str, src: str, out: str, backend: str = "gloo",
              batch_size: int = 2, recipe: str = "nvfp4-mse") -> None:
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        run(src, out, batch_size, device, recipe)
    finally:
        dist.destroy_process_group()
