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


def _as_progression(rows: torch.Tensor, name: str) -> tuple[int, int, int]:
    """``rows`` (int64, 1-D) as ``(start, stop, step)``, or an error naming the on-disk tensor."""
    if rows.numel() == 1:
        return int(rows[0]), int(rows[0]) + 1, 1
    diffs = rows[1:] - rows[:-1]
    step = int(diffs[0])
    if step <= 0 or not bool((diffs == step).all()):
        raise UnsupportedModelError(f"on-disk tensor {name} is not a regular row slice of its parameter")
    return int(rows[0]), int(rows[-1]) + 1, step


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
        flat = tensor.reshape(-1)
        first = float(flat[0])
        key = next((k for k, (lo, hi) in spans.items() if lo <= first < hi), None)
        if key is None:
            continue
        shape, transposed, experts = params[key]
        local = (flat - spans[key][0]).to(torch.int64)   # exact: the index values are integers below 2^53
        if experts:
            n = shape[2] if transposed else shape[1]
        else:
            n = shape[1] if transposed else shape[0]
        if experts and local.numel() == experts * n:
            out[key].append((name, None, (0, n, 1)))
            continue
        expert_ids = local // n
        e = int(expert_ids[0])
        if not bool((expert_ids == e).all()):
            raise UnsupportedModelError(f"on-disk tensor {name} mixes experts {expert_ids.unique().tolist()}")
        out[key].append((name, e if experts else None, _as_progression(local % n, name)))
    missing = [k for k, v in out.items() if not v]
    if missing:
        raise UnsupportedModelError(f"could not map parameters to on-disk names: {missing[:3]}")
    return out
