"""``moequant inspect``: what a checkpoint (or an unquantized model directory) holds, on one screen."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from moequant.model_ref import read_config_json
from moequant.verify.decode import Checkpoint, read_header
from moequant.verify.smoothing import SMOOTHING_FILE

LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")


def _scale_stats(ckpt: Checkpoint) -> dict[str, dict[str, list[float]]]:
    """layer -> scale kind -> values (global weight scales and input scales, ModelOpt convention)."""
    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name in ckpt.tensors:
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in ("weight_scale_2", "weight_global_scale", "input_scale", "input_global_scale"):
            continue
        m = LAYER_RE.search(name)
        layer = f"layer {m.group(1)}" if m else "other"
        value = float(ckpt.get(name).float().reshape(-1)[0])
        kind = "weight global" if suffix.startswith("weight") else "input"
        if suffix.endswith("global_scale"):
            value = 1.0 / value if value else float("inf")
        stats[layer][kind + (" (experts)" if EXPERT_RE.search(name) else "")].append(value)
    return stats


def inspect_checkpoint(path: Path) -> list[str]:
    ckpt = Checkpoint(path)
    config = ckpt.json("config.json") or {}
    qc = config.get("quantization_config", {})
    lines = [f"checkpoint {path}", f"  format: {qc.get('quant_method')}  "
             f"algo: {qc.get('quant_algo') or qc.get('format')}  kv: {qc.get('kv_cache_scheme')}"]
    names = list(ckpt.tensors)
    quantized = {n.rsplit(".", 1)[0] for n in names if n.endswith((".weight_scale", ".weight_packed"))}
    experts = {EXPERT_RE.sub(".experts.*.", q) for q in quantized if EXPERT_RE.search(q)}
    per_layer = defaultdict(set)
    for q in quantized:
        m, e = LAYER_RE.search(q), EXPERT_RE.search(q)
        if m and e:
            per_layer[m.group(1)].add(int(e.group(1)))
    lines.append(f"  quantized modules: {len(quantized)} ({len(quantized) - sum(len(v) for v in per_layer.values())}"
                 f" outside experts); expert projections: {len(experts)}")
    if per_layer:
        counts = sorted({len(v) for v in per_layer.values()})
        lines.append(f"  MoE layers: {len(per_layer)}, experts quantized per layer: {counts}")
    excluded = qc.get("ignore") or []
    lines.append(f"  left unquantized: {len(excluded)} ({', '.join(excluded[:4])}{' ...' if len(excluded) > 4 else ''})")
    lines.append("  scales per layer (min .. max):")
    for layer, kinds in sorted(_scale_stats(ckpt).items(), key=lambda kv: (len(kv[0]), kv[0])):
        parts = [f"{k} {min(v):.3g}..{max(v):.3g}" for k, v in sorted(kinds.items())]
        lines.append(f"    {layer}: " + "; ".join(parts))
    report = path / "moequant_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        for cov in data.get("report", {}).get("coverage", []):
            if cov["under_covered"]:
                lines.append(f"  under-covered at calibration, {cov['path']}: " + ", ".join(
                    f"expert {e} ({n} tokens) -> {what}" for e, n, what in cov["under_covered"]))
    smoothing = path / SMOOTHING_FILE
    if smoothing.is_file():
        sites = json.loads(read_header(smoothing).get("__metadata__", {}).get("sites", "[]"))
        kinds = Counter(kind for _, _, kind in sites)
        lines.append(f"  smoothed: {len(sites)} sites ({kinds['norm']} norms, {kinds['down']} down projections); "
                     f"factors in {SMOOTHING_FILE} (verify --reference undoes them)")
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    lines.append(f"  size: {size / 2**20:.1f} MiB")
    return lines


def inspect_model(path: Path, trust_remote_code: bool = False) -> list[str]:
    from moequant.discover import discover
    from moequant.quantize_command import load_model, weights_size

    model = load_model(path, trust_remote_code)
    plan = discover(model)
    experts = plan.expert_targets()
    lines = [f"model {path} ({type(model).__name__}), not quantized",
             f"  quantizable targets: {len(plan.targets)} ({len(experts)} fused-experts tensors, "
             f"{sum(t.shape[0] for t in experts if t.param_name != 'down_proj')} experts in all)",
             f"  groups sharing a global scale: {len(plan.groups)}"]
    lines += [f"    {' + '.join(k.rsplit('.', 2)[-2] for k in g)} ({g[0].rsplit('.', 2)[0]})" for g in plan.groups[:6]]
    lines.append(f"  left unquantized by default: {', '.join(plan.excluded[:6])}{' ...' if len(plan.excluded) > 6 else ''}")
    lines.append(f"  size: {weights_size(path) / 2**20:.1f} MiB")
    return lines


def inspect_path(path: Path, trust_remote_code: bool = False) -> list[str]:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: give a checkpoint or a Hugging Face model directory")
    if "quantization_config" in read_config_json(path):
        return inspect_checkpoint(path)
    return inspect_model(path, trust_remote_code)
