"""The verifier is independent: its own decoder (golden values here) and no imports of the numerics/exporter."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from moequant.verify import decode as verify_decode
from moequant.verify.checks import _e4m3_positive_max
from moequant.verify.decode import (
    decode_fp8,
    decode_nvfp4,
    fp4_codes,
    fp4_decode_bytes,
    fp4_values,
    nvfp4_finite_bound,
)

FORBIDDEN = ("moequant.formats", "moequant.kernels", "moequant.weights", "moequant.export", "moequant.scales",
             "moequant.plan", "moequant.discover", "moequant.models", "moequant.calibrate", "moequant.layers.in_memory")


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
                assert name.startswith(("moequant.verify", "moequant.errors")), f"{path.name} imports {name}"


def test_the_error_base_the_verifier_uses_imports_nothing():
    """verify/ may import ``moequant.errors`` (its errors share the CLI's base class) because that module
    imports nothing of moequant: no numerics or exporter reach the verifier through it."""
    from moequant import errors

    assert [n for n in _imports(Path(errors.__file__)) if n.split(".")[0] == "moequant"] == []


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


def test_byte_table_decodes_like_the_nibbles():
    packed = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    fast, slow = fp4_decode_bytes(packed), fp4_values(fp4_codes(packed))
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))  # -0.0 included
    assert fast.shape == (4, 128)


def test_e4m3_byte_check_matches_the_float_check():
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for value in every:
        x = torch.stack([torch.tensor(1.0).to(torch.float8_e4m3fn), value])
        xf = x.to(torch.float32)
        good = bool((torch.isfinite(xf) & (xf > 0)).all())
        largest = _e4m3_positive_max(x)
        assert (largest is not None) == good
        if good:
            assert float(largest.to(torch.float32)) == float(xf.max())


def test_finite_bound_is_exact_at_the_edge():
    """fl(6 * 448 * g) is the largest decoded magnitude: finite just below the fp32 max, inf just above."""
    top = torch.tensor([448.0]).to(torch.float8_e4m3fn)
    fmax = torch.finfo(torch.float32).max
    g_ok = torch.tensor(fmax / 2688.0, dtype=torch.float32)
    while not bool(torch.isfinite(torch.tensor(2688.0) * g_ok)):
        g_ok = torch.nextafter(g_ok, torch.tensor(0.0))
    g_bad = torch.nextafter(g_ok, torch.tensor(float("inf")))
    for g, finite in ((g_ok, True), (g_bad, False)):
        decoded = decode_nvfp4(torch.full((1, 8), 0x77, dtype=torch.uint8), top, g, "modelopt")
        assert bool(torch.isfinite(decoded).all()) == finite
        assert nvfp4_finite_bound(top, g, "modelopt") == finite
