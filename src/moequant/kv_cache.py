"""KV-cache observation and scales: what attention stores, seen through a stand-in cache.

Each observed decoder layer gets an ``ObservingCache`` as its ``cache`` argument (a forward pre-hook sets it;
calibration always runs with ``use_cache=False``, so the argument is otherwise None). Attention calls
``cache.update(key_states, value_states, layer_idx)`` with exactly what a KV cache would hold -- keys after
RoPE (and after any k-norm), values; for MLA the compressed latent (after ``kv_a_layernorm``) and the RoPE'd
``k_pe`` -- which is what the engines quantize. The stand-in records their amax, stores nothing, and returns
the states unchanged, so attention computes what it computes without a cache. The attention module is
identified structurally: the innermost non-leaf module running when ``update`` is called.

Scales (vLLM ``k_scale`` / ``v_scale`` convention: ``fp8(k / k_scale)``): ``fp8`` = amax / 448 per attention
module, ``fp8-cast`` = 1.0. MLA (``config.kv_lora_rank``): one FP8 cache entry holds latent and k_pe with one
scale, so k_scale = v_scale = amax over both / 448.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from moequant.errors import MoequantError
from moequant.expert_amax import abs_max
from moequant.formats.fp8 import fp8_tensor_scale
from moequant.models.experts import UnsupportedModelError
from moequant.scales import KVScales

KV_SCHEMES = ("fp8", "fp8-cast")


class KVObservationError(MoequantError, RuntimeError):
    """The KV cache could not be observed; the message names the layer and says what to do."""


def _running_max(old: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """On x's device (no wait for the device per call); ``ActivationStats.settle`` moves it to the CPU."""
    amax = abs_max(x)
    return torch.maximum(old.to(amax.device), amax)


class ObservingCache:
    """Handed to a decoder layer as its KV cache: records the amax of what attention stores (keys after
    RoPE, values; MLA: latent and k_pe), stores nothing, and returns the states unchanged."""

    def __init__(self, kv_amax: dict[str, list[torch.Tensor]], active: list[str]):
        self._kv_amax, self._active = kv_amax, active

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self._active:
            raise KVObservationError("KV cache update outside any module: cannot tell which attention it is")
        path = self._active[-1]
        old = self._kv_amax.get(path, [torch.zeros(()), torch.zeros(())])
        self._kv_amax[path] = [_running_max(old[0], key_states), _running_max(old[1], value_states)]
        return key_states, value_states


def cache_argument(layer: nn.Module, path: str) -> str:
    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise UnsupportedModelError(f"decoder layer {path} ({type(layer).__name__}) takes no cache argument, so "
                                "its KV cache cannot be observed; use kv_cache: none or fp8-cast")


def attach_kv_observers(layers: list[tuple[str, nn.Module]], kv_amax: dict[str, list[torch.Tensor]]) -> list:
    """Hooks giving each decoder layer an ``ObservingCache`` and tracking the innermost running module."""
    active: list[str] = []
    cache = ObservingCache(kv_amax, active)
    handles = []
    for layer_path, layer in layers:
        key = cache_argument(layer, layer_path)

        def inject(_module, args, kwargs, key=key, layer_path=layer_path):
            if kwargs.get(key) is not None:
                raise KVObservationError(f"{layer_path} was called with a KV cache during calibration; call "
                                         "the model with use_cache=False")
            return args, {**kwargs, key: cache}

        handles.append(layer.register_forward_pre_hook(inject, with_kwargs=True))
        for rel, module in layer.named_modules():
            if next(module.children(), None) is None:
                continue   # leaves (linears, norms) never call the cache
            full = f"{layer_path}.{rel}" if rel else layer_path
            handles.append(module.register_forward_pre_hook(_push(active, full)))
            handles.append(module.register_forward_hook(_pop(active), always_call=True))
    return handles


def _push(active: list[str], path: str):
    def hook(_module, _args) -> None:
        active.append(path)

    return hook


def _pop(active: list[str]):
    def hook(_module, _args, _output) -> None:   # must return None: a value would replace the output
        active.pop()

    return hook


def kv_cache_scales(kv_amax: dict[str, list[torch.Tensor]], scheme: str, mla: bool) -> dict[str, KVScales]:
    """KVScales per attention path seen by the observing cache (see the module docstring)."""
    if scheme not in KV_SCHEMES:
        raise ValueError(f"unknown KV-cache scheme {scheme!r}; expected one of {KV_SCHEMES}")
    if not kv_amax:
        raise KVObservationError("kv_cache was requested but no attention layer wrote to the KV cache during "
                                 "calibration; use kv_cache: none for this model")
    out = {}
    for path, (k_amax, v_amax) in kv_amax.items():
        if scheme == "fp8-cast":
            k, v = torch.ones((), dtype=torch.float32), torch.ones((), dtype=torch.float32)
        elif mla:
            k = v = fp8_tensor_scale(torch.maximum(k_amax, v_amax))
        else:
            k, v = fp8_tensor_scale(k_amax), fp8_tensor_scale(v_amax)
        out[path] = KVScales(path, k, v)
    return out
