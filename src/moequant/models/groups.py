"""Weight groups found from the model's actual dataflow: linears that read the identical input tensor.

A probe forward on a few tokens records, for every ``nn.Linear`` call, the identity of its input (data
pointer, shape, strides, dtype; the tensors are kept alive during the probe so no address is reused).
Linears that received the same tensor on their first call form a group: q/k/v, DeepSeek's q_a_proj +
kv_a_proj_with_mqa, a dense MLP's gate/up, whatever the attribute names. Hooks are removed in ``finally``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


def _input_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)


def find_input_groups(model: nn.Module, linear_paths: list[str], probe: dict) -> list[tuple[str, ...]]:
    """Groups (tuples of module paths, in model order, >= 2 members) of linears sharing their input.

    ``probe``: keyword arguments for ``model(**probe)``.
    """
    wanted = set(linear_paths)
    first_input: dict[str, tuple] = {}
    keep_alive: list[torch.Tensor] = []
    handles = []

    def make_hook(path: str):
        def hook(_module, args):
            if path not in first_input and args:
                keep_alive.append(args[0])
                first_input[path] = _input_key(args[0])

        return hook

    for path, module in model.named_modules():
        if path in wanted:
            handles.append(module.register_forward_pre_hook(make_hook(path)))
    try:
        with torch.no_grad():
            model(**probe)
    finally:
        for h in handles:
            h.remove()
    by_input: dict[tuple, list[str]] = defaultdict(list)
    for path in linear_paths:  # model order
        if path in first_input:
            by_input[first_input[path]].append(path)
    keep_alive.clear()
    return [tuple(paths) for paths in by_input.values() if len(paths) > 1]
