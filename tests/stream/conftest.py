import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "cli"))

from model_dirs import save_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    cache = {}

    def get(family: str, dead_experts: bool = False) -> Path:
        if (family, dead_experts) not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-model")
            cache[family, dead_experts] = save_model_dir(folder, family, dead_experts)
        return cache[family, dead_experts]

    return get
