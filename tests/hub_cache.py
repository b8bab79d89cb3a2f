"""A Hugging Face hub cache folder built in a test, in the layout huggingface_hub reads offline."""

from __future__ import annotations

import shutil
from pathlib import Path

SNAPSHOT_SHA = "0123456789abcdef0123456789abcdef01234567"


def add_snapshot(cache: Path, repo_id: str, folder: Path, revision: str = "main", sha: str = SNAPSHOT_SHA) -> Path:
    """Copy ``folder``'s files in as ``<cache>/models--org--name/snapshots/<sha>/`` with ``refs/<revision>``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(sha)   # no newline: huggingface_hub reads the file as the commit hash
    return snapshot
