"""moequant: quantize MoE LLMs to NVFP4 / FP8, calibrating every expert, and verify the result."""

__version__ = "0.1.0"
