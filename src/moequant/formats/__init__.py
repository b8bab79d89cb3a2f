"""Reference numerics in plain PyTorch: the single definition of every quantization step."""
