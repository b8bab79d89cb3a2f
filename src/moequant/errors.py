"""The one base class of every error a user (or a stranger's checkpoint) can cause."""

from __future__ import annotations


class MoequantError(Exception):
    """A problem with what the user gave (model, checkpoint, recipe, calibration data, output path, device).

    The message is complete on its own: it names the file, on-disk tensor or path, and the fix. The CLI prints
    it as one line (``moequant: error: ...``, exit code 2; ``--debug`` shows the traceback); a library user can
    catch it with ``except MoequantError``. Each subclass keeps its historical second base (``ValueError``,
    ``RuntimeError``) so that existing ``except ValueError`` handlers still work.

    This module imports nothing, so every part of the package (the independent verifier included) may use it.
    """
