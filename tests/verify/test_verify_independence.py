"""The verifier is independent: its own decoder (golden values here) and no imports of the numerics/exporter."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from moequant.verify import decode as verify_decode
from moequant.verify.decode import decode_fp8, decode_nvfp4, fp4_codes, fp4_values

FORBIDDEN = ("moequant.formats", "moequant.kernels", "moequant.quantize", "moequant.export", "moequant.state",
             "moequant.plan", "moequant.discover", "moequant.models", "moequant.calibrate", "moequant.pipeline")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def test_verify_imports_nothing_from_the_numerics_or_the_exporter():
    files = sorted(Path(verify_decode.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for name in _imports(path):
            assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
            if name.split(".")[0] == "moequant":  # the package root would pull in the numerics too
                assert name.startswith("moequant.verify"), f"{path.name} imports {name}"


def test_nibble_order_low_first():
    packed = torch.tensor([[0x21, 0xF8]], dtype=torch.uint8)  # codes 1, 2, 8, 15
    assert fp4_codes(packed).tolist() == [[1, 2, 8, 15]]
    values = fp4_values(fp4_codes(packed))
    assert values.tolist() == [[0.5, 1.0, -0.0, -6.0]]


def test_every_code_value():
    codes = torch.arange(16, dtype=torch.uint8)
    want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert fp4_values(codes).tolist() == want


def test_block_and_global_scales_apply_per_16_inputs():
    packed = torch.full((2, 16), 0x77, dtype=torch.uint8)  # every element 6.0, 32 inputs per row
    block = torch.tensor([[1.0, 2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    modelopt = decode_nvfp4(packed, block, torch.tensor(0.25), "modelopt")
    assert modelopt[0, :16].unique().tolist() == [1.5] and modelopt[0, 16:].unique().tolist() == [3.0]
    assert modelopt[1, 16:].unique().tolist() == [6.0 * 448.0 * 0.25]
    ct = decode_nvfp4(packed, block, torch.tensor([4.0]), "ct")
    assert torch.equal(ct, modelopt)
    fp8 = torch.tensor([1.5, -448.0]).to(torch.float8_e4m3fn)
    assert decode_fp8(fp8, torch.tensor([2.0])).tolist() == [3.0, -896.0]
