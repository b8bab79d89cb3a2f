"""Fast twins of ``moequant.formats`` with the same signatures and bit-identical results.

This module is the only place that imports triton and picks a backend:
  backend="auto"   -> triton when the tensor is on a CUDA device and triton imports, else the vectorized
                      torch path (on any device);
  backend="torch"  -> the vectorized torch path;
  backend="triton" -> the Triton kernel; raises if the tensor is not on CUDA or triton is missing.
Nothing falls back silently: the backend actually used is returned so it can be recorded in exports.
"""

from __future__ import annotations

import torch

from moequant.errors import MoequantError

BACKENDS = ("auto", "torch", "triton")


class BackendUnavailable(MoequantError, RuntimeError):
    """The requested backend cannot run here (no CUDA device, or triton not installed)."""


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("torch" or "triton") for ``backend`` on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    if backend == "triton":
        if not on_cuda:
            raise BackendUnavailable(f"backend='triton' needs a CUDA tensor, got one on {device}")
        if not _triton_available():
            raise BackendUnavailable("backend='triton' requested but triton is not installed")
        return "triton"
    return "triton" if on_cuda and _triton_available() else "torch"


def search_block_scales(
    w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse", backend: str = "auto"
) -> tuple[torch.Tensor, str]:
    """Block scales of ``w [..., N, K]`` (float8_e4m3fn ``[..., N, K/16]``) and the backend used.

    Same contract as ``moequant.formats.mse.search_block_scales_reference``.
    """
    used = resolve_backend(backend, w.device)
    if used == "triton":
        from moequant.kernels import triton_mse

        return triton_mse.search_block_scales(w, global_scale, method), used
    from moequant.kernels import torch_mse

    return torch_mse.search_block_scales(w, global_scale, method), used


def search_block_scales_with_errors(
    w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse", backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``search_block_scales`` plus the per-block squared errors of the chosen scales (bit-identical to
    ``weight_squared_error``): both backends take them from the search pass itself."""
    used = resolve_backend(backend, w.device)
    if used == "triton":
        from moequant.kernels import triton_mse

        scales, _, errors = triton_mse.search_block_scales(w, global_scale, method, return_errors=True)
        return scales, errors, used
    from moequant.kernels import torch_mse

    scales, errors = torch_mse.search_block_scales_with_errors(w, global_scale, method)
    return scales, errors, used


def search_with_max_errors(
    w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse", backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``search_block_scales_with_errors`` plus the per-block errors of the "max" method's scales under the same
    global scale (bit-identical to a second search with "max"). Triton: one launch; torch: one pass."""
    used = resolve_backend(backend, w.device)
    if used == "triton":
        from moequant.kernels import triton_mse

        return (*triton_mse.search_with_max_errors(w, global_scale, method), used)
    from moequant.kernels import torch_mse

    return (*torch_mse.search_with_max_errors(w, global_scale, method), used)


def search_scales_and_codes(
    w: torch.Tensor, global_scale: torch.Tensor, method: str = "mse", backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``search_with_max_errors`` and the packed codes of the chosen scales (``pack_nvfp4``'s, bit-identical):
    ``(scales, errors, max_errors, codes, backend used)``. Triton writes the codes in the search's own launch
    (the weight is read once); the torch twin packs them after its search."""
    used = resolve_backend(backend, w.device)
    if used == "triton":
        from moequant.kernels import triton_mse

        scales, errors, max_errors, codes = triton_mse.search_with_max_errors(w, global_scale, method, True)
        return scales, errors, max_errors, codes, used
    from moequant.kernels import torch_mse

    scales, errors, max_errors = torch_mse.search_with_max_errors(w, global_scale, method)
    return scales, errors, max_errors, pack_nvfp4(w, global_scale, scales), used


def compile_ahead(device: torch.device, dtype: torch.dtype, method: str, backend: str = "auto") -> bool:
    """Start compiling the kernel ``search_scales_and_codes`` will use for ``dtype`` weights on ``device``, on a
    side thread, when that backend is Triton (a fresh process otherwise pays the compile at the first weight
    search). Returns whether a compile was started. The first search on that device waits for it."""
    if method not in ("mse", "max") or resolve_backend(backend, torch.device(device)) != "triton":
        return False
    from moequant.kernels import triton_mse

    triton_mse.compile_in_background(device, dtype, method)
    return True


def weight_squared_error(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """Per-block squared error ``[..., N, K/16]``, bit-identical to ``formats.nvfp4.weight_squared_error``
    (vectorized torch on any device)."""
    from moequant.kernels import torch_mse

    return torch_mse.weight_squared_error(w, global_scale, block_scale)


def pack_nvfp4(w: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """Packed FP4 codes uint8 ``[..., N, K/2]`` of ``w [..., N, K]`` under its scales, on ``w``'s device,
    bit-identical to ``formats.fp4.pack_fp4(formats.nvfp4.quantize_nvfp4(...))`` (vectorized torch on any
    device; one global scale per leading index, or one for all)."""
    from moequant.kernels import torch_pack

    return torch_pack.quantize_pack_nvfp4(w, global_scale, block_scale)


def search_weighted_block_scales(
    w: torch.Tensor, global_scale: torch.Tensor, h: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, str]:
    """Activation-weighted exact block scales (``formats.weighted_mse``), and the backend used (same backend
    rules as ``search_block_scales``: the Triton kernel on CUDA, the vectorized torch twin elsewhere)."""
    used = resolve_backend(backend, w.device)
    if used == "triton":
        from moequant.kernels import triton_mse

        return triton_mse.search_weighted(w, global_scale, h), used
    from moequant.kernels import torch_weighted

    return torch_weighted.search_weighted(w, global_scale, h), used


def search_weighted_with_errors(
    w: torch.Tensor, global_scale: torch.Tensor, h: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``search_weighted_block_scales`` plus the plain per-block errors (``weight_squared_error``) at those
    scales and at the "max" method's: one launch on Triton, three passes on torch."""
    used = resolve_backend(backend, w.device)
    if used == "triton":
        from moequant.kernels import triton_mse

        return (*triton_mse.search_weighted(w, global_scale, h, return_errors=True), used)
    scales, _ = search_weighted_block_scales(w, global_scale, h, used)
    max_errors = search_block_scales_with_errors(w, global_scale, "max", used)[1]
    return scales, weight_squared_error(w, global_scale, scales), max_errors, used


def block_search(method: str, backend: str = "auto"):
    """A ``formats.global_search.BlockSearch`` for ``method`` on the fast paths, bit-identical to
    ``formats.global_search.reference_block_search(method)``; ``.backends`` collects the backends used. A tiny
    tensor is exponent-normalized once here (``formats.nvfp4``), so that four-over-six compares its errors in
    normalized units, as the reference does."""
    from moequant.formats.nvfp4 import exponent_normalized, restore_errors

    used: set[str] = set()

    def run(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None):
        if method not in ("four_over_six", "weighted_mse", "mse", "max"):
            raise ValueError(f"unknown block-scale method {method!r}")
        w, g, shift = exponent_normalized(w, g)
        scales, errors = _block_search_normalized(method, backend, used, w, g, h)
        return scales, restore_errors(errors, shift)

    run.backends = used
    return run


def _block_search_normalized(method: str, backend: str, used: set[str], w, g, h):
    from moequant.formats import four_over_six as fos
    from moequant.formats.nvfp4 import to_blocks
    from moequant.formats.weighted_mse import weighted_weight_error

    if method == "four_over_six":  # formats.four_over_six's choice, errors from the fast twins
        four = fos.divisor_block_scales(to_blocks(w), g, fos.FOUR)
        if h is None:
            six, err6, b = search_block_scales_with_errors(w, g, "max", backend)
            err4 = weight_squared_error(w, g, four)
        else:  # the plain errors of the search would be thrown away: scales only
            six, b = search_block_scales(w, g, "max", backend)
            err6, err4 = weighted_weight_error(w, g, six, h), weighted_weight_error(w, g, four, h)
        used.add(b)
        better = err4 < err6  # a tie keeps "max"
        bits = torch.where(better, four.view(torch.uint8), six.view(torch.uint8))
        return bits.view(torch.float8_e4m3fn), torch.where(better, err4, err6)
    if method == "weighted_mse":
        scales, b = search_weighted_block_scales(w, g, h, backend)
    else:
        scales, err, b = search_block_scales_with_errors(w, g, method, backend)
        used.add(b)
        if h is None:
            return scales, err
    used.add(b)
    return scales, weighted_weight_error(w, g, scales, h)
