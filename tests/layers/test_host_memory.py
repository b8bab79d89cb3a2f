"""host_memory: oneDNN's per-shape caches are capped for the run, and a user's own setting is kept (that the cap
holds the run's memory flat with depth: tests/stream/test_stream_memory.py, calibrated)."""

import os

from moequant.layers.host_memory import KERNEL_CACHE_ENTRIES, KERNEL_CACHE_VARIABLES, bound_cpu_kernel_caches


def test_caps_unset_caches_and_keeps_the_users_setting(monkeypatch):
    first, second = KERNEL_CACHE_VARIABLES
    monkeypatch.delenv(first, raising=False)
    monkeypatch.setenv(second, "7")
    bound_cpu_kernel_caches()
    assert os.environ[first] == str(KERNEL_CACHE_ENTRIES)
    assert os.environ[second] == "7"
