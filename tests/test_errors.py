"""Every error class of the package derives from MoequantError, the one base the CLI prints as one line."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import moequant
from moequant.cli import main
from moequant.errors import MoequantError

# control flow inside one function call, never raised to a caller: not an error a user can cause
INTERNAL = {"moequant.layers.inputs._StopForward"}
# a subclass must keep the base it had before MoequantError existed, so that old ``except`` clauses still work
COMPAT_BASES = {
    "CalibrationError": RuntimeError, "CalibrationDataError": ValueError, "DemoUnavailable": RuntimeError,
    "ExportError": ValueError, "WeightError": ValueError, "BackendUnavailable": RuntimeError,
    "KVObservationError": RuntimeError, "UnsupportedModelError": ValueError, "RecipeError": ValueError,
    "ModelDirError": ValueError, "ShardError": ValueError, "CheckpointError": ValueError,
}


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(moequant.__path__, "moequant."))


def _no_error_class_in_source(name: str) -> None:
    tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
    bases = [ast.unparse(b) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for b in c.bases]
    assert not [b for b in bases if b.endswith(("Error", "Exception"))], f"{name}: check its errors by hand"


def _exception_classes() -> dict[str, type]:
    """Every exception class defined in a moequant module; modules that cannot be imported here (they need
    triton, or run a command when imported: ``__main__``) are read from the source instead."""
    found = {}
    for name in _modules():
        if name.endswith(".__main__"):
            _no_error_class_in_source(name)
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            assert err.name == "triton", f"{name}: {err}"
            _no_error_class_in_source(name)
            continue
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name:
                found[f"{name}.{cls_name}"] = cls
    return found


def test_every_error_class_derives_from_moequant_error():
    classes = _exception_classes()
    assert len(classes) >= len(COMPAT_BASES) + 1   # the walk found the package's errors (and JournalMismatch)
    outside = sorted(q for q, cls in classes.items() if q not in INTERNAL and not issubclass(cls, MoequantError))
    assert outside == []


def test_each_error_keeps_its_historical_base():
    by_name = {q.rsplit(".", 1)[1]: cls for q, cls in _exception_classes().items()}
    for name, base in COMPAT_BASES.items():
        assert issubclass(by_name[name], base), name


def test_a_library_user_catches_every_error_with_the_base(tmp_path):
    from moequant.recipe import load_recipe
    from moequant.verify.decode import Checkpoint

    with pytest.raises(MoequantError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(MoequantError):
        Checkpoint(tmp_path)


def test_the_cli_prints_an_operating_system_error_as_one_line(tmp_path, capfd, monkeypatch):
    """An OSError a user causes (here: an unreadable recipe file) is one line, not a traceback."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("description: x\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    capfd.readouterr()
    code = main(["quantize", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--recipe", str(recipe)])
    err = capfd.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"moequant: error: [Errno 13] Permission denied: '{recipe}'"]
