"""Structural adapters: how a transformers model stores its quantizable weights."""
