"""The part of the W4A4 perplexity gap that no weight method can remove (issue 17's targets, docs/quality.md).

The built-in model (dense SmolLM2-135M or its 8-expert upcycle) runs with UNQUANTIZED weights and every quantized
input fake-quantized as an engine does in W4A4 NVFP4 (``formats.activations``: dynamic 16-element block scales
under a static global input scale, here amax / 2688 of the 64 x 512 calibration tokens, as moequant ships it):
each decoder-layer linear's input, and each expert's gate_up and down inputs with its own scale (the experts
through ``fake_quant_model.FakeQuantExperts``; an expert's scale from the tokens routed to it). Perplexity on the
same 32 x 512 held-out windows as ``bench/quality.py``. If a weight method made the weights exact, the W4A4 gap
would fall to this one: its ratio to a recipe's W4A4 gap bounds the cut any weight rounding can reach.

    PYTHONPATH=src python3 bench/activation_gap.py --model dense|moe
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from moequant.calibration_data import calibration_tokens, load_tokenizer
from moequant.demo import builtin_model_dir
from moequant.evaluate import eval_windows
from moequant.fake_quant_model import FakeQuantExperts
from moequant.formats.activations import fake_quantize_activation_nvfp4
from moequant.models.experts import find_experts
from moequant.quantize_command import load_model


def _window_nll(model, ids: torch.Tensor) -> torch.Tensor:
    out = []
    for batch in ids.split(4):
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1), reduction="none")
        out.append(nll.reshape(batch.shape[0], -1).mean(1))
    return torch.cat(out).double()


def _recorder(amax: list, i: int):
    def record(x):
        if x.numel():
            amax[i] = torch.maximum(amax[i], x.detach().abs().max().float())
        return x
    return record


def _quantizers(amax: list) -> list:
    return [lambda x, s=a / 2688: fake_quantize_activation_nvfp4(x, s) for a in amax]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("dense", "moe"), default="dense")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="another model directory (e.g. bench/smoothing.py's output) instead of the built-in one")
    args = parser.parse_args()
    model_dir = args.model_dir or builtin_model_dir(dense=args.model == "dense")
    model = load_model(model_dir).float().eval()
    tokenizer = load_tokenizer(model_dir)
    calib = calibration_tokens(None, tokenizer, samples=64, seq_len=512, seed=0).tokens
    held, _ = eval_windows(tokenizer, windows=args.windows, seq_len=512)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    amax = {n: torch.zeros(()) for n in linears}
    hooks = [m.register_forward_pre_hook(
        lambda _m, a, n=n: amax.__setitem__(n, torch.maximum(amax[n], a[0].abs().max().float())))
        for n, m in linears.items()]
    wrappers = []
    for c in find_experts(model, model.config.hidden_size):
        gate_up, down = [torch.zeros(())] * c.num_experts, [torch.zeros(())] * c.num_experts
        wrapper = FakeQuantExperts(c.module, [_recorder(gate_up, i) for i in range(c.num_experts)],
                                   [_recorder(down, i) for i in range(c.num_experts)])
        model.set_submodule(c.path, wrapper)
        wrappers.append((wrapper, gate_up, down))
    for batch in calib.split(8):
        model(input_ids=batch)
    for h in hooks:
        h.remove()
    for wrapper, _, _ in wrappers:   # the held-out tokens must not reach the recorders
        wrapper.gate_up_fq = wrapper.down_fq = [lambda x: x] * len(wrapper.gate_up_fq)
    original = _window_nll(model, held)
    for wrapper, gate_up, down in wrappers:
        wrapper.gate_up_fq, wrapper.down_fq = _quantizers(gate_up), _quantizers(down)
    for n, m in linears.items():
        m.register_forward_pre_hook(lambda _m, a, s=amax[n] / 2688: (fake_quantize_activation_nvfp4(a[0], s),) + a[1:])
    quantized = _window_nll(model, held)
    ppl_o, ppl_q = math.exp(float(original.mean())), math.exp(float(quantized.mean()))
    print(f"| {args.model} | {args.windows} x 512 | {ppl_o:.2f} | {ppl_q:.2f} | {ppl_q - ppl_o:.2f} |")


if __name__ == "__main__":
    main()
