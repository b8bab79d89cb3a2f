"""Running a model one decoder layer at a time: capture layer 0's inputs, replay them layer by layer.

``capture_layer_inputs`` runs the model's own forward (embeddings, rotary embeddings, masks) and stops it at
decoder layer 0 with a private exception, keeping what layer 0 was called with: the hidden states and every
other argument (position embeddings, attention mask, ...). Each layer is then called with the previous
layer's output and those same arguments, which is right only when every layer receives the same ones:
``check_uniform_layer_arguments`` verifies that on an 8-token probe (same Python objects for every layer)
and refuses models whose layers differ (e.g. sliding-window and full-attention layers get different masks).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moequant.discover import text_config
from moequant.models.experts import UnsupportedModelError


@dataclass
class LayerInput:
    hidden: torch.Tensor     # [B, L, H]
    args: tuple              # positional arguments after the hidden states
    kwargs: dict


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at decoder layer 0."""


def device_of(module: nn.Module, path: str) -> torch.device | None:
    """The one device holding ``module``'s parameters and buffers (None if it holds none)."""
    devices = {t.device for t in list(module.parameters()) + list(module.buffers())}
    if len(devices) > 1:
        raise UnsupportedModelError(
            f"{path or 'the model'} holds tensors on several devices ({sorted(map(str, devices))}); moequant "
            "moves whole decoder layers: put the model on one device (CPU is fine) and pass device=...")
    return devices.pop() if devices else None


@contextmanager
def on_device(module: nn.Module, device: torch.device, path: str):
    """``module`` on ``device`` inside the block, back where it was afterwards (also on error)."""
    home = device_of(module, path)
    if home is None or home == device:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


def to_device(obj, device: torch.device):
    """Tensors inside nested tuples / lists / dicts moved to ``device``; anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def flat_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in flat_tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in flat_tensors(x)]
    return []


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def probe_ids(model: nn.Module, tokens: int = 8) -> torch.Tensor:
    """A fixed ``[1, tokens]`` input (token ids spread over the vocabulary)."""
    vocab = int(getattr(text_config(model), "vocab_size", 32))
    return (torch.arange(tokens) * 7919 % max(vocab, 1)).reshape(1, tokens)


def capture_layer_inputs(model: nn.Module, layer0: nn.Module, layer0_path: str, batches: list[torch.Tensor],
                         device: torch.device) -> list[LayerInput]:
    """Decoder layer 0's inputs for every batch, moved to ``device``; each forward stops at layer 0."""
    captured: list[LayerInput] = []

    def hook(_module, args, kwargs):
        captured.append(LayerInput(to_device(args[0], device), to_device(tuple(args[1:]), device),
                                   to_device(dict(kwargs), device)))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(input_device(model)), use_cache=False)
            except _StopForward:
                continue
            raise UnsupportedModelError(f"the model's forward never reached {layer0_path}; cannot capture its "
                                        "inputs: use quantize(..., sequential=False)")
    finally:
        handle.remove()
    return captured


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (bool, int, float, str)) and a == b)


def check_uniform_layer_arguments(model: nn.Module, layers_path: str, layers: nn.ModuleList) -> None:
    """Raise unless every decoder layer receives the very same non-hidden-state arguments as layer 0."""
    seen: list[tuple[int, tuple, dict]] = []
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs, i=i: seen.append((i, args[1:], kwargs)), with_kwargs=True)
        for i, layer in enumerate(layers)]
    try:
        model(input_ids=probe_ids(model).to(input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len(layers):
        raise UnsupportedModelError(f"the probe forward called {len(seen)} of {len(layers)} decoder layers; "
                                    "use quantize(..., sequential=False)")
    _, args0, kwargs0 = seen[0]
    for i, args, kwargs in seen[1:]:
        for name in sorted(set(kwargs) | set(kwargs0)):
            if not _same(kwargs.get(name), kwargs0.get(name)):
                raise UnsupportedModelError(
                    f"decoder layer {layers_path}.{i} receives a different {name!r} than layer 0 (layers of "
                    "different attention types?); layer-by-layer calibration replays layer 0's arguments, so "
                    "it would be wrong for this model: use quantize(..., sequential=False)")
        if not _same(args, args0):
            raise UnsupportedModelError(f"decoder layer {layers_path}.{i} receives different positional "
                                        "arguments than layer 0; use quantize(..., sequential=False)")
