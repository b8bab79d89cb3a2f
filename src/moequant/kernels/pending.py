"""Work started ahead on a side thread for a CUDA device, and waited for by the first call that needs it.

A fresh process compiles its Triton block-scale search while the job discovers the model and runs the
calibration forward (``triton_mse.compile_in_background``); the first launch on that device waits for the
compile instead of compiling a second time. The key is the concrete device: ``torch.device("cuda")`` (what a
job is given) and ``cuda:0`` (where its tensors live) are one device, and a wait that missed the side thread
would compile again beside it, on the critical path (it did: timed on an H200 with bench/e2e_gpu.py, a 2.2 s
compile on the side thread and a first search that waited 0.00 s for it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


def device_key(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in (a bare ``cuda`` is the current CUDA device, 0 where there is none)."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)


class Pending:
    """At most one side thread per device; its error is raised in the thread that waits for it."""

    def __init__(self, what: str):
        self.what = what
        self._threads: dict[torch.device, tuple[threading.Thread, list]] = {}
        self._lock = threading.Lock()

    def start(self, device: torch.device | str, work: Callable[[torch.device], None]) -> bool:
        """Run ``work(device)`` on a side thread unless one was started for this device already."""
        key = device_key(device)
        with self._lock:
            if key in self._threads:
                return False
            failure: list = []

            def run() -> None:
                try:
                    work(key)
                except BaseException as err:  # handed to the thread that waits, raised there
                    failure.append(err)

            thread = threading.Thread(target=run, daemon=True, name=f"moequant-{self.what.replace(' ', '-')}")
            self._threads[key] = (thread, failure)
            thread.start()
            return True

    def wait(self, device: torch.device | str) -> None:
        """Wait for the side thread of ``device`` (if one was started and not waited for yet); raise its error."""
        key = device_key(device)
        with self._lock:
            pending = self._threads.pop(key, None)
        if pending is None:
            return
        thread, failure = pending
        thread.join()
        if failure:
            raise RuntimeError(f"{self.what} for {key} failed") from failure[0]
