"""Host memory that outlives a decoder layer: the C heap's free memory and the CPU matmul library's caches.

Streaming holds one layer at a time, so peak memory is flat with depth only if nothing else keeps per-layer
memory. Two things do, neither of them moequant's own allocations:

* glibc keeps freed heap memory for reuse: ``release_heap`` hands it back when it exceeds a bound;
* oneDNN, which runs bf16 / fp16 CPU matmuls, keeps a primitive per matmul shape in two caches, its own
  primitive cache and PyTorch's ideep LRU cache, 1024 entries each by default. Every expert sees another
  routed-token count in every layer, so every layer adds shapes until both caches are full (the whole CLI job
  on a small bf16 MoE: peak RSS 0.74 GiB at 8 layers, 1.12 GiB at 32; flat at ~0.62 GiB with 64 entries).
  ``bound_cpu_kernel_caches`` bounds them; fp32 matmuls (MKL) do not use them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# oneDNN reads ONEDNN_PRIMITIVE_CACHE_CAPACITY, and PyTorch's ideep LRU_CACHE_CAPACITY, when the process creates
# its first oneDNN primitive (not when torch is imported): set before the first bf16 CPU matmul, they hold.
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
KERNEL_CACHE_ENTRIES = 64


def bound_cpu_kernel_caches() -> None:
    """Cap oneDNN's two per-shape caches at ``KERNEL_CACHE_ENTRIES`` entries each, unless the user set them.

    Takes effect only if the process has not yet run a oneDNN matmul (the CLI calls it first thing; the API
    when a quantize run starts). A capped cache costs a primitive rebuild when an evicted shape comes back;
    a calibration run rarely sees a shape twice (routed-token counts differ per expert, batch and layer)."""
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(KERNEL_CACHE_ENTRIES))


def release_heap(keep: int = 0) -> None:
    """Hand the C heap's free memory back to the OS when it holds more than ``keep`` bytes of it (all of it
    with ``keep=0``). Where the C library has no ``malloc_trim`` (not glibc) this does nothing; where it cannot
    say how much it holds (glibc < 2.33, no ``mallinfo2``) it trims whenever asked.

    glibc keeps freed heap memory for reuse, and with one decoder layer's buffers freed and new ones of other
    sizes taken for the next, what it keeps grows with depth (CPU, 52 MB layers, default allocator: peak RSS
    666 MB at 8 layers, 1159 MB at 32). Trimming after every layer holds it flat but re-faults every page the
    next layer touches (2.5-3.5 s of the built-in model's ~30 s on 2 cores); the loop reuses the weights'
    buffers (``BufferPool``) and trims only when what glibc keeps exceeds about two layers, which bounds it
    the same way at a fraction of the trims."""
    if _LIBC is None:
        return
    if keep > 0 and _MALLINFO2 is not None and _MALLINFO2().fordblks <= keep:
        return
    _LIBC.malloc_trim(0)


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:   # no loadable C library under that name: nothing to trim
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's ``mallinfo2`` (its ``fordblks``: free bytes the heap keeps, all arenas), or None."""
    fn = getattr(_LIBC, "mallinfo2", None) if _LIBC is not None else None
    if fn is None:
        return None
    fn.restype = _Mallinfo2
    return fn


_MALLINFO2 = _mallinfo2()
