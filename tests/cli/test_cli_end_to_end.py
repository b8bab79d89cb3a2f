"""quantize -> verify -> eval -> inspect through the command line, per family and format."""

import math
import re

import pytest

from moequant.cli import main

FAST = ["--samples", "4", "--seq-len", "32", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe", "llama"])
def test_quantize_verify_eval_inspect(family, fmt, model_dir, heldout, tmp_path, capsys):
    src = model_dir(family)
    out = tmp_path / "ckpt"
    assert main(["quantize", str(src), "-o", str(out), "--format", fmt, "--kv-cache", "fp8", *FAST]) == 0
    assert "verify              OK" in capsys.readouterr().out
    assert (out / "report.html").is_file() and (out / "moequant_report.json").is_file()
    assert main(["verify", str(out), "--reference", str(src)]) == 0
    capsys.readouterr()
    assert main(["eval", str(src), "--quantized", str(out), "--data", str(heldout), "--windows", "2",
                 "--seq-len", "32", "--device", "cpu", "--quiet"]) == 0
    text = capsys.readouterr().out
    ppl_o = float(re.search(r"perplexity, original:\s+([\d.]+)", text).group(1))
    ppl_q = float(re.search(r"perplexity, quantized:\s+([\d.]+)", text).group(1))
    kl = float(re.search(r"KL\(original \|\| quantized\): ([\d.e-]+)", text).group(1))
    assert math.isfinite(ppl_o) and math.isfinite(ppl_q)
    assert 0 < kl < 0.5, kl  # quantized: different, but close
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "quantized modules" in shown and "scales per layer" in shown


def test_recipes_lists_builtins(capsys):
    assert main(["recipes"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    for want in ("nvfp4", "nvfp4-mse", "nvfp4-experts-only", "nvfp4-experts-only-mse", "nvfp4-w4a16", "fp8"):
        assert want in names


def test_inspect_unquantized_model_dir(model_dir, capsys):
    assert main(["inspect", str(model_dir("mixtral"))]) == 0
    out = capsys.readouterr().out
    assert "not quantized" in out and "16 experts in all" in out


@pytest.mark.parametrize("family,fmt", [("mixtral", "modelopt"), ("deepseek_v3", "compressed-tensors")])
def test_quantize_with_smoothing_verifies_against_the_source(family, fmt, model_dir, heldout, tmp_path, capsys):
    """--smoothing: the streamed job folds the factors into each layer; the checkpoint ships the smoothed norms and
    routers with moequant_smoothing/factors.safetensors, and verify --reference undoes them (Mixtral: its router
    is renamed on disk, DeepSeek-V3: MLA's own norms)."""
    src, out = model_dir(family), tmp_path / "ckpt"
    assert main(["quantize", str(src), "-o", str(out), "--recipe", "nvfp4-best", "--smoothing", "0.5", "--format", fmt,
                 *FAST]) == 0
    printed = capsys.readouterr().out
    assert "verify              OK" in printed and "note                smoothing (alpha 0.5):" in printed
    assert (out / "moequant_smoothing" / "factors.safetensors").is_file()
    assert main(["verify", str(out), "--reference", str(src), "--json"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert re.search(r"smoothed: \d+ sites \(\d+ norms, \d+ down projections\)", capsys.readouterr().out)
    assert main(["eval", str(src), "--quantized", str(out), "--data", str(heldout), "--windows", "2",
                 "--seq-len", "32", "--device", "cpu", "--quiet"]) == 0
    kl = float(re.search(r"KL\(original \|\| quantized\): ([\d.e-]+)", capsys.readouterr().out).group(1))
    assert 0 < kl < 0.5, kl
    assert main(["quantize", str(src), "-o", str(tmp_path / "w4a16"), "--recipe", "nvfp4-w4a16", "--smoothing",
                 "0.5", *FAST]) == 2
    assert "weight-only" in capsys.readouterr().err
