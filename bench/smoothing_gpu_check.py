"""GPU check of smoothing (recipe key ``smoothing``): the CLI on a tiny Qwen3-MoE and DeepSeek-V3 on CUDA, streamed
and ``--no-stream`` (the bytes must match, factors file included), then ``verify --reference`` (factors undone).

    PYTHONPATH=src python3 bench/smoothing_gpu_check.py
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parents[1] / "tests"), str(Path(__file__).parents[1] / "tests" / "cli")]

from model_dirs import save_model_dir  # noqa: E402

from moequant.cli import main  # noqa: E402

FAST = ["--recipe", "nvfp4-best", "--smoothing", "0.5", "--device", "cuda", "--samples", "4", "--seq-len", "32",
        "--quiet"]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(("report", "moequant_report"))}


for family in ("qwen3_moe", "deepseek_v3"):
    root = Path(f"/tmp/smoothing_gpu/{family}")
    src = save_model_dir(root / "src", family) if not (root / "src").exists() else root / "src"
    assert main(["quantize", str(src), "-o", str(root / "stream"), *FAST, "--overwrite"]) == 0
    assert main(["quantize", str(src), "-o", str(root / "memory"), *FAST, "--no-stream", "--overwrite"]) == 0
    a, b = files(root / "stream"), files(root / "memory")
    same = sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    ok = main(["verify", str(root / "stream"), "--reference", str(src)]) == 0
    print(f"{family}: streamed == --no-stream bytes: {same} ({len(a)} files, factors file: "
          f"{'moequant_smoothing/factors.safetensors' in a}); verify --reference: {ok}")
