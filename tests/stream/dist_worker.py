"""One rank of a multi-process run, gloo on CPUs or NCCL on GPUs (spawned by test_stream_distributed.py)."""

import torch
import torch.distributed as dist

from moequant.calibration_data import load_tokenizer
from moequant.recipe import load_recipe
from moequant.layers.streamed import quantize_streamed

RECIPE = {"kv_cache": "fp8", "calibration": {"samples": 6, "seq_len": 32}}


def run(src: str, out: str, batch_size: int = 2, device: str = "cpu", recipe: str = "nvfp4-mse",
        samples: int = 6) -> None:
    rec = load_recipe(recipe, **{**RECIPE, "calibration": {**RECIPE["calibration"], "samples": samples}})
    quantize_streamed(src, out, rec, "modelopt", tokenizer=load_tokenizer(src),
                      batch_size=batch_size, max_shard_bytes=40_000, device=device)


def rank_main(rank: int, world: int, rendezvous: str, src: str, out: str, backend: str = "gloo",
              batch_size: int = 2, recipe: str = "nvfp4-mse", samples: int = 6) -> None:
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        run(src, out, batch_size, device, recipe, samples)
        dist.barrier()   # as the CLI does (ranks.ProcessGroupFromEnv.leave): no rank tears down while another talks
    finally:
        dist.destroy_process_group()
    # The work is done and checked by the parent from the files. Leave without interpreter finalization: about one
    # CI run in ten, a rank of a 2-rank test ended with SIGABRT ("terminate called without an active exception"),
    # where exactly is unknown; gloo's C++ threads meeting a finalizing interpreter is one known way (pytorch PR
    # 179291). If it recurs with this, it is earlier, in the run or in destroy_process_group.
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cli_rank_main(rank: int, world: int, port: int, args: list, left: str) -> None:
    """One rank of ``moequant quantize`` under torchrun's environment: the CLI joins the group itself and must
    leave it (writes ``left/<rank>`` when the group is gone after the command)."""
    import os
    from pathlib import Path

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from moequant.cli import main

    code = main(args)
    if code != 0:
        raise SystemExit(f"rank {rank}: exit {code}")
    if not dist.is_initialized():
        (Path(left) / str(rank)).write_text("left")
