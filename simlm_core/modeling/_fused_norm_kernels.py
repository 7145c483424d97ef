"""Triton kernels of :mod:`simlm_core.modeling.fused_norm` (imported on first use: needs Triton).

Module-level, because a jitted kernel finds the jitted helpers it calls among its module's globals.
A row is a ``[G, 8]`` tile: element ``8 g + j`` of the row, ``G`` groups of 8 (a power of two).
"""
import triton
import triton.language as tl


@triton.jit
def keep_bits(seed_ptr, row, g, j, threshold):
    """Keep-mask of row ``row``'s elements ``8 g + j``: one Philox block per 8 elements, 16 bits each."""
    seed = tl.load(seed_ptr)
    zero = g * 0
    r0, r1, r2, r3 = tl.philox(seed, g, zero + row, zero, zero)
    word = tl.where(j < 2, r0, tl.where(j < 4, r1, tl.where(j < 6, r2, r3)))
    bits = (word >> ((j % 2) * 16).to(tl.uint32)) & 0xFFFF
    return bits.to(tl.int32) >= threshold

@triton.jit
def row_tile(H, G: tl.constexpr):
    g = tl.arange(0, G)[:, None]
    j = tl.arange(0, 8)[None, :]
    col = g * 8 + j
    return g, j, col, col < H

@triton.jit
def normalise(x, r, ok, H, eps):
    """``(h - mean) * rstd`` of the row ``h = x + r`` and its ``rstd`` (fp32, zero outside ``ok``)."""
    h = x + r
    mean = tl.sum(tl.sum(h, 1), 0) / H
    d = tl.where(ok, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, 1), 0) / H + eps)
    return d * rstd, rstd

@triton.jit
def dropout_add_layer_norm_fwd(X, R, W, B, Y, SEED, H, eps, threshold, scale,
            G: tl.constexpr, DROPOUT: tl.constexpr):
    row = tl.program_id(0)
    g, j, col, ok = row_tile(H, G)
    base = tl.cast(row, tl.int64) * H
    x = tl.load(X + base + col, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(R + base + col, mask=ok, other=0.0).to(tl.float32)
    if DROPOUT:
        x = tl.where(keep_bits(SEED, row, g, j, threshold), x * scale, 0.0)
    xhat, rstd = normalise(x, r, ok, H, eps)
    w = tl.load(W + col, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + base + col, (xhat * w + b).to(Y.dtype.element_ty), mask=ok)

@triton.jit
def dropout_add_layer_norm_bwd(DY, X, R, W, SEED, DX, DR, DW_PART, DB_PART, T, H, eps, threshold, scale, rows_per_program,
             G: tl.constexpr, DROPOUT: tl.constexpr):
    pid = tl.program_id(0)
    g, j, col, ok = row_tile(H, G)
    w = tl.load(W + col, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([G, 8], tl.float32)
    db = tl.zeros([G, 8], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, T)
    for row in range(first, last):
        base = tl.cast(row, tl.int64) * H
        x = tl.load(X + base + col, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(R + base + col, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + col, mask=ok, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = keep_bits(SEED, row, g, j, threshold)
            x = tl.where(keep, x * scale, 0.0)
        xhat, rstd = normalise(x, r, ok, H, eps)
        wdy = w * dy
        c1 = tl.sum(tl.sum(xhat * wdy, 1), 0) / H
        c2 = tl.sum(tl.sum(wdy, 1), 0) / H
        dh = tl.where(ok, (wdy - xhat * c1 - c2) * rstd, 0.0)
        tl.store(DR + base + col, dh.to(DR.dtype.element_ty), mask=ok)
        if DROPOUT:
            dh = tl.where(keep, dh * scale, 0.0)
        tl.store(DX + base + col, dh.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * H + col, dw, mask=ok)
    tl.store(DB_PART + pid * H + col, db, mask=ok)

@triton.jit
def dropout_keep_mask_kernel(SEED, OUT, H, threshold, G: tl.constexpr):
    row = tl.program_id(0)
    g, j, col, ok = row_tile(H, G)
    keep = keep_bits(SEED, row, g, j, threshold)
    tl.store(OUT + tl.cast(row, tl.int64) * H + col, keep.to(tl.int8), mask=ok)
