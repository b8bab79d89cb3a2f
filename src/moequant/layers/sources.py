"""Where the loop's decoder layers come from: a model in memory, or safetensors shards one layer at a time.

A source's ``layer(i)`` is a context manager: inside it, decoder layer ``i`` of the job's model holds real
tensors on the compute device; after it, the layer is as it was (in memory: moved back; from shards: back on
the meta device, its memory returned). ``unquantized(i)`` gives the layer's tensors that are not quantized
targets, by on-disk name, on the host: what a writing sink stores next to the codes.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from moequant.export.common import unquantized_tensors
from moequant.layers.inputs import on_device
from moequant.layers.job import Job, timed
from moequant.layers.host_memory import release_heap
from moequant.layers.meta_model import BufferPool, LayerPlans, free, install, read_tensors
from moequant.safetensors_source import SafetensorsSource


class ModelLayers:
    """The decoder layers of a model in memory; each moved to the compute device while it runs."""

    def __init__(self, job: Job, seconds: dict[str, float]):
        self.job, self.seconds = job, seconds

    @contextmanager
    def layer(self, i: int, next_layer: int | None = None):
        path = self.job.layer_path(i)
        with on_device(self.job.layers[i], self.job.device, path):
            yield

    def unquantized(self, i: int, replaced=None) -> dict[str, torch.Tensor]:
        return unquantized_tensors(self.job.model, self.job.plan, self.job.layer_path(i) + ".", replaced=replaced)

    def close(self) -> None:
        pass


class ShardLayers:
    """Decoder layers read from safetensors shards straight onto the compute device. While layer ``i`` computes,
    a background thread reads layer ``i + 1`` (disk reads and host-to-device copies overlap the compute; at most
    two layers are in memory). The read plan (which on-disk rows fill which parameter) is made in the calling
    thread, which alone touches the model; the thread only reads files into new tensors."""

    def __init__(self, job: Job, shards: SafetensorsSource, seconds: dict[str, float], prefetch: bool = True):
        self.job, self.shards, self.seconds = job, shards, seconds
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moequant-read") if prefetch else None
        self._plans = LayerPlans(job.model, job.layers_path, shards)
        self._ahead: dict[int, Future] = {}
        # on a CPU, finished layers' weights are read into again (meta_model.BufferPool); a GPU's caching
        # allocator already reuses device memory
        self._buffers = BufferPool() if job.device.type == "cpu" else None

    def _start_read(self, i: int):
        plan = self._plans.plan(i)
        if self._pool is None:
            return plan, None
        return plan, self._pool.submit(read_tensors, self.shards, plan, self.job.device, self._buffers)

    def _values(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._ahead:
            return self._ahead.pop(i).result()
        plan, future = self._start_read(i)
        if future is not None:
            return future.result()
        return read_tensors(self.shards, plan, self.job.device, self._buffers)

    def _weights(self, i: int) -> list[torch.Tensor]:
        """Layer ``i``'s quantized weights: what the step reads and no sink keeps (a sink may still be writing
        the unquantized tensors, so those are never reused)."""
        model = self.job.model
        weights = (getattr(model.get_submodule(t.module_path), t.param_name) for t in self.job.targets_of(i))
        found = {id(w): w for w in weights if not w.is_meta}
        return list(found.values())

    @contextmanager
    def layer(self, i: int, next_layer: int | None = None):
        """Layer ``i`` loaded; ``next_layer``: the one the loop wants next, read meanwhile."""
        path, layer = self.job.layer_path(i), self.job.layers[i]
        with timed(self.seconds, "load"):
            values = self._values(i)
            layer_bytes = install(self.job.model, values, path + ".", device=self.job.device)
            del values
        if self._pool is not None and next_layer is not None and next_layer not in self._ahead:
            self._ahead[next_layer] = self._start_read(next_layer)[1]
        try:
            yield
        finally:
            weights = self._weights(i) if self._buffers is not None else []
            free(layer)
            if self._buffers is not None:
                self._buffers.give(w.data for w in weights)
            release_heap(keep=2 * layer_bytes)   # bounds what glibc keeps (flat with depth), rarely trims

    def unquantized(self, i: int, replaced=None) -> dict[str, torch.Tensor]:
        """The layer's unquantized tensors copied to the host (pinned, queued, one wait): the layer itself goes
        back to the meta device when the loop moves on, while a sink may still be writing them. ``replaced``:
        parameter name -> tensor to write instead (the smoothed norms and routers)."""
        found = unquantized_tensors(self.job.model, self.job.plan, self.job.layer_path(i) + ".", replaced=replaced)
        return host_copies(found)

    def close(self) -> None:
        """Wait for a read still under way (its result is dropped) and stop the thread."""
        if self._pool is not None:
            for future in self._ahead.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._ahead.clear()
        if self._buffers is not None:
            self._buffers.clear()


def host_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU: from a GPU into pinned memory, queued, then one wait; CPU tensors as they are (a
    state-dict tensor keeps its storage when its module goes back to meta: ``free`` swaps the parameters')"""
    out, queued = {}, False
    for name, t in tensors.items():
        if t.device.type == "cuda":
            out[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            queued = True
        else:
            out[name] = t
    if queued:
        torch.cuda.current_stream().synchronize()
    return out
