"""A model without weights (meta device) whose parts are loaded from safetensors one at a time.

``meta_model(dir)`` builds the causal LM from its config under ``torch.device("meta")`` (no memory).
``load_into(model, source, prefix)`` gives the parameters and persistent buffers under ``prefix`` (a decoder
layer, or everything outside the layers) real CPU tensors read from the shards, in the layout the model
code expects. The on-disk tensors of each parameter are found with transformers' own save-time conversion
(``revert_weight_conversion``) run on *index tensors*, as ``models/disk_names.py`` does for the plan: a
parameter of shape ``[..., K]`` is replaced by a float64 tensor ``[..., 1]`` numbering its rows (1-D: its
elements); whatever renames, splits and per-expert unstacking transformers applies, the numbers that come
back say which rows of the parameter each on-disk tensor holds, and loading writes them there. A conversion
that would move the input dimension (a transpose) is refused, naming the parameter. Every row must be
written exactly once. Non-persistent buffers (rotary ``inv_freq``) are computed by the model's own
``_init_weights``, as ``from_pretrained`` does. ``free(module)`` sends a module back to meta.

``zero_layers_on_the_fly``: while active, each decoder layer is materialized with zeros right before it runs
and sent back to meta right after, so structural probes (weight groups, per-layer arguments) run a full
forward holding one layer at a time, without reading any weight.
"""

from __future__ import annotations

import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from moequant.layers.host_memory import release_heap
from moequant.models.disk_names import revert_weight_conversion
from moequant.models.experts import UnsupportedModelError
from moequant.safetensors_source import DTYPES, SafetensorsSource, ShardError


def meta_model(model_dir: Path, source: SafetensorsSource, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``model_dir`` on the meta device, in the dtype ``from_pretrained(dtype="auto")`` uses."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None)
    if dtype is None:  # what "auto" falls back to: the checkpoint's first floating tensor
        name = next(n for n in sorted(source.weight_map) if source.entry(n)[1]["dtype"] in ("BF16", "F16", "F32"))
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[source.entry(name)[1]["dtype"]]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_dict(json.loads(gen.read_text()))
    return model.eval()


def _index(shape: tuple[int, ...], offset: float) -> torch.Tensor:
    """Row ids ``offset + r`` of a tensor viewed as ``[-1, K]``: ``[..., 2]`` pairs (r, r + 0.5) for 2-D and up,
    so that a conversion that squeezes size-1 dims (transformers 5.17 unbinds experts to 1-D rows) cannot hide
    a transposition; 1-D tensors (rows of width 1) are plain ids."""
    rows = shape[:-1] if len(shape) >= 2 else shape
    n = 1
    for d in rows:
        n *= d
    ids = torch.arange(n, dtype=torch.float64) + offset
    return torch.stack([ids, ids + 0.5], dim=-1).reshape(rows + (2,)) if len(shape) >= 2 else ids.reshape(rows)


def loadable_keys(model: nn.Module, prefix: str, exclude_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """In-memory state-dict entries (meta) under ``prefix`` (not under ``exclude_prefix``), tied copies removed."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = {k: v for k, v in model.state_dict().items()
          if k.startswith(prefix) and not (exclude_prefix and k.startswith(exclude_prefix))}
    return remove_tied_weights_from_state_dict(sd, model)


def disk_sources(model: nn.Module, metas: dict[str, torch.Tensor]) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """In-memory key -> [(on-disk name, rows of the key's ``[-1, K]`` view it holds, int64)]."""
    index, spans, offset = {}, {}, 0.0
    for key, meta in metas.items():
        index[key] = _index(tuple(meta.shape), offset)
        rows = index[key].numel() // (2 if meta.ndim >= 2 else 1)
        spans[key] = (offset, offset + rows)
        offset += rows
    out: dict[str, list] = {k: [] for k in metas}
    for name, t in revert_weight_conversion(model, dict(index)).items():
        if t.numel() == 0:
            continue
        first = float(t.reshape(-1)[0])
        key = next(k for k, (lo, hi) in spans.items() if lo <= first < hi)
        if metas[key].ndim >= 2:
            if t.shape[-1] != 2 or not bool((t[..., 1] - t[..., 0] == 0.5).all()):
                raise UnsupportedModelError(f"{key}: transformers stores it on disk as {name} with another input "
                                            "dimension (transposed); streaming cannot load it: use --no-stream")
            t = t[..., 0]
        out[key].append((name, (t.reshape(-1) - spans[key][0]).to(torch.int64)))
    return out


class BufferPool:
    """Tensors of decoder layers the loop is done with, handed out again for the next layers' reads.

    Decoder layers have the same shapes, so after the first two layers every read finds its buffers here: the
    largest allocations are not freed and re-faulted layer after layer (with ``release_heap``'s bounded trim,
    the rest of what glibc keeps stays bounded too). Only tensors that nothing else holds may be given back
    (``sources.ShardLayers`` gives the quantized weights, which the step reads and no sink keeps).
    Thread-safe: the reader thread takes, the loop gives."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with self._lock:
            spare = self._free.get((tuple(shape), dtype, device))
            if spare:
                return spare.pop()
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensors) -> None:
        with self._lock:
            for t in tensors:
                self._free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


READERS_ENV = "MOEQUANT_READ_THREADS"   # how many on-disk tensors are read at once (default 4; a network file
# system may want more): one thread copying from the page cache could not keep up with a GPU's layer compute


def _reader_count() -> int:
    value = os.environ.get(READERS_ENV, "4")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{READERS_ENV}={value!r}: expected a whole number >= 1 (threads reading the shards)")
    return int(value)


def _readers() -> ThreadPoolExecutor:
    """The threads that read on-disk tensors (``_read_part``), made on first use and shared by every read."""
    global _READER_POOL
    with _READER_LOCK:
        if _READER_POOL is None:
            _READER_POOL = ThreadPoolExecutor(_reader_count(), thread_name_prefix="moequant-read-part")
        return _READER_POOL


_READER_POOL: ThreadPoolExecutor | None = None
_READER_LOCK = threading.Lock()


def _width(meta: torch.Tensor) -> int:
    return meta.shape[-1] if meta.ndim >= 2 else 1


def _allocate(source: SafetensorsSource, key: str, meta: torch.Tensor, parts: list, device: torch.device,
              pool: BufferPool | None) -> torch.Tensor:
    """The empty tensor for parameter ``key``, once its on-disk tensors ``parts`` ([(name, rows)]) are checked to
    fill every row exactly once."""
    shape, width = tuple(meta.shape), _width(meta)
    written = torch.zeros(math.prod(shape) // width if width else 0, dtype=torch.int32)
    for name, rows in parts:
        path, info, _ = source.entry(name)
        if math.prod(info["shape"]) != rows.numel() * width:
            raise ShardError(f"{path}: tensor {name} has shape {list(info['shape'])}, but {key} {list(shape)} "
                             f"needs {rows.numel()} rows of {width}; the checkpoint does not match config.json")
        written[rows] += 1
    if not parts or not bool((written == 1).all()):
        raise ShardError(f"{source.dir}: the shards do not hold every row of {key} exactly once "
                         f"(on-disk tensors: {[n for n, _ in parts][:4]}); the checkpoint is incomplete")
    return pool.take(shape, meta.dtype, device) if pool is not None else torch.empty(shape, dtype=meta.dtype,
                                                                                     device=device)


def _read_part(source: SafetensorsSource, name: str, rows: torch.Tensor, flat: torch.Tensor,
               dtype: torch.dtype) -> None:
    """On-disk tensor ``name`` into ``rows`` of ``flat``: straight from the file where the rows are consecutive
    and ``flat`` is in host memory of the same dtype; else read (page-locked for a GPU), then copied."""
    disk_dtype = DTYPES.get(source.entry(name)[1].get("dtype"))
    device = flat.device
    start = int(rows[0]) if rows.numel() else 0
    consecutive = bool(rows.numel()) and int(rows[-1]) - start + 1 == rows.numel() \
        and bool((rows.diff() == 1).all())
    if consecutive and device.type == "cpu" and disk_dtype == dtype:
        source.get(name, out=flat[start:start + rows.numel()])   # straight into its rows: no second copy
        return
    pinned = device.type == "cuda"   # page-locked reads, queued copies: the H2D copy runs at full speed
    block = source.get(name, pinned=pinned).reshape(-1, flat.shape[1]).to(device=device, dtype=dtype,
                                                                           non_blocking=pinned)
    if consecutive:   # every layout but interleaved: a copy
        flat[start:start + rows.numel()] = block
    else:
        flat[rows.to(device)] = block


def init_non_persistent_buffers(model: nn.Module, prefix: str = "", exclude_prefix: str | None = None,
                                device: torch.device | str = "cpu") -> None:
    """Meta non-persistent buffers under ``prefix`` computed as ``from_pretrained`` does (``_init_weights``, on
    the CPU), then moved to ``device``."""
    owners = {}
    for name, buf in model.named_non_persistent_buffers():
        if name.startswith(prefix) and buf.is_meta and not (exclude_prefix and name.startswith(exclude_prefix)):
            path, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            owner = model.get_submodule(path)
            owner._buffers[leaf] = torch.empty_like(buf, device="cpu")
            owners[path] = owner
    for owner in owners.values():
        model._init_weights(owner)
        for leaf, buf in owner._buffers.items():
            if buf is not None and buf.device != torch.device(device) and leaf in owner._non_persistent_buffers_set:
                owner._buffers[leaf] = buf.to(device)


def read_plan(model: nn.Module, prefix: str, exclude_prefix: str | None = None) -> dict[str, tuple]:
    """In-memory key -> (meta tensor, [(on-disk name, rows)]) for every tensor under ``prefix`` (ties kept once):
    what ``read_tensors`` reads. Looks at the model's structure, so it runs where the model is used."""
    metas = loadable_keys(model, prefix, exclude_prefix)
    sources = disk_sources(model, metas)
    return {key: (meta, sources[key]) for key, meta in metas.items()}


class LayerPlans:
    """``read_plan`` of each decoder layer, worked out once per layer structure: a layer whose tensors (names
    relative to the layer, shapes, dtypes) match an earlier layer's takes that plan with the layer index put into
    its keys and on-disk names, where every such name exists in the shards (else it is worked out). transformers'
    conversions rename by pattern and split by shape, so layers of one structure map alike; the on-disk rows are
    the same. Saves ``disk_sources`` (its conversion of index tensors: ~0.1 s per Qwen3-30B-A3B layer, on the
    thread that drives the GPU) for every layer after the first of each structure."""

    def __init__(self, model: nn.Module, layers_path: str, source: SafetensorsSource):
        self.model, self.layers_path, self.source = model, layers_path, source
        self._known: dict[tuple, tuple[int, dict]] = {}

    def plan(self, i: int) -> dict[str, tuple]:
        prefix = f"{self.layers_path}.{i}."
        metas = loadable_keys(self.model, prefix)
        shape = tuple((k[len(prefix):], tuple(m.shape), m.dtype) for k, m in metas.items())
        known = self._known.get(shape)
        if known is not None:
            derived = _renumbered(known[1], known[0], i, self.layers_path)
            if derived is not None and all(name in self.source for _, parts in derived.values() for name, _ in parts):
                return {key: (metas[key], parts) for key, (_, parts) in derived.items()}
        sources = disk_sources(self.model, metas)
        plan = {key: (meta, sources[key]) for key, meta in metas.items()}
        self._known.setdefault(shape, (i, plan))
        return plan


def _renumbered(plan: dict[str, tuple], old: int, new: int, layers_path: str) -> dict[str, tuple] | None:
    """``plan`` of layer ``old`` for layer ``new``: keys and on-disk names with ``layers.<old>.`` made
    ``layers.<new>.`` (None where an on-disk name does not hold that once)."""
    key_from, key_to = f"{layers_path}.{old}.", f"{layers_path}.{new}."
    leaf = layers_path.rsplit(".", 1)[-1]
    disk_from, disk_to = f"{leaf}.{old}.", f"{leaf}.{new}."
    out = {}
    for key, (meta, parts) in plan.items():
        renamed = []
        for name, rows in parts:
            if name.count(disk_from) != 1:
                return None
            renamed.append((name.replace(disk_from, disk_to), rows))
        out[key_to + key[len(key_from):]] = (meta, renamed)
    return out


def read_tensors(source: SafetensorsSource, plan: dict[str, tuple], device: torch.device | str = "cpu",
                 pool: BufferPool | None = None) -> dict[str, torch.Tensor]:
    """In-memory key -> its tensor read from ``source`` onto ``device`` (``plan``: ``read_plan``), into buffers
    from ``pool`` where it has them. Touches no model, so it may run in a background thread while the previous
    layer computes (``sources.ShardLayers``). Every on-disk tensor is read by one of the reader threads (the
    rows of different on-disk tensors never overlap once checked, so they write apart)."""
    device = torch.device(device)
    values, jobs = {}, []
    for key, (meta, parts) in plan.items():
        values[key] = _allocate(source, key, meta, parts, device, pool)
        jobs += [(source, name, rows, values[key].view(-1, _width(meta)), meta.dtype) for name, rows in parts]
    if len(jobs) == 1:
        _read_part(*jobs[0])
    else:
        futures = [_readers().submit(_read_part, *job) for job in jobs]
        wait(futures)   # every read has finished, even when one failed: nothing writes into these buffers later
        for future in futures:
            future.result()   # the first part's error (in plan order), if any
    return values


def install(model: nn.Module, values: dict[str, torch.Tensor], prefix: str, exclude_prefix: str | None = None,
            device: torch.device | str = "cpu") -> int:
    """Give the model's (meta) parameters and persistent buffers ``values`` (``read_tensors``), ties kept, and
    compute the non-persistent buffers under ``prefix``; returns the bytes installed."""
    by_id = {}
    for key, meta in model.state_dict(keep_vars=True).items():
        if key in values:
            by_id[id(meta)] = values[key]
    for name, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if id(p) in by_id:
            path, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            owner = model.get_submodule(path)
            slot = owner._parameters if leaf in owner._parameters else owner._buffers
            new = by_id[id(p)]
            slot[leaf] = nn.Parameter(new, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else new
            by_id[id(p)] = slot[leaf]
    init_non_persistent_buffers(model, prefix, exclude_prefix, device)
    return sum(v.numel() * v.element_size() for v in values.values())


def load_into(model: nn.Module, source: SafetensorsSource, prefix: str, exclude_prefix: str | None = None,
              device: torch.device | str = "cpu") -> int:
    """Load every tensor under ``prefix`` from ``source`` onto ``device`` (ties kept); returns the bytes loaded.
    Straight to the compute device: a decoder layer is read once and never moved back and forth."""
    values = read_tensors(source, read_plan(model, prefix, exclude_prefix), device)
    return install(model, values, prefix, exclude_prefix, device)


def free(module: nn.Module) -> None:
    """Send every tensor of ``module`` back to the meta device (its memory is released)."""
    module.to("meta")


@contextmanager
def zero_layers_on_the_fly(model: nn.Module, layers: nn.ModuleList, layers_path: str):
    """Each (meta) decoder layer runs on zeros, and is back on meta afterwards.

    The zeros are views into one zero-filled buffer per dtype, made once and shared by every layer (decoder
    layers are alike, so one layer's worth serves all): a probe forward costs its arithmetic, not a
    layer-sized allocation, page faults and memset per layer. Views, not stride-0 expansions: every kernel
    (grouped matmuls included) sees an ordinary contiguous weight."""
    pool: dict[torch.dtype, torch.Tensor] = {}

    def zeros(meta: torch.Tensor, offsets: dict) -> torch.Tensor:
        start = offsets.get(meta.dtype, 0)
        offsets[meta.dtype] = start + meta.numel()
        return pool[meta.dtype][start:start + meta.numel()].view(meta.shape)

    def pre(module, _args, i):
        tensors = [(m, n, t, True) for m in module.modules() for n, t in m._parameters.items() if t is not None]
        tensors += [(m, n, t, False) for m in module.modules() for n, t in m._buffers.items() if t is not None]
        need: dict[torch.dtype, int] = {}
        for _, _, t, _ in tensors:
            need[t.dtype] = need.get(t.dtype, 0) + t.numel()
        for dtype, n in need.items():
            if dtype not in pool or pool[dtype].numel() < n:
                pool[dtype] = torch.zeros(n, dtype=dtype)
        offsets: dict = {}
        for owner, name, t, is_param in tensors:
            if is_param:
                owner._parameters[name] = nn.Parameter(zeros(t, offsets), requires_grad=False)
            else:
                owner._buffers[name] = zeros(t, offsets)
        init_non_persistent_buffers(model, f"{layers_path}.{i}.")

    handles, hooked = [], []
    for i, layer in enumerate(layers):
        if next(iter(layer.parameters()), torch.empty(0)).is_meta:
            hooked.append(layer)
            handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: pre(m, a, i)))
            handles.append(layer.register_forward_hook(lambda m, a, o: free(m)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for layer in hooked:
            free(layer)
        pool.clear()
        release_heap()
