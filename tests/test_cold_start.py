"""``import moequant`` (and the CLI module, through argument parsing) compiles, registers and starts nothing, and
imports no library it does not need yet: kernels are compiled on first use (TorchScript's error loop, Triton's
search), transformers is imported by the commands that build or read a model, so a process that only parses
its arguments, inspects or verifies pays for none of them."""

import json
import subprocess
import sys

PROBE = """
import json, sys, threading
import torch
threads_before = threading.active_count()
import moequant, moequant.cli
moequant.cli._parser().parse_args(["quantize", "some/model", "--device", "cpu", "--recipe", "nvfp4-mse"])
from moequant.kernels import torch_mse
print(json.dumps({
    "triton_kernels": "moequant.kernels.triton_mse" in sys.modules,
    "scripted": len(torch_mse._SCRIPTED),
    "threads_started": threading.active_count() - threads_before,
    "moequant_ops": hasattr(torch.ops, "moequant") and bool(list(torch.ops.moequant)),
    "imported": sorted(m for m in HEAVY if m in sys.modules),
}))
"""

# Each costs a fresh process from 0.1 s to seconds and none is needed before a model is built: transformers
# (1-2 s; its model modules pull torch._dynamo, scipy and, on GPU machines, scikit-learn), its
# core_model_loading (torch.distributed.tensor, sympy, accelerate: 1.2 s on a 2-core CPU), triton (a compile
# on first launch), the hub client.
HEAVY = ("transformers", "triton", "sklearn", "scipy", "sympy", "accelerate", "huggingface_hub", "torch._dynamo",
         "torch._inductor", "torch.distributed.tensor")


def test_import_compiles_and_starts_nothing():
    probe = f"HEAVY = {HEAVY!r}\n" + PROBE
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"triton_kernels": False, "scripted": 0, "threads_started": 0, "moequant_ops": False,
                    "imported": []}, seen
