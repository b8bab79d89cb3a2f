"""moequant: quantize MoE LLMs to NVFP4 / FP8, calibrating every expert, and verify the result.

Public API (each stage takes and returns plain data):
    discover(model) -> Plan
    calibrate_weights(model, plan=None, scheme=None, method="mse", backend="auto") -> QuantState
"""

from moequant.discover import discover
from moequant.plan import DiskSlice, Plan, Target
from moequant.quantize import calibrate_weights
from moequant.state import KVScales, QuantState, Record, TensorScales

__version__ = "0.1.0"

__all__ = [
    "DiskSlice", "KVScales", "Plan", "QuantState", "Record", "Target", "TensorScales",
    "calibrate_weights", "discover",
]
