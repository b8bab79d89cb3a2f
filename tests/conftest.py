import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

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
