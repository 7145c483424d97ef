"""Where our Triton kernels can run: Triton is optional, imported on first use only.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, which the tests use: CI has no GPU).
"""
from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["interpreting", "triton_available", "triton_modules"]


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
