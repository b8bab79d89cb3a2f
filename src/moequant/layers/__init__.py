"""Quantizing a model one decoder layer at a time: one loop with two ends.

    job.py        what a run knows before its first layer (Job: model structure, recipe, plan; frozen)
    inputs.py     decoder layer 0's captured inputs, replayed layer by layer
    step.py       the per-layer step: observe -> coverage -> global scales -> block search -> codes
                  = LayerResult (frozen data); the only place that computes
    loop.py       the one loop: source -> step -> sink; the run's QuantState from the results
    sources.py    a model in memory (ModelLayers) or safetensors shards read one layer ahead (ShardLayers)
    sinks.py      collect for the Python API (Collect) or the journaled background writer (Journaled)
    ranks.py      torchrun: ranks exchange statistics and results; a MoE layer splits by expert ranges
    meta_model.py a weightless model whose layers are filled from the shards one at a time
    host_memory.py what outlives a layer on the host (the C heap, oneDNN's caches), kept bounded
    in_memory.py  quantize(model, ...)            (the Python API; ``sequential=False``: the reference)
    streamed.py   quantize_streamed(dir, out, ...) (the CLI's default: resumable, one layer in memory)
"""
