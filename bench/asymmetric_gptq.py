"""Per-layer check of "asymmetric" GPTQ for W4A4 (issue 17: can the weights compensate the activations' error?).

In W4A4 an engine computes Q(X) Q(W)^T where the model computed X W^T. GPTQ as moequant runs it minimizes
||X (W - Q(W))^T|| (unquantized inputs). The asymmetric objective ||X W^T - Q(X) Q(W)^T|| has the unconstrained
optimum W* = W + W (C - Hq)^T (Hq + lambda I)^-1 with Hq = Q(X)^T Q(X), C = Q(X)^T X (a ridge towards W, lambda =
damp x mean diag Hq); GPTQ with H = Hq then rounds W* under the same scales. Measured on real weights and inputs of
the dense built-in model (SmolLM2-135M: 16 x 512 calibration tokens, 4 x 512 held-out tokens), per linear: the
held-out W4A4 relative output error ||X_h W^T - Q(X_h) Q^T||^2 / ||X_h W^T||^2 of round to nearest at the
weighted search's scales, GPTQ with H (moequant), GPTQ with Hq, the asymmetric variant for several damps, and the
unquantized weights under quantized inputs (the error no weight choice removes without compensating).

    PYTHONPATH=src python3 bench/asymmetric_gptq.py
"""

from __future__ import annotations

import torch

from moequant.calibration_data import calibration_tokens, load_tokenizer
from moequant.demo import builtin_model_dir
from moequant.evaluate import eval_windows
from moequant.formats.activations import fake_quantize_activation_nvfp4
from moequant.formats.nvfp4 import dequantize_nvfp4, global_scale_from_amax, quantize_nvfp4, tensor_amax
from moequant.formats.weighted_mse import search_weighted_reference
from moequant.kernels.torch_gptq import gptq_codes
from moequant.quantize_command import load_model

LINEARS = ("model.layers.10.self_attn.q_proj", "model.layers.5.mlp.gate_proj", "model.layers.10.mlp.down_proj",
           "model.layers.20.mlp.down_proj")
DAMPS = (0.01, 0.1, 1.0, 3.0)


def _inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    got = {n: [] for n in LINEARS}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1]).clone())) for n in LINEARS]
    for batch in ids.split(4):
        model(input_ids=batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in got.items()}


@torch.no_grad()
def dense_linears_inputs():
    """The built-in dense model (float32) and, per linear of ``LINEARS``, its inputs on 16 x 512 calibration
    tokens and on 4 x 512 held-out tokens (float64)."""
    model_dir = builtin_model_dir(dense=True)
    model = load_model(model_dir).float().eval()
    tokenizer = load_tokenizer(model_dir)
    calib = _inputs(model, calibration_tokens(None, tokenizer, samples=16, seq_len=512, seed=0).tokens)
    return model, calib, _inputs(model, eval_windows(tokenizer, windows=4, seq_len=512)[0])


@torch.no_grad()
def main() -> None:
    model, calib, held = dense_linears_inputs()
    print("| linear | RTN | GPTQ (H) | GPTQ (Hq) | " + " | ".join(f"asym., damp {d}" for d in DAMPS)
          + " | exact weights |")
    print("|---" * (5 + len(DAMPS)) + "|")
    for name in LINEARS:
        w = model.get_submodule(name).weight.detach().float()
        x, xh = calib[name], held[name]
        s_in = (x.abs().max() / 2688).float()
        xq, xhq = (fake_quantize_activation_nvfp4(t.float(), s_in).double() for t in (x, xh))
        h, hq, c = x.T @ x / x.shape[0], xq.T @ xq / x.shape[0], xq.T @ x / x.shape[0]
        gs = global_scale_from_amax(tensor_amax(w, 0))
        bs = search_weighted_reference(w, gs, h.diagonal().float())
        ref = xh @ w.double().T

        def err(q: torch.Tensor) -> float:
            return float(((ref - xhq @ q.double().T) ** 2).sum() / (ref ** 2).sum())

        def gptq(target: torch.Tensor, hess: torch.Tensor) -> torch.Tensor:
            return dequantize_nvfp4(gptq_codes(target, gs, bs, hess, torch.tensor(True))[0], gs, bs)

        row = [err(dequantize_nvfp4(quantize_nvfp4(w, gs, bs), gs, bs)), err(gptq(w, h)), err(gptq(w, hq))]
        eye = torch.eye(hq.shape[0], dtype=torch.float64)
        for damp in DAMPS:
            correction = w.double() @ (c - hq).T @ torch.linalg.inv(hq + damp * hq.diagonal().mean() * eye)
            row.append(err(gptq((w.double() + correction).float(), hq)))
        row.append(err(w))
        print(f"| {name} | " + " | ".join(f"{v:.5f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
