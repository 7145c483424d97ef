"""``LayerNorm(dropout(x) + residual)`` -- the end of every BERT sublayer -- as one Triton kernel.

Why a kernel of our own: in a compiled BERT-base training step on an H200 (benchmarks/results,
``model_throughput-cuda-h200-biencoder-profile.log``) inductor's fused dropout + add + LayerNorm
took 221 us per call against ~60 us of memory traffic, 8% of the step: it draws a Philox
number (10 rounds) for every element. This kernel draws one Philox block (4 x 32 bits) per 8
elements and uses 16 bits per element, 8x fewer rounds; it keeps no mask (the backward kernel
draws the same bits again from the saved seed) and recomputes the row statistics there, so
what autograd saves is the sublayer output ``x`` and the seed (the residual is saved anyway, as
the input of the sublayer's first projection).

Dropout keeps an element when its 16 bits are ``>= round(p * 65536)`` and scales it by
``65536 / (65536 - round(p * 65536))``: the drop rate is ``p`` within 7.6e-6, and the scaling
makes the kept sum unbiased for exactly that rate.

:func:`dropout_add_layer_norm` runs the kernel where Triton can (CUDA, or the interpreter with
``TRITON_INTERPRET=1``) and plain torch ops elsewhere (the same function, other random bits);
:func:`fuse_dropout_add_layer_norm` switches a BERT's/ELECTRA's sublayer outputs over to it.
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simlm_core.modeling.triton_support import relative_error, triton_available, triton_modules, verified_once

__all__ = ["dropout_add_layer_norm", "dropout_keep_mask", "dropout_threshold", "fuse_dropout_add_layer_norm",
           "fused_norm_available", "fused_norm_verified"]

_BITS = 65536  # dropout compares 16 random bits per element


def fused_norm_available(device: torch.device) -> bool:
    """Whether the Triton kernel runs on ``device`` (else :func:`dropout_add_layer_norm` uses torch ops)."""
    return triton_available(device)


def fused_norm_verified(device: torch.device) -> bool:
    """Whether the kernel runs right on ``device``'s type: on first asking, a small problem's output
    and gradients, with and without dropout, against torch's ops on the kernel's own mask (a
    failure is warned about once and answered False: the caller keeps torch's ops)."""
    if not fused_norm_available(device):
        return False
    return verified_once("dropout-add-LayerNorm", device, _self_check, 0.05, "torch's ops run")


def _self_check(device: torch.device) -> float:
    # Drawn on the CPU (named: a caller may have set CUDA as the default device) and then moved.
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, hidden = 37, 768
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(rows, hidden, generator=gen, device="cpu").to(device=device, dtype=half).requires_grad_()
    r = torch.randn(rows, hidden, generator=gen, device="cpu").to(device).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cpu")).to(device).requires_grad_()
    b = (0.1 * torch.randn(hidden, generator=gen, device="cpu")).to(device).requires_grad_()
    grad = torch.randn(rows, hidden, generator=gen, device="cpu").to(device)
    seed = torch.tensor([4321], dtype=torch.int64, device=device)
    worst = 0.0
    for p in (0.0, 0.1):
        with torch.enable_grad():
            y = _fused_forward(x, r, w, b, seed, 1e-12, p)
            got = torch.autograd.grad(y, (x, r, w, b), grad)
            ref_in = [t.detach().float().requires_grad_() for t in (x, r, w, b)]
            keep = dropout_keep_mask(seed, rows, hidden, p) if p else torch.ones_like(grad, dtype=torch.bool)
            ref = F.layer_norm(torch.where(keep, ref_in[0] * dropout_threshold(p)[1], 0.0) + ref_in[1], (hidden,),
                               ref_in[2], ref_in[3], 1e-12)
            want = torch.autograd.grad(ref, ref_in, grad)
        worst = max(worst, relative_error(y, ref), *(relative_error(g, w_) for g, w_ in zip(got, want)))
    return worst


def dropout_threshold(p: float) -> tuple[int, float]:
    """``(threshold, scale)``: keep where the 16 random bits are ``>= threshold``, times ``scale``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    threshold = int(round(p * _BITS))
    return threshold, _BITS / (_BITS - threshold)


def _kernels() -> Any:
    """The jitted kernels' module, imported on first use so that importing this one needs no Triton."""
    if triton_modules() is None:
        raise RuntimeError("the fused dropout-add-LayerNorm needs Triton (pip install triton; CUDA)")
    from simlm_core.modeling import _fused_norm_kernels

    return _fused_norm_kernels


def _groups(hidden: int) -> int:
    """Tile height: 8-element groups per row, rounded up to a power of two."""
    return triton_modules()[0].next_power_of_2((hidden + 7) // 8)


def _warps(hidden: int) -> int:
    return 4 if hidden <= 1024 else 8 if hidden <= 4096 else 16


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    hidden = x.shape[-1]
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.shape != (hidden,) or bias.shape != (hidden,):
        raise ValueError(f"LayerNorm weight and bias must be [{hidden}], got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if x.numel() // max(hidden, 1) >= 2**31:
        raise ValueError(f"{x.numel() // hidden} rows: more than the kernel's 2**31; split the batch")


@torch.library.custom_op("simlm::dropout_add_layer_norm", mutates_args=())
def _fused_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   seed: torch.Tensor, eps: float, p: float) -> torch.Tensor:
    hidden = x.shape[-1]
    x2, r2 = x.reshape(-1, hidden), residual.reshape(-1, hidden)
    out = torch.empty(x2.shape, dtype=_out_dtype(x, residual, weight), device=x.device)
    if x2.shape[0]:
        threshold, scale = dropout_threshold(p)
        _kernels().dropout_add_layer_norm_fwd[(x2.shape[0],)](
            x2, r2, weight, bias, out, seed, hidden, eps, threshold, scale,
            G=_groups(hidden), DROPOUT=threshold > 0, num_warps=_warps(hidden))
    return out.view(x.shape)


@_fused_forward.register_fake
def _(x, residual, weight, bias, seed, eps, p):
    return x.new_empty(x.shape, dtype=_out_dtype(x, residual, weight))


@torch.library.custom_op("simlm::dropout_add_layer_norm_backward", mutates_args=())
def _fused_backward(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    seed: torch.Tensor, eps: float, p: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    x2, r2 = x.reshape(-1, hidden), residual.reshape(-1, hidden)
    dy = grad.reshape(-1, hidden).contiguous()
    rows = x2.shape[0]
    dx, dr = torch.empty_like(x2), torch.empty_like(r2)
    programs = max(1, min(rows, _backward_programs(x.device)))
    rows_per_program = -(-rows // programs) if rows else 0
    dw_part = torch.zeros(programs, hidden, dtype=torch.float32, device=x.device)
    db_part = torch.zeros(programs, hidden, dtype=torch.float32, device=x.device)
    if rows:
        threshold, scale = dropout_threshold(p)
        _kernels().dropout_add_layer_norm_bwd[(programs,)](
            dy, x2, r2, weight, seed, dx, dr, dw_part, db_part, rows, hidden, eps, threshold, scale,
            rows_per_program, G=_groups(hidden), DROPOUT=threshold > 0, num_warps=_warps(hidden))
    return (dx.view(x.shape), dr.view(residual.shape), dw_part.sum(0).to(weight.dtype),
            db_part.sum(0).to(weight.dtype))


@_fused_backward.register_fake
def _(grad, x, residual, weight, seed, eps, p):
    return x.new_empty(x.shape), residual.new_empty(residual.shape), weight.new_empty(weight.shape), \
        weight.new_empty(weight.shape)


def _backward_programs(device: torch.device) -> int:
    """Programs of the backward kernel: each sums its rows' weight/bias gradients (then one sum over programs)."""
    if device.type == "cuda":  # one wave: its sm_90 build fits 5 programs per SM (benchmarks/triton_compile.py)
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, residual, weight, _bias, seed, eps, p = inputs
    ctx.save_for_backward(x, residual, weight, seed)
    ctx.eps, ctx.p = eps, p


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, residual, weight, seed = ctx.saved_tensors
    dx, dr, dw, db = _fused_backward(grad, x, residual, weight, seed, ctx.eps, ctx.p)
    return dx, dr, dw, db, None, None, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def _out_dtype(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What ``F.layer_norm(x + residual, weight=weight)`` returns: under autocast fp32 (weights are fp32)."""
    return torch.promote_types(torch.promote_types(x.dtype, residual.dtype), weight.dtype)


def _seed(device: torch.device) -> torch.Tensor:
    """A fresh Philox key from torch's generator (so ``torch.manual_seed`` reproduces the masks), on ``device``."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float, p: float = 0.0, training: bool = False) -> torch.Tensor:
    """``F.layer_norm(F.dropout(x, p, training) + residual, [H], weight, bias, eps)``, fused where Triton runs.

    The result has the dtype torch's ops would give (fp32 for a half ``x`` on an fp32 residual
    stream, as under autocast). Off ``fused_norm_available`` devices it runs exactly those ops.
    """
    if not fused_norm_available(x.device):
        return F.layer_norm(F.dropout(x, p, training) + residual, (x.shape[-1],), weight, bias, eps)
    _check(x, residual, weight, bias)
    p = float(p) if training else 0.0
    dropout_threshold(p)  # refuse a bad p before any kernel runs
    if torch.is_autocast_enabled(x.device.type):  # weights stay fp32, as autocast's layer_norm keeps them
        weight, bias = weight.float(), bias.float()
    return _fused_forward(x.contiguous(), residual.contiguous(), weight, bias, _seed(x.device), float(eps), p)


def dropout_keep_mask(seed: torch.Tensor, rows: int, hidden: int, p: float) -> torch.Tensor:
    """The keep-mask (bool ``[rows, hidden]``) that the kernels draw for ``seed`` (tests, debugging)."""
    threshold, _ = dropout_threshold(p)
    out = torch.empty(rows, hidden, dtype=torch.int8, device=seed.device)
    if rows:
        _kernels().dropout_keep_mask_kernel[(rows,)](seed, out, hidden, threshold, G=_groups(hidden))
    return out.bool()


def _fused_sublayer_forward(self: nn.Module, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """``BertSelfOutput``/``BertOutput``'s forward (dense, dropout, add, LayerNorm) on the fused kernel."""
    norm = self.LayerNorm
    return dropout_add_layer_norm(self.dense(hidden_states), input_tensor, norm.weight, norm.bias, norm.eps,
                                  self.dropout.p, self.training)


def _is_sublayer_output(module: nn.Module) -> bool:
    return (type(module).__name__.endswith(("SelfOutput", "Output")) and isinstance(getattr(module, "dense", None), nn.Linear)
            and isinstance(getattr(module, "dropout", None), nn.Dropout)
            and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
            and module.LayerNorm.elementwise_affine and module.LayerNorm.bias is not None)


def fuse_dropout_add_layer_norm(model: nn.Module) -> int:
    """Run every BERT/ELECTRA sublayer output in ``model`` (``*SelfOutput`` and ``*Output`` modules:
    dense, dropout, residual add, LayerNorm) through :func:`dropout_add_layer_norm`.

    The forward is replaced on each instance: weights, state dicts and checkpoints are unchanged.
    Returns how many modules were switched (0: no BERT-like layers found).
    """
    count = 0
    for module in model.modules():
        if _is_sublayer_output(module) and not getattr(module, "_simlm_fused_norm", False):
            module.forward = types.MethodType(_fused_sublayer_forward, module)
            module._simlm_fused_norm = True
            count += 1
    return count
