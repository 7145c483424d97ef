"""Attention with dropout, forward and backward, over packed short texts: padding-free training.

Why a kernel of our own: in the compiled BERT-base biencoder step on an H200 (profile in
benchmarks/results/model_throughput-cuda-h200-biencoder-profile.log) attention took 12.8 of 62.7
ms -- 20% of the time for 3.5% of the FLOPs, ~53 TFLOP/s. cuDNN (the fastest of torch's SDPA
kernels there) tiles 144-token texts in 128-row blocks and draws a Philox number per score for
dropout. This kernel, like :mod:`simlm_core.modeling.packed_attention` (inference), runs one
program per (text, head) over packed rows, looping only to the text's end, and draws dropout
bits 16 per score (one Philox block per 8 scores; the backward pass draws the same bits again
from the seed instead of storing a mask).

``q`` ``[Tq, heads, d]``, ``k``/``v`` ``[Tk, heads, d]`` (any token/head strides, unit stride over
``d``), ``cu_q``/``cu_k`` int32 ``[N+1]``, spanning q's and k's rows as a packed batch's do: text
``i``'s queries attend to its keys only. Queries
may be every token (``cu_q == cu_k``) or one per text (its [CLS]; ``cu_q = arange(N + 1)``).

For ordinary (padded) batches, :func:`use_triton_attention` registers the kernel with transformers'
attention interface as ``"simlm_triton"`` and switches a BERT/ELECTRA to it: each row of a
right-padded batch is a text whose keys end at its mask's length (no host-device sync: the
lengths stay on the device). Packed trainable encoders of a switched model use it too.

Dropout drops a probability when its 16 bits are ``< round(p * 65536)`` and scales the rest by
``65536 / (65536 - round(p * 65536))``, as :mod:`simlm_core.modeling.fused_norm` does; the
softmax normaliser counts every score (dropout applies after the softmax, as in BERT).
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F

from simlm_core.modeling.fused_norm import dropout_threshold
from simlm_core.modeling.packed_attention import check_packed_qkv
from simlm_core.modeling.triton_support import relative_error, triton_available, triton_modules, verified_once

__all__ = ["HF_ATTENTION", "attention_keep_mask", "hf_attention", "packed_attention_train", "training_kernel_verified",
           "use_triton_attention", "TRAIN_BLOCKS", "TRAIN_BACKWARD_BLOCKS"]

# (BLOCK_M, BLOCK_N, num_warps) of the forward and the backward kernel. Not yet timed on a GPU
# (benchmarks/attention_kernels.py --parts train); chosen from their sm_90 builds
# (benchmarks/triton_compile.py): no register spills, and 3 programs per SM each. The backward at
# 64 x 32 needs 255 registers (2 programs per SM), at 64 x 64 it spills.
TRAIN_BLOCKS: tuple[int, int, int] = (64, 32, 4)
TRAIN_BACKWARD_BLOCKS: tuple[int, int, int] = (32, 32, 4)
_LOG2E = 1.4426950408889634


def _kernels() -> Any:
    if triton_modules() is None:
        raise RuntimeError("packed training attention needs Triton (pip install triton; CUDA)")
    from simlm_core.modeling import _attention_kernels

    return _attention_kernels


def kernel_head_dim(d: int) -> bool:
    """Whether the kernels take heads of size ``d`` (a power of two, at least 16)."""
    return d >= 16 and not d & (d - 1)


def _check_blocks(*blocks: tuple[int, int, int]) -> None:
    for block_m, block_n, _ in blocks:
        if block_m < 16 or block_n < 16 or block_n & (block_n - 1) or block_m & (block_m - 1):
            raise ValueError(f"blocks must be powers of two >= 16, got {(block_m, block_n)}")


@torch.library.custom_op("simlm::packed_attention_train", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                   k_starts: torch.Tensor, k_lens: torch.Tensor, seed: torch.Tensor, p: float, scale: float,
                   block_m: int, block_n: int, num_warps: int,
                   bwd_block_m: int, bwd_block_n: int, bwd_num_warps: int,
                   keys_covered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    n, heads, d = q_starts.numel(), q.shape[1], q.shape[2]
    if n and q.shape[0]:
        threshold, drop_scale = dropout_threshold(p)
        _kernels().attention_train_fwd[(n, heads)](
            q, k, v, out, lse, q_starts, q_lens, k_starts, k_lens, seed, scale * _LOG2E, threshold, drop_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, DROPOUT=threshold > 0, num_warps=num_warps)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, q_starts, q_lens, k_starts, k_lens, seed, p, scale, block_m, block_n, num_warps,
      bwd_block_m, bwd_block_n, bwd_num_warps, keys_covered=False):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("simlm::packed_attention_train_backward", mutates_args=())
def _attention_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor, k_starts: torch.Tensor,
                   k_lens: torch.Tensor, seed: torch.Tensor, p: float, scale: float,
                   block_m: int, block_n: int, num_warps: int,
                   keys_covered: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    delta = (grad.float() * out.float()).sum(-1)  # rowsum(dO * O) = sum_j P_ij dP_ij, per query row and head
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    # The kernel writes every key row of every text; only where texts leave rows out (a padded
    # batch's padding) must the rest be zeros.
    fill = torch.empty if keys_covered else torch.zeros
    dk = fill(k.shape, dtype=k.dtype, device=k.device)
    dv = fill(v.shape, dtype=v.dtype, device=v.device)
    n, heads, d = q_starts.numel(), q.shape[1], q.shape[2]
    if n and q.shape[0]:
        threshold, drop_scale = dropout_threshold(p)
        _kernels().attention_train_bwd[(n, heads)](
            q, k, v, grad, lse, delta, dq, dk, dv, q_starts, q_lens, k_starts, k_lens, seed, scale * _LOG2E,
            scale, threshold, drop_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            grad.stride(0), grad.stride(1), lse.stride(0), dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, DROPOUT=threshold > 0, num_warps=num_warps)
    return dq.to(q.dtype), dk, dv


@_attention_bwd.register_fake
def _(grad, q, k, v, out, lse, q_starts, q_lens, k_starts, k_lens, seed, p, scale, block_m, block_n, num_warps,
      keys_covered=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, q_starts, q_lens, k_starts, k_lens, seed, p, scale = inputs[:10]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_starts, q_lens, k_starts, k_lens, seed)
    ctx.settings = (p, scale, *inputs[13:17])  # the backward tiles, keys_covered


def _backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse, q_starts, q_lens, k_starts, k_lens, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, q_starts, q_lens, k_starts, k_lens, seed, *ctx.settings)
    return dq, dk, dv, *([None] * 14)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def packed_attention_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                           cu_k: torch.Tensor, dropout_p: float = 0.0,
                           blocks: tuple[int, int, int] = TRAIN_BLOCKS,
                           backward_blocks: tuple[int, int, int] = TRAIN_BACKWARD_BLOCKS) -> torch.Tensor:
    """Softmax attention of each text's queries over its keys, with dropout ``dropout_p`` on the
    probabilities; differentiable in ``q``, ``k``, ``v``. Returns ``[Tq, heads, d]`` like ``q``.
    ``blocks`` / ``backward_blocks``: the forward / backward kernel's ``(BLOCK_M, BLOCK_N, num_warps)``
    (the dropout mask does not depend on them)."""
    if not triton_available(q.device):
        raise RuntimeError(f"packed training attention runs on CUDA with Triton (or TRITON_INTERPRET=1), not {q.device}")
    check_packed_qkv(q, k, v, cu_q, cu_k)
    _check_blocks(tuple(blocks), tuple(backward_blocks))
    return _run(q, k, v, cu_q[:-1], cu_q[1:] - cu_q[:-1], cu_k[:-1], cu_k[1:] - cu_k[:-1], dropout_p,
                1.0 / math.sqrt(q.shape[-1]), blocks, backward_blocks, keys_covered=True)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
         k_starts: torch.Tensor, k_lens: torch.Tensor, dropout_p: float, scale: float,
         blocks: tuple[int, int, int], backward_blocks: tuple[int, int, int], keys_covered: bool = False
         ) -> torch.Tensor:
    """``keys_covered``: the texts' keys tile K and V's rows (packed texts), so the backward pass
    writes every row of dK and dV and need not zero them first."""
    dropout_threshold(dropout_p)  # refuse a bad p before any kernel runs
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    out, _ = _attention_fwd(q, k, v, q_starts, q_lens, k_starts, k_lens, seed, float(dropout_p), float(scale),
                            *blocks, *backward_blocks, keys_covered)
    return out


def attention_keep_mask(seed: torch.Tensor, rows: int, cols: int, text: int, head: int, p: float) -> torch.Tensor:
    """The keep-mask (bool ``[rows, cols]``) the kernels draw for one text and head (tests, debugging)."""
    threshold, _ = dropout_threshold(p)
    out = torch.zeros(rows, cols, dtype=torch.int8, device=seed.device)
    bm, bn = 16, 16
    _kernels().attention_keep_mask_kernel[(-(-rows // bm), -(-cols // bn))](
        seed, out, threshold, rows, cols, text, head, BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


def training_kernel_verified(device: torch.device) -> bool:
    """Whether the kernel can train on ``device``'s type: Triton runs there and, on first asking, a
    small bf16 problem's output and gradients, with and without dropout, match attention in fp32.
    A failure -- a Triton version that cannot build it, a wrong result -- is warned about once and
    answered False, so training keeps SDPA instead of failing or training wrongly."""
    if not triton_available(device):
        return False
    return verified_once("training attention", device, _self_check, 0.05, "attention runs SDPA")


def _self_check(device: torch.device) -> float:
    """Largest error of output and q/k/v gradients against per-text softmax attention in fp32 (on
    the kernel's own dropout mask), relative to their scale; without dropout and with 0.1, so
    both builds of each kernel are made and run."""
    # Drawn on the CPU (named: a caller may have set CUDA as the default device) and then moved.
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = [1, 19, 70, 33]
    heads, d = 2, 64
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    starts, lens = cu[:-1], cu[1:] - cu[:-1]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    qkv = torch.randn(sum(lengths), 3, heads, d, generator=gen, device="cpu").to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(sum(lengths), heads, d, generator=gen, device="cpu").to(device=device, dtype=dtype)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    worst = 0.0
    for p in (0.0, 0.1):
        _, drop_scale = dropout_threshold(p)
        with torch.enable_grad():
            out, _ = _attention_fwd(*qkv.unbind(1), starts, lens, starts, lens, seed, p, d ** -0.5,
                                    *TRAIN_BLOCKS, *TRAIN_BACKWARD_BLOCKS)
            got = torch.autograd.grad(out, qkv, grad)[0]
            ref_in = qkv.detach().float().requires_grad_()
            parts = []
            for i, n in enumerate(lengths):
                q, k, v = (x[cu[i]:cu[i + 1]].transpose(0, 1) for x in ref_in.unbind(1))
                probs = torch.softmax(q @ k.transpose(1, 2) * d ** -0.5, -1)
                if p:
                    keep = torch.stack([attention_keep_mask(seed, n, n, i, h, p) for h in range(heads)])
                    probs = torch.where(keep, probs * drop_scale, 0.0)
                parts.append((probs @ v).transpose(0, 1))
            ref = torch.cat(parts)
            want = torch.autograd.grad(ref, ref_in, grad.float())[0]
        worst = max(worst, relative_error(out, ref), relative_error(got, want))
    return worst


HF_ATTENTION = "simlm_triton"
"""The name of this kernel in transformers' attention interface (``config._attn_implementation``)."""


def _key_lengths(mask: torch.Tensor | None, batch: int, keys: int, device: torch.device) -> torch.Tensor:
    """Each row's real key count from the mask transformers hands the attention function: None (no
    padding), a 2D ``[B, L]`` 0/1 mask, or a 4D ``[B, 1, Lq | 1, L]`` boolean or additive one."""
    if mask is None:
        return torch.full((batch,), keys, dtype=torch.int32, device=device)
    if mask.dim() == 4:
        mask = mask[:, 0, 0, :]
        mask = mask if mask.dtype == torch.bool else mask == 0  # additive: 0 where attended
    if mask.dim() != 2 or mask.shape != (batch, keys):
        raise ValueError(f"expected a [{batch}, {keys}] padding mask, got {tuple(mask.shape)}")
    return mask.sum(-1, dtype=torch.int32)


def hf_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``[B, H, L, D]`` q/k/v of a right-padded batch ->
    ``([B, L, H, D], None)``. Rows past a text's length (padding) attend like SDPA's with a key mask.
    fp32 q/k/v on CUDA, and head sizes that are not a power of two >= 16, go to SDPA."""
    batch, heads, q_len, d = query.shape
    k_len = key.shape[2]
    if (query.device.type == "cuda" and query.dtype == torch.float32) or not kernel_head_dim(d):
        # fp32 training (no autocast): SDPA in fp32, not our kernel's TF32 tensor-core products;
        # and head sizes the kernel's tiles cannot take
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask.bool()[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)

    def rows(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, D] view of a [B, L, H, D] projection -> [B*L, H, D]
        return x.transpose(1, 2).reshape(batch * x.shape[2], heads, d)

    index = torch.arange(batch, dtype=torch.int32, device=query.device)
    out = _run(rows(query), rows(key), rows(value), index * q_len,
               torch.full((batch,), q_len, dtype=torch.int32, device=query.device), index * k_len,
               _key_lengths(attention_mask, batch, k_len, query.device), dropout,
               scaling if scaling is not None else d ** -0.5, TRAIN_BLOCKS, TRAIN_BACKWARD_BLOCKS)
    return out.view(batch, q_len, heads, d), None


def _hf_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function: Any = None, attention_mask: torch.Tensor | None = None,
                     **kwargs: Any) -> torch.Tensor | None:
    """The mask transformers builds for :func:`hf_attention`: the 2D padding mask as given (not
    checked for padding, which would read it back from the device)."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def use_triton_attention(model: torch.nn.Module) -> int:
    """Switch every BERT/ELECTRA encoder in ``model`` to this kernel (``config._attn_implementation =
    "simlm_triton"``, registered with transformers on first use; decoders and cross-attention keep
    theirs); returns how many configs changed.
    Not saved with the model: transformers does not serialise the attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(HF_ATTENTION, hf_attention)
    AttentionMaskInterface.register(HF_ATTENTION, _hf_padding_mask)
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) in ("bert", "electra") and id(config) not in seen \
                and hasattr(config, "_attn_implementation") and not getattr(config, "is_decoder", False) \
                and not getattr(config, "add_cross_attention", False):  # bidirectional self-attention only
            seen.add(id(config))
            config._attn_implementation = HF_ATTENTION
    return len(seen)
