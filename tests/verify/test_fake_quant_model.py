"""load_fake_quantized: the checkpoint's decoded weights with engine-like activation fake-quant, or weights only
(``activations=False``: how vLLM runs an NVFP4 checkpoint on Hopper, Marlin W4A16; bench/engine_check.py)."""

from __future__ import annotations

import torch

from ckpt_factory import calibrated
from moequant.export import export
from moequant.fake_quant_model import FakeQuantExperts, load_fake_quantized


def _weights(model) -> dict[str, torch.Tensor]:
    return {n.replace(".inner.", "."): p for n, p in model.named_parameters()}


def test_weights_only_twin_has_the_same_weights_and_no_activation_quant(tmp_path):
    model, state = calibrated("qwen3_moe")   # W4A4: input scales on disk for every linear and expert
    model.save_pretrained(tmp_path / "ref")
    out = export(model, state, tmp_path / "ckpt", format="modelopt")
    w4a4 = load_fake_quantized(tmp_path / "ref", out, "cpu")
    w4a16 = load_fake_quantized(tmp_path / "ref", out, "cpu", activations=False)

    assert any(isinstance(m, FakeQuantExperts) for m in w4a4.modules())
    assert any(m._forward_pre_hooks for m in w4a4.modules())
    assert not any(isinstance(m, FakeQuantExperts) or m._forward_pre_hooks for m in w4a16.modules())
    a, b = _weights(w4a4), _weights(w4a16)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(w4a4(ids).logits, w4a16(ids).logits)
