"""On-disk tensor names of each quantizable parameter, learned from transformers' own save-time conversion.

transformers 5.x fuses per-expert checkpoint tensors at load and splits them again in ``save_pretrained``
through ``revert_weight_conversion``. We run that same function on *index tensors*: each parameter is
replaced by a float64 tensor of its shape with the input dimension collapsed to 1, holding at every
(expert, output row) the number ``expert * N + row``. Whatever names and splits transformers applies, the
values that come back say exactly which rows of which expert each on-disk tensor holds, so names never
come from hand-written patterns that could drift from the library's.
"""

from __future__ import annotations

import torch
from torch import nn

from moequant.models.experts import UnsupportedModelError


def revert_weight_conversion(model: nn.Module, state_dict: dict) -> dict:
    """transformers' own save-time conversion (``transformers.core_model_loading``), imported on first call:
    that module pulls torch.distributed.tensor, sympy and accelerate (about 1.2 s on a 2-core CPU), which
    ``import moequant`` must not pay."""
    try:  # transformers >= 5.0
        from transformers.core_model_loading import revert_weight_conversion as revert
    except ImportError as err:
        raise UnsupportedModelError("moequant needs transformers >= 5.0 (transformers.core_model_loading."
                                    "revert_weight_conversion is missing)") from err
    return revert(model, state_dict)


def _index_tensor(shape: tuple[int, ...], transposed: bool) -> torch.Tensor:
    """Index tensor of a parameter of ``shape`` (stored layout); values e * N + n in canonical coordinates."""
    if len(shape) == 2:
        n = shape[1] if transposed else shape[0]
        idx = torch.arange(n, dtype=torch.float64)
        return idx.reshape(1, n) if transposed else idx.reshape(n, 1)
    e = shape[0]
    n = shape[2] if transposed else shape[1]
    idx = torch.arange(e * n, dtype=torch.float64).reshape(e, n)
    return idx.reshape(e, 1, n) if transposed else idx.reshape(e, n, 1)


def _as_progression(values: list[int], name: str) -> tuple[int, int, int]:
    if len(values) == 1:
        return values[0], values[0] + 1, 1
    step = values[1] - values[0]
    if step <= 0 or any(b - a != step for a, b in zip(values, values[1:])):
        raise UnsupportedModelError(f"on-disk tensor {name} is not a regular row slice of its parameter")
    return values[0], values[-1] + 1, step


def disk_slices(
    model: nn.Module, params: dict[str, tuple[tuple[int, ...], bool, int | None]]
) -> dict[str, list[tuple[str, int | None, tuple[int, int, int]]]]:
    """Map each parameter key to its on-disk tensors.

    ``params``: key -> (stored shape, transposed, experts or None). Returns key -> [(disk name, expert or
    None, (start, stop, step))]; expert is None for a linear or for a fused tensor written whole.
    """
    index = {key: _index_tensor(shape, transposed) for key, (shape, transposed, _) in params.items()}
    spans = {}
    offset = 0.0
    for key, (shape, transposed, experts) in params.items():  # make values unique across parameters
        index[key] = index[key] + offset
        spans[key] = (offset, offset + index[key].numel())
        offset += index[key].numel()
    reverted = revert_weight_conversion(model, dict(index))
    out: dict[str, list] = {key: [] for key in params}
    for name, tensor in reverted.items():
        values = tensor.reshape(-1).tolist()
        key = next((k for k, (lo, hi) in spans.items() if lo <= values[0] < hi), None)
        if key is None:
            continue
        shape, transposed, experts = params[key]
        local = [int(v - spans[key][0]) for v in values]
        n = (shape[2] if transposed else shape[1]) if experts else len(local)
        if experts and len(local) == experts * n:
            out[key].append((name, None, (0, n, 1)))
            continue
        expert_ids = {v // n for v in local}
        if len(expert_ids) != 1:
            raise UnsupportedModelError(f"on-disk tensor {name} mixes experts {sorted(expert_ids)}")
        e = expert_ids.pop()
        out[key].append((name, e if experts else None, _as_progression([v % n for v in local], name)))
    missing = [k for k, v in out.items() if not v]
    if missing:
        raise UnsupportedModelError(f"could not map parameters to on-disk names: {missing[:3]}")
    return out
