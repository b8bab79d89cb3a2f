"""The one layer loop: decoder layers from a source, through the per-layer step, into a sink.

    for each decoder layer i:
        journaled already (a resumed run)?  load it only to replay its forward (its outputs are the next
                                            layer's inputs), take its result from the sink
        else                                source.layer(i) -> step.calibrate_layer -> sink.put(result)
    -> the run's QuantState assembled from the results (``assemble_state``)

The same loop runs the in-memory API (model layers -> collect) and the streamed job (shards read one layer
ahead -> journaled writer in the background), so both compute the same values in the same order.
"""

from __future__ import annotations

from dataclasses import replace

from moequant.export.writer import natural_key
from moequant.kv_cache import KVObservationError
from moequant.layers.inputs import LayerInput
from moequant.layers.job import Job, progress_bar, timed
from moequant.layers.step import LayerResult, calibrate_layer
from moequant.report import Report
from moequant.scales import QuantState

MLA_NOTE = ("MLA: k_scale = v_scale = amax over the cached latent and k_pe / 448 (one FP8 cache entry, as vLLM "
            "stores it)")


def run_layers(job: Job, source, sink, inputs: list[LayerInput], report: Report, ranks=None,
               progress: bool = False) -> int:
    """Every decoder layer of ``job`` from ``source`` into ``sink``; returns how many were resumed."""
    n, resumed = len(job.layers), 0
    for i in progress_bar(range(n), progress, "layers"):
        ahead = i + 1 if i + 1 < n else None
        if sink.done(i):
            resumed += 1
            if inputs:   # its outputs are the next layer's inputs: replay its forward (nothing is recalibrated)
                with source.layer(i, ahead), timed(report.stage_seconds, "replay"):
                    replay(job.layers[i], inputs)
            account(report, sink.restored(i))
            continue
        with source.layer(i, ahead):
            result = calibrate_layer(job, i, inputs, ranks)
            if sink.writes:
                with timed(report.stage_seconds, "host copies"):
                    result = replace(result, unquantized=source.unquantized(i, result.smoothing.changed))
        account(report, result)
        with timed(report.stage_seconds, "hand-over"):   # checks, the part's tensor specs, the writer's queue
            sink.put(result)
    return resumed


def replay(layer, inputs: list[LayerInput]) -> None:
    for inp in inputs:
        out = layer(inp.hidden, *inp.args, **inp.kwargs)
        inp.hidden = out[0] if isinstance(out, tuple) else out


def account(report: Report, result: LayerResult) -> None:
    report.coverage.extend(result.coverage)
    for name, s in result.seconds.items():
        report.stage_seconds[name] = report.stage_seconds.get(name, 0.0) + s


def assemble_state(job: Job, results: list[LayerResult], report: Report) -> QuantState:
    """The run's ``QuantState``: every target's scales (in plan order), backends, KV scales (natural order)."""
    tensors, kv, backends = {}, {}, set()
    for r in results:
        tensors.update(r.tensors)
        kv.update(r.kv)
        backends |= r.backends
    state = QuantState(job.plan, {t.key: tensors[t.key] for t in job.plan.targets},
                       ",".join(sorted(backends)) or "torch", job.recipe.weights.method,
                       smoothing=[r.smoothing for r in results if r.smoothing.sites])
    smoothed = [s for r in results for s in r.smoothing.sites]
    if smoothed:
        report.notes.append(f"smoothing (alpha {job.recipe.smoothing.alpha}): {len(smoothed)} sites folded in "
                            f"({sum(s.kind == 'norm' for s in smoothed)} norms, "
                            f"{sum(s.kind == 'down' for s in smoothed)} down projections); factors in "
                            "moequant_smoothing/factors.safetensors")
    report.notes += [m for r in results for m in r.smoothing.skipped]
    if job.kv:
        if not kv:
            raise KVObservationError("kv_cache was requested but no attention layer wrote to the KV cache during "
                                     "calibration; use kv_cache: none for this model")
        state.kv_cache = dict(sorted(kv.items(), key=lambda item: natural_key(item[0])))
        state.kv_scheme = job.kv
        if job.mla:
            report.notes.append(MLA_NOTE)
    return state
