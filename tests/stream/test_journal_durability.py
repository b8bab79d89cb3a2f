"""The journal lists a part only once its files are on the disk: every file of the part, then the directory
holding their names, are fsync'ed before journal.json (itself fsync'ed, then renamed, then its directory) names
the part. A machine that goes down loses the page cache; a resumed run must not link a shard that was never
written."""

from __future__ import annotations

import os

import torch

from moequant import journal as journal_mod
from moequant.export.writer import TensorSpec
from moequant.journal import JOURNAL, Journal


def _shard(n: int):
    return [TensorSpec(f"model.layers.0.w{i}", (4, 8), torch.float32, lambda i=i: torch.full((4, 8), float(i)))
            for i in range(n)]


def test_a_part_is_on_disk_before_the_journal_names_it(tmp_path, monkeypatch):
    events = []
    real_sync, real_replace = journal_mod.sync_to_disk, os.replace

    def sync(path):
        events.append(("sync", path.name))
        real_sync(path)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(journal_mod, "sync_to_disk", sync)
    monkeypatch.setattr(journal_mod.os, "replace", replace)
    j = Journal(tmp_path / ".out.moequant-partial", {"model": "m"}, overwrite=False)
    try:
        start = len(events)
        j.record("layer-00000", [_shard(3), _shard(2)], {"tensors": {}})
        part = events[start:]
        files = {"part-layer-00000-000.safetensors", "part-layer-00000-001.safetensors", "part-layer-00000.json",
                 "part-layer-00000.pt"}
        at = part.index(("replace", JOURNAL))
        before = [name for kind, name in part[:at] if kind == "sync"]
        assert files <= set(before)
        last_file = max(before.index(f) for f in files)
        assert j.dir.name in before[last_file + 1:]            # their directory entries, after the files
        assert before[-1] == f".{JOURNAL}.tmp"                 # the new journal's bytes, before the rename
        assert part[at + 1:] == [("sync", j.dir.name)]         # and the rename itself
        assert j.done("layer-00000")
    finally:
        j.close(discard=True)
