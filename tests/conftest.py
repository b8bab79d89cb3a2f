import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hub_cache import SNAPSHOT_SHA, add_snapshot  # noqa: E402
from tiny_models import build  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_cache():
    """Build each tiny family once per session; tests that mutate must deep-copy."""
    cache = {}

    def get(family: str, seed: int = 0):
        if (family, seed) not in cache:
            cache[(family, seed)] = build(family, seed)
        return cache[(family, seed)]

    return get



@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache under tmp_path (see ``hub_cache.py``); returns ``add(repo_id, folder,
    revision="main", sha=SNAPSHOT_SHA)`` that copies ``folder``'s files in as that repository's snapshot.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, when imported: the environment is set for any
    child process and the module's constants for this one. A call that would reach the network fails the test.
    """
    from huggingface_hub import HfApi, constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the Hugging Face Hub")

    monkeypatch.setattr(HfApi, "repo_info", no_network)
    monkeypatch.setattr(HfApi, "list_repo_tree", no_network)
    return lambda repo_id, folder, revision="main", sha=SNAPSHOT_SHA: add_snapshot(cache, repo_id, folder,
                                                                                    revision, sha)
