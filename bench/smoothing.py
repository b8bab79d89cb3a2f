"""Channel smoothing before W4A4 NVFP4 (issue 17): does moving activation outliers into the weights cut the gap?

SmoothQuant's per-channel factors ``s_j = amax_x(j)^alpha / amax_w(j)^(1 - alpha)`` (``amax_x``: the channel's
largest |input| over the calibration tokens; ``amax_w``: the largest |weight| of that input column over the
linears that read it), folded exactly into the operation before each quantized input, so the result is an
ordinary model and its checkpoint an ordinary NVFP4 checkpoint (no runtime op, every engine serves it):
  * q/k/v inputs: ``input_layernorm.weight / s``, q/k/v columns ``* s``;
  * gate/up inputs: ``post_attention_layernorm.weight / s``, gate/up columns ``* s``;
  * down inputs (``act(gate) * up``): ``up_proj`` rows ``/ s``, down columns ``* s``;
  * o inputs (the attention output, linear in V): ``v_proj`` rows ``/ s``, o columns ``* s``, one factor per
    KV-head channel (the max of its query heads' statistics), since the query heads of a KV head share V;
  * MoE (Mixtral layout, fused experts): the experts' gate_up inputs share one factor per hidden channel (the
    norm feeds the router too, whose columns get ``* s`` as well, so routing is unchanged); each expert's down
    input has its own factors, folded into that expert's up rows.
``--sites`` picks which of the four kinds of site (``qkv``, ``gate_up``, ``down``, ``o``; all by default) are
smoothed, each with ``--alpha`` or its own (``down=0.3``), to see which carry the gain.
The built-in models (dense SmolLM2-135M, ``--model moe`` its 8-expert upcycle). Writes the smoothed model
(float32, same tokenizer) to ``--out``; then measure it as the unsmoothed one:

    PYTHONPATH=src python3 bench/smoothing.py --alpha 0.5 --out /tmp/smooth05
    PYTHONPATH=src python3 bench/smoothing.py --model moe --sites qkv,gate_up,down=0.3 --out /tmp/smooth_sites
    PYTHONPATH=src python3 bench/activation_gap.py --model-dir /tmp/smooth05         # activations-only gap
    PYTHONPATH=src python3 bench/quality.py --model dense --model-dir /tmp/smooth05 --options best,gptq
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from moequant.calibration_data import calibration_tokens, load_tokenizer
from moequant.demo import builtin_model_dir
from moequant.quantize_command import load_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _channel_max(store: dict, key, x: torch.Tensor) -> None:
    x = x.detach().float()
    if x.numel():
        top = x.abs().reshape(-1, x.shape[-1]).amax(0)
        store[key] = torch.maximum(store[key], top) if key in store else top


@torch.no_grad()
def input_channel_amax(model, calib: torch.Tensor) -> dict:
    """The largest |input| of each input channel over ``calib`` (``[K]``): per decoder-layer linear (by name), per
    MoE block's input (``(block name, "hidden")``) and per expert's down input (``(experts name, e)``)."""
    from moequant.fake_quant_model import FakeQuantExperts
    from moequant.models.experts import find_experts

    amax: dict = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: _channel_max(amax, n, a[0]))
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    wrapped = []
    for c in find_experts(model, model.config.hidden_size):
        block = c.path.rsplit(".", 1)[0]
        handles.append(model.get_submodule(block).register_forward_pre_hook(
            lambda _m, a, b=block: _channel_max(amax, (b, "hidden"), a[0])))
        down = [lambda x, e=e, p=c.path: (_channel_max(amax, (p, e), x), x)[1] for e in range(c.num_experts)]
        model.set_submodule(c.path, FakeQuantExperts(c.module, [lambda x: x] * c.num_experts, down))
        wrapped.append(c)
    try:
        for batch in calib.split(8):
            model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
        for c in wrapped:
            model.set_submodule(c.path, c.module)
    return amax


def factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``amax_x^alpha / amax_w^(1 - alpha)``, 1 for a channel that never saw input."""
    s = x_amax.clamp_min(1e-5).pow(alpha) / w_amax.clamp_min(1e-5).pow(1 - alpha)
    return torch.where(x_amax > 0, s, torch.ones_like(s))


def _column_amax(*linears) -> torch.Tensor:
    return torch.stack([lin.weight.detach().abs().amax(0) for lin in linears]).amax(0)


def _smooth_qkv(config, layer, amax: dict, p: str, alpha: float) -> None:
    attn = layer.self_attn
    s = factors(amax[p + "self_attn.q_proj"], _column_amax(attn.q_proj, attn.k_proj, attn.v_proj), alpha)
    layer.input_layernorm.weight.div_(s)
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        lin.weight.mul_(s)


def _smooth_gate_up(config, layer, amax: dict, p: str, alpha: float) -> None:
    """Dense gate/up, or the MoE's fused experts (gate_up_proj [E, 2I, H]) with the router, which reads the same
    normed input: its columns get ``* s`` too, so its logits (the routing) stay the same."""
    mlp = layer.mlp
    if hasattr(mlp, "experts"):
        gate_up = mlp.experts.gate_up_proj
        s = factors(amax[(p + "mlp", "hidden")], gate_up.detach().abs().amax(1).amax(0), alpha)
        weights = (gate_up, mlp.gate.weight)
    else:
        s = factors(amax[p + "mlp.gate_proj"], _column_amax(mlp.gate_proj, mlp.up_proj), alpha)
        weights = (mlp.gate_proj.weight, mlp.up_proj.weight)
    layer.post_attention_layernorm.weight.div_(s)
    for w in weights:
        w.mul_(s)


def _smooth_down(config, layer, amax: dict, p: str, alpha: float) -> None:
    """Dense down, or each expert's down (down_proj [E, H, I]) with its own factors, folded into its up rows
    (gate_up_proj's second half)."""
    mlp = layer.mlp
    if not hasattr(mlp, "experts"):
        s = factors(amax[p + "mlp.down_proj"], _column_amax(mlp.down_proj), alpha)
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s)
        return
    gate_up, down = mlp.experts.gate_up_proj, mlp.experts.down_proj
    inter = down.shape[-1]
    for e in range(gate_up.shape[0]):
        if (p + "mlp.experts", e) not in amax:
            continue   # no routed calibration token: nothing to smooth with
        s_e = factors(amax[(p + "mlp.experts", e)], down[e].detach().abs().amax(0), alpha)
        gate_up[e, inter:].div_(s_e[:, None])
        down[e].mul_(s_e)


def _smooth_o(config, layer, amax: dict, p: str, alpha: float) -> None:
    """One factor per KV-head channel (the max of its query heads' statistics): the query heads share V."""
    attn, kv = layer.self_attn, config.num_key_value_heads
    group = config.num_attention_heads // kv
    per_kv = lambda t: t.reshape(kv, group, -1).amax(1)   # noqa: E731  [kv, head_dim]
    s_kv = factors(per_kv(amax[p + "self_attn.o_proj"]), per_kv(_column_amax(attn.o_proj)), alpha)
    attn.v_proj.weight.div_(s_kv.reshape(-1)[:, None])
    attn.o_proj.weight.mul_(s_kv.repeat_interleave(group, dim=0).reshape(-1))


# in the order they are folded within a layer: a site's weight statistics are taken after the earlier sites'
# folds (qkv's v columns before o's v rows, the experts' gate_up columns before down's up rows)
SITES = {"qkv": _smooth_qkv, "gate_up": _smooth_gate_up, "down": _smooth_down, "o": _smooth_o}


@torch.no_grad()
def smooth(model, amax: dict, alphas: dict[str, float]) -> None:
    """Smooths, in every decoder layer, the sites named in ``alphas`` (site -> its alpha), in ``SITES`` order."""
    unknown = set(alphas) - set(SITES)
    if unknown:
        raise ValueError(f"unknown smoothing sites {sorted(unknown)}; known: {', '.join(SITES)}")
    for i, layer in enumerate(model.model.layers):
        for site, fold in SITES.items():
            if site in alphas:
                fold(model.config, layer, amax, f"model.layers.{i}.", alphas[site])


def parse_sites(text: str, alpha: float) -> dict[str, float]:
    """``--sites``: ``qkv,down=0.3`` -> ``{"qkv": alpha, "down": 0.3}`` (a site's own alpha after ``=``)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        site, _, own = item.partition("=")
        if site not in SITES:
            raise argparse.ArgumentTypeError(f"unknown site {site!r}; known: {', '.join(SITES)}")
        out[site] = float(own) if own else alpha
    if not out:
        raise argparse.ArgumentTypeError("--sites names no site")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--sites", default=",".join(SITES),
                        help="comma list of the sites to smooth, each optionally with its own alpha: "
                             "qkv,gate_up,down,o (the default), gate_up,down=0.3, ...")
    parser.add_argument("--model", choices=("dense", "moe"), default="dense")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        alphas = parse_sites(args.sites, args.alpha)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    model_dir = builtin_model_dir(dense=args.model == "dense")
    model = load_model(model_dir).float().eval()
    tokenizer = load_tokenizer(model_dir)
    calib = calibration_tokens(None, tokenizer, samples=args.samples, seq_len=512, seed=0).tokens
    amax = input_channel_amax(model, calib)
    held = calib[:2]
    with torch.no_grad():
        before = model(input_ids=held).logits
        smooth(model, amax, alphas)
        after = model(input_ids=held).logits
    print(f"alpha {args.alpha}, sites {','.join(f'{k}={v:g}' for k, v in alphas.items())}: smoothed model's "
          f"logits vs the original's, max |diff| {float((after - before).abs().max()):.2e} (float32 rounding only)")
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, args.out / name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
