"""``import moequant`` (and the CLI module) compiles, registers and starts nothing: kernels are compiled on first
use (TorchScript's error loop, Triton's search), so a process that only inspects or verifies pays for neither."""

import json
import subprocess
import sys

PROBE = """
import json, sys, threading
import torch
threads_before = threading.active_count()
import moequant, moequant.cli
from moequant.kernels import torch_mse
print(json.dumps({
    "triton_kernels": "moequant.kernels.triton_mse" in sys.modules,
    "scripted": len(torch_mse._SCRIPTED),
    "threads_started": threading.active_count() - threads_before,
    "moequant_ops": hasattr(torch.ops, "moequant") and bool(list(torch.ops.moequant)),
}))
"""


def test_import_compiles_and_starts_nothing():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"triton_kernels": False, "scripted": 0, "threads_started": 0, "moequant_ops": False}, seen
