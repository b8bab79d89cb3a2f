"""``ExportError``: its own module so that the writer and the output-directory helpers share it without a cycle."""

from moequant.errors import MoequantError


class ExportError(MoequantError, ValueError):
    """The checkpoint cannot be written as asked; the message names the file or tensor and the fix."""
