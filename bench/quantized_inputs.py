"""Experiment for issue 17 (GPTQ's "choice of inputs"): calibrate each decoder layer on the outputs of the
already-quantized earlier layers instead of the original model's.

moequant's layer loop (``layers/loop.run_layers``) hands each layer's observed forward outputs, computed with the
layer's ORIGINAL weights, to the next layer. Inside ``quantized_inputs()`` the loop's step is wrapped: once a
layer's result is computed (scales, codes, input scales, all from the inputs it was given), its forward is run
again from the same inputs with the layer as an engine would run the checkpoint, and those outputs become the
next layer's inputs:
  * every quantized weight replaced by its dequantized checkpoint value (codes x block scale x global scale);
  * with ``activations=True`` (W4A4), each quantized linear's input and each expert's gate_up and down inputs
    fake-quantized at the shipped input scales (``formats.activations``, as ``moequant eval`` does;
    the experts through ``fake_quant_model.FakeQuantExperts``).
The layer's weights and modules are restored afterwards. So every statistic of layer i (activation amax,
channel weights, X^T X) is taken on the deployed model's layer-i inputs, as in GPTQ's sequential variant. Used by
``bench/quality.py --inputs quantized``; not a product option (it would also need the resume path's replay).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from moequant.fake_quant_model import FakeQuantExperts
from moequant.formats.activations import fake_quantize_activation_nvfp4
from moequant.formats.fp4 import unpack_fp4
from moequant.formats.nvfp4 import dequantize_nvfp4
from moequant.layers import loop
from moequant.weights import canonical_weight


@contextmanager
def quantized_inputs(activations: bool = True):
    """Within: every ``run_layers`` feeds layer i+1 with quantized layer i's outputs (module docstring)."""
    plain = loop.calibrate_layer

    def step(job, i, inputs, ranks=None):
        saved = [inp.hidden for inp in inputs]
        result = plain(job, i, inputs, ranks)
        if i is None or not inputs:
            return result
        for inp, hidden in zip(inputs, saved):
            inp.hidden = hidden
        with torch.no_grad(), _as_deployed(job, i, result, activations):
            loop.replay(job.layers[i], inputs)
        return result

    loop.calibrate_layer = step
    try:
        yield
    finally:
        loop.calibrate_layer = plain


def _fq(scale: torch.Tensor):
    return lambda x: fake_quantize_activation_nvfp4(x, scale.to(x.device))


@contextmanager
def _as_deployed(job, i: int, result, activations: bool):
    weights, hooks, wrapped = [], [], {}
    targets = job.targets_of(i)
    try:
        for t in targets:   # all weights first: a wrapped container no longer answers canonical_weight
            s = result.tensors[t.key]
            if s.scheme != "nvfp4":
                raise ValueError(f"{t.key}: the experiment handles NVFP4 targets only")
            w = canonical_weight(job.model, t)
            weights.append((w, w.detach().clone()))
            dev = w.device
            w.data.copy_(dequantize_nvfp4(unpack_fp4(s.codes.to(dev)), s.global_scale.to(dev),
                                          s.block_scale.to(dev)).to(w.dtype))
        for t in targets:
            s = result.tensors[t.key]
            if not activations or s.input_scale is None:
                continue
            if t.kind == "linear":
                fq = _fq(s.input_scale)
                module = job.model.get_submodule(t.module_path)
                hooks.append(module.register_forward_pre_hook(lambda _m, args, f=fq: (f(args[0]),) + args[1:]))
                continue
            if t.module_path not in wrapped:
                container = job.model.get_submodule(t.module_path)
                e = t.shape[0]
                wrapped[t.module_path] = (container, FakeQuantExperts(container, [lambda x: x] * e, [lambda x: x] * e))
                job.model.set_submodule(t.module_path, wrapped[t.module_path][1])
            fns = [_fq(s.input_scale[e]) for e in range(t.shape[0])]
            if t.param_name == "down_proj":
                wrapped[t.module_path][1].down_fq = fns
            else:
                wrapped[t.module_path][1].gate_up_fq = fns
        yield
    finally:
        for h in hooks:
            h.remove()
        for path, (container, _) in wrapped.items():
            job.model.set_submodule(path, container)
        with torch.no_grad():
            for w, original in weights:
                w.data.copy_(original)
