"""Where the loop's ``LayerResult``s go: collected for the Python API, or written as journaled checkpoint parts.

``Collect`` keeps every result (codes included) for ``quantize``'s ``QuantResult``. ``Journaled`` maps each
result to the checkpoint's tensors (``export.part_specs``: a pure mapping) and writes them as that part's
shard files in the journal, in a background thread while the next layer computes; it keeps only each
target's scalars and errors, and the final checkpoint links the journaled shard files in (``streamed.py``).
``Skip`` is a torchrun rank other than 0: it computes its share and writes nothing.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from moequant.export import part_specs
from moequant.export.common import check_exportable
from moequant.export.writer import part_shards
from moequant.journal import Journal
from moequant.layers.job import Job, timed
from moequant.layers.step import LayerResult, frozen
from moequant.scales import QuantState
from moequant.smoothing import Smoothing

KILL_AFTER_LAYER_ENV = "MOEQUANT_TEST_KILL_AFTER_LAYER"   # tests only: SIGKILL self after journaling layer k


def part_name(i: int | None) -> str:
    return "rest" if i is None else f"layer-{i:05d}"


class Collect:
    """Every result, as computed."""

    writes = False

    def __init__(self):
        self.results: list[LayerResult] = []

    def done(self, i: int) -> bool:
        return False

    def put(self, result: LayerResult) -> None:
        self.results.append(result)

    def finish(self) -> None:
        pass


class Skip(Collect):
    """A torchrun rank other than 0: knows which parts rank 0 has journaled (to replay them too), keeps nothing."""

    def __init__(self, done: frozenset):
        super().__init__()
        self._done = done

    def done(self, i: int) -> bool:
        return part_name(i) in self._done

    def restored(self, i: int) -> LayerResult:
        return LayerResult(i, frozen({}), frozen({}), (), frozenset(), frozen({}))

    def put(self, result: LayerResult) -> None:
        pass


class Journaled:
    """Each result written as its part of the checkpoint into ``journal``, in a background thread (one part at a
    time, in order; an error is raised at the next ``put`` or at ``finish``)."""

    writes = True

    def __init__(self, job: Job, journal: Journal, fmt: str, max_shard_bytes: int, background: bool = True,
                 seconds: dict[str, float] | None = None):
        self.job, self.journal, self.fmt, self.max_shard_bytes = job, journal, fmt, max_shard_bytes
        self.seconds = seconds if seconds is not None else {}   # "write wait": the loop waiting for the writer
        self.results: list[LayerResult] = []   # light: scalars and errors, no codes or block scales
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moequant-write") if background else None
        self._flush = ThreadPoolExecutor(1, thread_name_prefix="moequant-flush") if background else None
        self._pending: Future | None = None    # the part being written (awaited by the loop)
        self._flushing: Future | None = None   # the part before it, being flushed and journaled

    def done(self, i: int | None) -> bool:
        return part_name(i) in self.journal.parts

    def restored(self, i: int | None) -> LayerResult:
        """A journaled part's result as the run that wrote it had it (light)."""
        s = self.journal.summary(part_name(i))
        result = LayerResult(i, frozen(s["tensors"]), frozen(s["kv"]), tuple(s["coverage"]),
                             frozenset(s["backends"]), frozen({}), smoothing=s.get("smoothing", Smoothing()))
        self.results.append(result)
        return result

    def put(self, result: LayerResult) -> None:
        state = QuantState(self.job.plan.with_targets(tuple(self.job.targets_of(result.index)), self.job.plan.excluded),
                           dict(result.tensors), ",".join(sorted(result.backends)) or "torch",
                           self.job.recipe.weights.method, dict(result.kv), self.job.kv)
        if state.plan.targets:
            check_exportable(state)
        specs = part_specs(state, self.fmt, result.unquantized)
        light = {k: replace(v, block_scale=None, codes=None) for k, v in result.tensors.items()}
        summary = {"tensors": light, "kv": dict(result.kv), "backends": sorted(result.backends),
                   "coverage": list(result.coverage), "smoothing": result.smoothing}
        self.results.append(replace(result, tensors=frozen(light), unquantized=frozen({})))
        self._wait()
        if self._pool is None:
            self._write(result.index, specs, summary)
        else:
            self._pending = self._pool.submit(self._write, result.index, specs, summary)

    def _write(self, i: int | None, specs, summary: dict) -> None:
        """The writer thread: part ``i``'s files, then its flush handed to the flusher (one part in flight: the
        previous part's flush is awaited first, so a part is journaled only after the ones before it)."""
        files = self.journal.write(part_name(i), part_shards(specs, self.max_shard_bytes), summary)
        if self._flush is None:
            self._commit(i, files)
            return
        self._await_flush()
        self._flushing = self._flush.submit(self._commit, i, files)

    def _commit(self, i: int | None, files: list[str]) -> None:
        self.journal.commit(part_name(i), files)
        if i is not None and os.environ.get(KILL_AFTER_LAYER_ENV) == str(i):
            os.kill(os.getpid(), signal.SIGKILL)

    def _await_flush(self) -> None:
        if self._flushing is not None:
            flushing, self._flushing = self._flushing, None
            flushing.result()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            with timed(self.seconds, "write wait"):
                pending.result()

    def finish(self) -> None:
        """Every part written, flushed and journaled (raises the writer's or the flusher's error, if any)."""
        try:
            self._wait()
            with timed(self.seconds, "write wait"):
                self._await_flush()
        finally:
            for pool in (self._pool, self._flush):
                if pool is not None:
                    pool.shutdown(wait=True)
