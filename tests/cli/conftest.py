import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from model_dirs import heldout_text, save_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    cache = {}

    def get(family: str, dead_experts: bool = False) -> Path:
        key = (family, dead_experts)
        if key not in cache:
            cache[key] = save_model_dir(tmp_path_factory.mktemp(f"{family}-model"), family, dead_experts)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def heldout(tmp_path_factory) -> Path:
    return heldout_text(tmp_path_factory.mktemp("text"))
