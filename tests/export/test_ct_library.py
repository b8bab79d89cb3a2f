"""Our compressed-tensors output, loaded by the ``compressed-tensors`` library itself (test-only dependency).

The library's own path: ``QuantizationConfig.model_validate`` on our config.json, ``apply_quantization_config``
on a skeleton of per-expert ``nn.Linear``s (one per on-disk module, routers and lm_head included so that the
ignore list is exercised), ``ModelCompressor.compress_model`` to get the compressed parameter set it expects,
``load_state_dict(strict=True)`` of our tensors into it (names, shapes and dtypes must match exactly), then
``decompress_model``. Runs on CPU (the library falls back from Triton to torch).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ckpt_factory import calibrated, read_all
from moequant.export import export
from moequant.verify import iter_decoded

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402


def _skeleton(tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """A module tree with one bias-free ``nn.Linear`` per on-disk linear (quantized or not)."""
    linears = {}
    for name, t in tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix == "weight_packed":
            linears[module] = (t.shape[1] * 2, t.shape[0], torch.bfloat16)
        elif suffix == "weight" and t.ndim == 2 and "embed" not in module:
            linears.setdefault(module, (t.shape[1], t.shape[0], t.dtype if t.dtype.is_floating_point
                                        and t.dtype.itemsize > 1 else torch.bfloat16))
    root = nn.Module()
    for path, (n_in, n_out, dtype) in linears.items():
        parent = root
        for part in path.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(path.split(".")[-1], nn.Linear(n_in, n_out, bias=False, dtype=dtype))
    return root, linears


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_library_loads_per_expert_linears_and_decodes_like_the_verifier(tmp_path, family):
    model, state = calibrated(family)
    out = export(model, state, tmp_path / "out", format="compressed-tensors", max_shard_bytes=50_000)
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    tensors = read_all(out)
    root, linears = _skeleton(tensors)
    apply_quantization_config(root, config)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(root)
    expected = root.state_dict()
    linear_params = {"weight", "weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"}
    ours = {k: v for k, v in tensors.items()
            if k.rpartition(".")[0] in linears and k.rpartition(".")[2] in linear_params}
    assert set(expected) == set(ours)  # exactly the parameter set the library builds, nothing missing or extra
    for name, param in expected.items():
        assert (param.dtype, param.shape) == (ours[name].dtype, ours[name].shape), name
    root.load_state_dict(ours, strict=True)
    for ignored in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]:
        assert not hasattr(root.get_submodule(ignored), "quantization_scheme"), ignored
    compressor.decompress_model(root)
    decoded = dict(iter_decoded(out))
    experts = [m for m in decoded if ".experts." in m]
    assert len(experts) == 3 * state.plan.expert_targets()[0].num_experts * len(state.plan.expert_targets()) // 2
    for module, ours_f32 in decoded.items():
        lib = root.get_submodule(module).weight  # library output dtype: bf16 (its unpack default)
        assert torch.equal(lib, ours_f32.to(lib.dtype)), module


def test_library_float32_dequantize_is_bit_identical(tmp_path):
    model, state = calibrated("olmoe")
    out = export(model, state, tmp_path / "out", format="compressed-tensors")
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    args = qc.config_groups["group_0"].weights
    tensors = read_all(out)
    n = 0
    for module, ours in iter_decoded(out):
        packed = tensors[f"{module}.weight_packed"]
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        lib = dequantize(x_q=codes, scale=tensors[f"{module}.weight_scale"].to(torch.float32), args=args,
                         global_scale=tensors[f"{module}.weight_global_scale"], dtype=torch.float32)
        assert torch.equal(lib.view(torch.int32), ours.view(torch.int32)), module
        n += 1
    assert n == len(state.records())
