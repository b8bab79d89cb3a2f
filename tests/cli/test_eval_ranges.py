"""``moequant eval`` reports, per quantized linear and per expert, held-out amax / representable amax of the
shipped input scale, worst first: an expert whose input scale is too small is listed first, with the factor."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moequant.cli import main
from moequant.evaluate import evaluate
from moequant.input_ranges import representable_amax

FAST = ["--samples", "4", "--seq-len", "32", "--device", "cpu", "--quiet"]
SHRINK = 1000.0


def _shrink_input_scale(ckpt, module: str, factor: float) -> None:
    name = f"{module}.input_scale"
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] / factor
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("recipe", ["nvfp4-mse", "fp8"])
def test_an_expert_with_a_shrunk_input_scale_is_listed_first(recipe, model_dir, heldout, tmp_path, capsys):
    src = model_dir("mixtral")
    out = tmp_path / "ckpt"
    assert main(["quantize", str(src), "-o", str(out), "--recipe", recipe, *FAST]) == 0
    kwargs = dict(data=str(heldout), windows=2, seq_len=32)
    before = evaluate(src, out, **kwargs).input_ranges
    experts = [r for r in before if ".experts." in r.name and r.name.endswith(".w2") and r.tokens]
    linears = [r for r in before if r.name.endswith("self_attn.o_proj")]
    assert experts and linears and all(r.tokens == 2 * 32 for r in linears)   # every token reaches a linear
    assert len({r.name for r in before}) == len(before)
    victim = experts[len(experts) // 2]
    scheme = "nvfp4" if recipe.startswith("nvfp4") else "fp8"
    assert victim.representable == pytest.approx(representable_amax(victim.input_scale, scheme))
    shrunk = tmp_path / "shrunk"
    shutil.copytree(out, shrunk)
    _shrink_input_scale(shrunk, victim.name, SHRINK)

    after = evaluate(src, shrunk, **kwargs).input_ranges
    assert after[0].name == victim.name
    assert after[0].tokens == victim.tokens
    assert torch.equal(after[0].amax, victim.amax)   # the layer's inputs are unchanged: only its scale moved
    assert after[0].ratio == pytest.approx(victim.ratio * SHRINK, rel=1e-5)
    assert after[0].ratio > 1 and all(r.ratio < after[0].ratio for r in after[1:] if r.tokens)

    assert main(["eval", str(src), "--quantized", str(shrunk), "--data", str(heldout), "--windows", "2",
                 "--seq-len", "32", "--device", "cpu", "--quiet", "--ranges", "3"]) == 0
    text = capsys.readouterr().out
    listed = re.findall(r"^\s+([\d.e+]+)x\s+(\S+)\s", text, re.M)
    assert len(listed) == 3 and listed[0][1] == victim.name
    assert float(listed[0][0]) == pytest.approx(after[0].ratio, rel=1e-2)
    assert int(re.search(r"(\d+) clipped", text).group(1)) == sum(r.ratio > 1 for r in after if r.tokens) >= 1
