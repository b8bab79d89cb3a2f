"""The CPU kernels' map over independent chunks of work (``cpu_workers``): Python threads each running
single-threaded torch ops, sharing one pool per process."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch


@contextmanager
def cpu_workers(device: torch.device):
    """A map over independent chunks: on a multi-threaded CPU, Python threads each running single-threaded
    torch ops (the ops release the GIL). Small per-chunk ops under torch's own intra-op pool spend most of
    their time in thread hand-offs, and collapse when the machine is oversubscribed (measured: 2 threads
    0.6 M elements/s vs 8.8 with 1 on a loaded 2-core machine). The intra-op thread count is process-wide:
    it is restored in ``finally``. The map returns a list once every item is done (also when one fails).
    The worker threads are made on first use and kept (idle) for later calls: starting two threads per call
    cost more than the work of a small tensor (measured: 3.7 s of thread starts in one demo-model run)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1:
        yield lambda fn, items: list(map(fn, items))
        return
    pool = _worker_pool(threads)
    torch.set_num_threads(1)
    try:
        yield lambda fn, items: _run_all(pool, torch.no_grad()(fn), items)
    finally:
        torch.set_num_threads(threads)


def _run_all(pool: ThreadPoolExecutor, fn, items) -> list:
    futures = [pool.submit(fn, item) for item in items]
    wait(futures)
    return [f.result() for f in futures]


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)
_POOL_LOCK = threading.Lock()


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """The shared worker threads (``workers`` of them), made on first use, and again in a forked child
    (which inherits the pool object but not its threads)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[:2] != (os.getpid(), workers):
            if _POOL is not None and _POOL[0] == os.getpid():
                _POOL[2].shutdown(wait=False)
            _POOL = (os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moequant-cpu"))
        return _POOL[2]
