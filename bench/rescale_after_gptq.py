"""Per-linear check of "scale re-search after GPTQ" (issue 17, point 5): with GPTQ's codes fixed, are there
better block scales?

For one linear ``w [N, K]``, codes ``v`` (E2M1 values) and the group's global scale ``g``, the shipped weights are
``Q = g * S (x) v`` (``S [N, K/16]`` the FP8 block scales). Per row, GPTQ's objective ``(w - Q) H (w - Q)^T`` is
quadratic in that row's block scales: the normal equations ``A s = r`` with ``A[b, c] = g^2 v_b^T H_bc v_c`` and
``r[b] = g v_b^T (H w)_b`` give the best continuous scales for the codes (all blocks of a row jointly, so GPTQ's
cross-block compensation is kept); they are rounded to E4M3 (``float8_e4m3fn``, round to nearest). Then, once
more, GPTQ's codes under the new scales (alternation). Measured on real weights and inputs of the dense built-in
model (16 x 512 calibration tokens, 4 x 512 held-out tokens), per linear: the held-out relative output error
``||X_h W^T - X_h Q^T||^2 / ||X_h W^T||^2`` (W4A16) and with NVFP4 inputs (W4A4, as bench/asymmetric_gptq.py).

    PYTHONPATH=src python3 bench/rescale_after_gptq.py
"""

from __future__ import annotations

import torch
from asymmetric_gptq import LINEARS, dense_linears_inputs

from moequant.formats.activations import fake_quantize_activation_nvfp4
from moequant.formats.fp4 import decode_e2m1
from moequant.formats.nvfp4 import dequantize_nvfp4, global_scale_from_amax, tensor_amax
from moequant.formats.weighted_mse import search_weighted_reference
from moequant.kernels.torch_gptq import gptq_codes

ROWS = 128   # rows per chunk of the normal equations


def refit_scales(w: torch.Tensor, codes: torch.Tensor, gs: torch.Tensor, bs: torch.Tensor,
                 h: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales ``[N, B]`` minimizing each row's ``(w - Q) H (w - Q)^T`` for fixed ``codes``; blocks
    whose codes are all zero, or whose fitted scale is not positive, keep ``bs``."""
    n, k = w.shape
    b = k // 16
    g = float(gs)
    h4 = h.reshape(b, 16, b, 16)
    v = decode_e2m1(codes).to(torch.float64).reshape(n, b, 16)
    hw = (w.double() @ h).reshape(n, b, 16)
    out = bs.to(torch.float64).clone()
    for a in range(0, n, ROWS):
        vc = v[a:a + ROWS]
        lhs = g * g * torch.einsum("nbi,bicj,ncj->nbc", vc, h4, vc)
        rhs = g * (vc * hw[a:a + ROWS]).sum(-1)
        dead = (vc == 0).all(-1)
        lhs = lhs + torch.diag_embed(dead.double())                                   # dead blocks: s = old
        rhs = torch.where(dead, out[a:a + ROWS], rhs)
        lhs = lhs + 1e-12 * lhs.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(b, dtype=lhs.dtype)
        s = torch.linalg.solve(lhs, rhs.unsqueeze(-1)).squeeze(-1)
        out[a:a + ROWS] = torch.where((s > 0) & ~dead, s, out[a:a + ROWS])
    return out.clamp(max=448.0).to(torch.float8_e4m3fn)


@torch.no_grad()
def main() -> None:
    model, calib, held = dense_linears_inputs()
    print("| linear | inputs | GPTQ act order | + refit scales | + GPTQ again | changed scales |")
    print("|---|---|---|---|---|---|")
    for name in LINEARS:
        w = model.get_submodule(name).weight.detach().float()
        x, xh = calib[name], held[name]
        h = x.T @ x / x.shape[0]
        gs = global_scale_from_amax(tensor_amax(w, 0))
        bs = search_weighted_reference(w, gs, h.diagonal().float())
        s_in = (x.abs().max() / 2688).float()
        xhq = fake_quantize_activation_nvfp4(xh.float(), s_in).double()
        ref = xh @ w.double().T

        def codes_at(scales):
            return gptq_codes(w, gs, scales, h, torch.tensor(True), act_order=True)[0]

        first = codes_at(bs)
        refit = refit_scales(w, first, gs, bs, h)
        again = codes_at(refit)
        shipped = [dequantize_nvfp4(first, gs, bs), dequantize_nvfp4(first, gs, refit), dequantize_nvfp4(again, gs, refit)]
        changed = float((refit.to(torch.float32) != bs.to(torch.float32)).double().mean())
        for label, xin in (("W4A16", xh), ("W4A4", xhq)):
            errs = [float(((ref - xin @ q.double().T) ** 2).sum() / (ref ** 2).sum()) for q in shipped]
            print(f"| {name} | {label} | " + " | ".join(f"{e:.5f}" for e in errs) + f" | {changed:.1%} |", flush=True)


if __name__ == "__main__":
    main()
