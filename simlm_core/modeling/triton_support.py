"""Where our Triton kernels can run: Triton is optional, imported on first use only.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, which the tests use: CI has no GPU).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch

__all__ = ["interpreting", "relative_error", "triton_available", "triton_modules", "verified_once"]


def triton_modules() -> tuple[Any, Any] | None:
    """``(triton, triton.language)``, or ``None`` where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device) -> bool:
    """Whether a Triton kernel can run on ``device``'s tensors (CUDA with Triton, or the interpreter)."""
    if triton_modules() is None:
        return False
    return device.type == "cuda" or interpreting()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference from ``want``, relative to ``want``'s largest magnitude (for self-checks)."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max())


_VERIFIED: dict[tuple[str, str], bool] = {}


def verified_once(kernel: str, device: torch.device, check: Callable[[torch.device], float],
                  tolerance: float, fallback: str) -> bool:
    """Whether ``kernel`` may run on ``device``'s type: ``check(device)`` -- its largest relative
    error against torch on a small problem -- is run on first asking and must stay under
    ``tolerance``. A kernel that fails to build or run, or computes wrongly, is reported once
    (naming ``fallback``, what runs instead) and answered False from then on."""
    key = (kernel, device.type)
    if key not in _VERIFIED:
        if torch.compiler.is_compiling():  # no check inside a trace: callers run it before compiling
            return False
        try:
            error = check(device)
            _VERIFIED[key] = error < tolerance
            reason = f"its results differ from torch's by {error:.3g} (relative)"
        except Exception as exc:  # noqa: BLE001  (any failure to build or run means: do not use it)
            _VERIFIED[key] = False
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if not _VERIFIED[key]:
            warnings.warn(f"{kernel}: the Triton kernel failed its check on {device} ({reason}); {fallback} instead",
                          RuntimeWarning, stacklevel=3)
    return _VERIFIED[key]
