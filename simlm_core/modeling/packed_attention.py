"""Attention over packed short texts, one Triton program per text (and group of heads).

Why a kernel of our own: corpus passages are short (MS MARCO: ~70 tokens), and variable-length
flash attention spends most of its time there starting tiles that hold little work: on an H200
it ran at ~50 TFLOP/s and took 17% of packed encoding's time for 1.5% of its FLOPs. This kernel
runs the same attention at 96 TFLOP/s (1.9x): each program takes one text and loops over a
group of heads, its query rows in chunks of ``BLOCK_M`` and its keys in blocks of ``BLOCK_N``
(online softmax, as in flash attention), so small tiles keep many programs resident per SM and
nothing runs past a text's end.

Inference only (no dropout, no backward). ``q`` ``[Tq, heads, d]``, ``k``/``v`` ``[Tk, heads, d]``
(any token and head strides, unit stride over ``d``), ``cu_q``/``cu_k`` int32 ``[N+1]`` offsets
of each text's queries and keys; text ``i``'s queries attend to its keys only, unmasked.

Triton is optional: :func:`triton_attention_available` says whether this can run (CUDA, Triton
importable); with ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (for tests).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from simlm_core.modeling.triton_support import triton_available, triton_modules

__all__ = ["packed_attention", "triton_attention_available", "DEFAULT_BLOCKS"]

# (BLOCK_M, BLOCK_N, heads per program, num_warps). On an H200, one layer over 65,536 MS MARCO-like
# passages (sorted, batches of 1,024): 11.1 ms, against 12.8 for (64, 64, 1, 4), 21.7 for
# (32, 32, 1, 4) and 21.2 for varlen flash attention (benchmarks/attention_kernels.py).
DEFAULT_BLOCKS: tuple[int, int, int, int] = (64, 32, 1, 4)


def triton_attention_available(device: torch.device) -> bool:
    """Whether :func:`packed_attention` can run on ``device`` (CUDA with Triton, or the interpreter)."""
    return triton_available(device)


def _kernel() -> Any:
    """The jitted kernel (:mod:`simlm_core.modeling._attention_kernels`), imported on first use so that
    importing this module needs no Triton."""
    if triton_modules() is None:
        raise RuntimeError("packed attention needs Triton (pip install triton; CUDA)")
    from simlm_core.modeling import _attention_kernels

    return _attention_kernels.packed_attention_fwd


def check_packed_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                     cu_k: torch.Tensor) -> None:
    """Refuse q/k/v and text offsets our attention kernels cannot take, before any kernel runs."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    heads, d = q.shape[1], q.shape[2]
    if k.shape[1:] != (heads, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be [tokens, {heads}, {d}] like q; got {tuple(k.shape)}, {tuple(v.shape)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    if cu_q.numel() != cu_k.numel() or cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32:
        raise ValueError("cu_q and cu_k must be int32 offsets of the same number of texts")
    for x in (q, k, v):
        if x.stride(2) != 1:
            raise ValueError("q, k, v need unit stride over the head dim")


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                     cu_k: torch.Tensor, blocks: tuple[int, int, int, int] = DEFAULT_BLOCKS) -> torch.Tensor:
    """Softmax attention of each text's queries over its keys; returns ``[Tq, heads, d]`` like ``q``.

    ``blocks``: ``(BLOCK_M, BLOCK_N, heads per program, num_warps)``. A custom op, so that
    ``torch.compile`` calls it as one opaque kernel inside a compiled encoder.
    """
    check_packed_qkv(q, k, v, cu_q, cu_k)
    if q.shape[1] % blocks[2]:
        raise ValueError(f"{q.shape[1]} heads do not split into groups of {blocks[2]}")
    wide = max(x.shape[0] * x.stride(0) for x in (q, k, v)) >= 2**31 or q.numel() >= 2**31
    return _packed_attention_op(q, k, v, cu_q, cu_k, *blocks, wide)


@torch.library.custom_op("simlm::packed_attention", mutates_args=())
def _packed_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                         cu_k: torch.Tensor, block_m: int, block_n: int, heads_per_program: int,
                         num_warps: int, wide: bool = False) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n = cu_q.numel() - 1
    if n == 0 or q.shape[0] == 0:
        return out
    heads, d = q.shape[1], q.shape[2]
    grid = (n, heads // heads_per_program)
    _kernel()[grid](q, k, v, out, cu_q, cu_k, (1.0 / math.sqrt(d)) * 1.4426950408889634,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    out.stride(0), out.stride(1),
                    HEADS=heads_per_program, D=d, BLOCK_M=block_m, BLOCK_N=block_n, WIDE=wide,
                    num_warps=num_warps)
    return out


@_packed_attention_op.register_fake
def _(q, k, v, cu_q, cu_k, block_m, block_n, heads_per_program, num_warps, wide=False):
    return q.new_empty(q.shape)
