"""moequant: quantize MoE LLMs to NVFP4 / FP8, calibrating every expert, and verify the result.

Public API (each stage takes and returns plain data):
    discover(model) -> Plan
    calibrate_weights(model, plan=None, scheme=None, method="mse", backend="auto") -> QuantState
    load_recipe(name_or_path, **overrides) -> Recipe
    quantize(model, recipe="nvfp4", calib=None, tokenizer=None, device=None) -> QuantResult
    export(model, state, out_dir, format="modelopt" | "compressed-tensors", overwrite=False, source_dir=None,
           recipe=None) -> Path
    verify(path, reference=None, engine=None) -> VerifyResult     (engine="vllm": vLLM 0.26.0 loader contract)

Every error a user can cause (a model, checkpoint, recipe, calibration file or output path that cannot be
used) is a ``MoequantError`` whose message names the file or tensor and the fix.
"""

from moequant.errors import MoequantError
from moequant.discover import discover
from moequant.plan import DiskSlice, Plan, Target
from moequant.weights import calibrate_weights
from moequant.scales import KVScales, QuantState, Record, TensorScales
from moequant.recipe import Recipe, load_recipe
from moequant.layers.in_memory import QuantResult, quantize
from moequant.export import ExportError, export
from moequant.verify import VerifyResult, verify

__version__ = "0.1.0"

__all__ = [
    "DiskSlice", "KVScales", "Plan", "QuantState", "Record", "Target", "TensorScales",
    "calibrate_weights", "discover",
    "QuantResult", "Recipe", "load_recipe", "quantize",
    "ExportError", "MoequantError", "VerifyResult", "export", "verify",
]
