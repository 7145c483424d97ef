"""Triton kernels of :mod:`simlm_core.modeling.packed_attention` (inference) and
:mod:`simlm_core.modeling.attention_train` (training), imported on first use: needs Triton.

Module-level, because a jitted kernel finds the jitted helpers it calls among its module's
globals. Scores are kept in the log2 domain (``qk_scale`` folds in log2 e). Training kernels run
one program per (text, head): text ``i``'s query rows start at row ``q_starts[i]`` of Q
(``q_lens[i]`` of them) and its keys at row ``k_starts[i]`` of K and V (``k_lens[i]``) -- packed
texts, or a padded batch's rows with their real key counts. ``LSE`` holds each query row's
log2-sum-exp2 of its scores, from which the backward pass rebuilds the probabilities.
"""
import triton
import triton.language as tl


@triton.jit
def keep_tile(seed, rows, n0, text, head, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep-mask of the scores (query rows ``rows``, keys ``n0 .. n0 + BLOCK_N``) of one
    text and head: one Philox block (4 x 32 bits) per 8 keys, 16 bits per score, keyed by
    (row, key group, text, head) so any tiling draws the same mask."""
    groups = n0 // 8 + tl.arange(0, BLOCK_N // 8)
    c0 = rows[:, None] + groups[None, :] * 0
    c1 = groups[None, :] + rows[:, None] * 0
    c2 = c0 * 0 + text
    c3 = c0 * 0 + head
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    j = tl.arange(0, 8)[None, None, :]
    word = tl.where(j < 2, r0[:, :, None], tl.where(j < 4, r1[:, :, None],
                                                    tl.where(j < 6, r2[:, :, None], r3[:, :, None])))
    bits = (word >> ((j % 2) * 16).to(tl.uint32)) & 0xFFFF
    keep = (bits.to(tl.int32) >= threshold).to(tl.int8)
    return tl.reshape(keep, (BLOCK_M, BLOCK_N)) != 0


@triton.jit
def attend_keys(q, m_i, l_i, acc, K, V, k_start, k_len, n0, head, stride_kt, stride_kh, stride_vt, stride_vh,
                qk_scale, offs_n, offs_d, seed, rows, text, threshold, drop_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
    """One online-softmax step of a query block over keys ``n0 .. n0 + BLOCK_N``: the running row
    maxima ``m_i``, normalisers ``l_i`` (over every score: dropout comes after the softmax, as in
    BERT) and output accumulator ``acc``, updated."""
    cols = n0 + offs_n
    col_ok = cols < k_len
    kt = tl.load(K + (k_start + cols)[None, :] * stride_kt + head * stride_kh + offs_d[:, None],
                 mask=col_ok[None, :], other=0.0)  # [D, BLOCK_N]
    s = tl.dot(q, kt) * qk_scale
    s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(keep_tile(seed, rows, n0, text, head, threshold, BLOCK_M, BLOCK_N), p * drop_scale, 0.0)
    v = load_rows(V, k_start, cols, col_ok, head, stride_vt, stride_vh, offs_d)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def load_rows(PTR, start, rows, row_ok, head, stride_t, stride_h, offs_d):
    """Rows ``start + rows`` of one head (``[len(rows), D]``), zeros where not ``row_ok``."""
    return tl.load(PTR + (start + rows)[:, None] * stride_t + head * stride_h + offs_d[None, :],
                   mask=row_ok[:, None], other=0.0)


@triton.jit
def text_bounds(q_starts, q_lens, k_starts, k_lens, text):
    """Text ``text``'s first query row (64-bit), query count, first key row (64-bit) and key count."""
    return (tl.load(q_starts + text).to(tl.int64), tl.load(q_lens + text),
            tl.load(k_starts + text).to(tl.int64), tl.load(k_lens + text))


@triton.jit
def packed_attention_fwd(Q, K, V, O, cu_q, cu_k, qk_scale,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ot, stride_oh,
                         HEADS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
    """Inference: one program per text and group of ``HEADS`` heads; no dropout, no statistics kept."""
    text = tl.program_id(0)
    head0 = tl.program_id(1) * HEADS
    q_start = tl.load(cu_q + text)
    q_len = tl.load(cu_q + text + 1) - q_start
    k_start = tl.load(cu_k + text)
    k_len = tl.load(cu_k + text + 1) - k_start
    if WIDE:  # element offsets past 2**31: 64-bit addresses (int32 otherwise, the measured path)
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for hh in range(HEADS):
        h = head0 + hh
        for m0 in range(0, q_len, BLOCK_M):
            rows = m0 + offs_m
            row_ok = rows < q_len
            q = load_rows(Q, q_start, rows, row_ok, h, stride_qt, stride_qh, offs_d)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            for n0 in range(0, k_len, BLOCK_N):
                m_i, l_i, acc = attend_keys(q, m_i, l_i, acc, K, V, k_start, k_len, n0, h, stride_kt, stride_kh,
                                            stride_vt, stride_vh, qk_scale, offs_n, offs_d, 0, rows, text, 0, 1.0,
                                            BLOCK_M, BLOCK_N, False)
            out = acc / l_i[:, None]
            tl.store(O + (q_start + rows)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def attention_train_fwd(Q, K, V, O, LSE, q_starts, q_lens, k_starts, k_lens, SEED, qk_scale, threshold, drop_scale,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_ot, stride_oh, stride_lt,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        DROPOUT: tl.constexpr):
    text = tl.program_id(0)
    head = tl.program_id(1)
    q_start, q_len, k_start, k_len = text_bounds(q_starts, q_lens, k_starts, k_lens, text)
    seed = tl.load(SEED)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for m0 in range(0, q_len, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < q_len
        q = load_rows(Q, q_start, rows, row_ok, head, stride_qt, stride_qh, offs_d)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(0, k_len, BLOCK_N):
            m_i, l_i, acc = attend_keys(q, m_i, l_i, acc, K, V, k_start, k_len, n0, head, stride_kt, stride_kh,
                                        stride_vt, stride_vh, qk_scale, offs_n, offs_d, seed, rows, text, threshold,
                                        drop_scale, BLOCK_M, BLOCK_N, DROPOUT)
        tl.store(O + (q_start + rows)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + (q_start + rows) * stride_lt + head, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def attention_train_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, q_starts, q_lens, k_starts, k_lens, SEED, qk_scale,
                        sm_scale, threshold, drop_scale,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_lt, stride_dqt, stride_dqh, stride_dkt, stride_dkh,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        DROPOUT: tl.constexpr):
    """dK and dV of each key block in registers (outer loop); dQ summed with atomic adds (fp32)."""
    text = tl.program_id(0)
    head = tl.program_id(1)
    q_start, q_len, k_start, k_len = text_bounds(q_starts, q_lens, k_starts, k_lens, text)
    seed = tl.load(SEED)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for n0 in range(0, k_len, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < k_len
        k = load_rows(K, k_start, cols, col_ok, head, stride_kt, stride_kh, offs_d)
        v = load_rows(V, k_start, cols, col_ok, head, stride_vt, stride_vh, offs_d)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        for m0 in range(0, q_len, BLOCK_M):
            rows = m0 + offs_m
            row_ok = rows < q_len
            q = load_rows(Q, q_start, rows, row_ok, head, stride_qt, stride_qh, offs_d)
            do = load_rows(DO, q_start, rows, row_ok, head, stride_dot, stride_doh, offs_d)
            lse = tl.load(LSE + (q_start + rows) * stride_lt + head, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + (q_start + rows) * stride_lt + head, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v))  # d(loss)/d(dropped probabilities)
            if DROPOUT:
                keep = keep_tile(seed, rows, n0, text, head, threshold, BLOCK_M, BLOCK_N)
                p_kept = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                p_kept = p
            dv += tl.dot(tl.trans(p_kept.to(do.dtype)), do)
            ds = p * (dp - delta[:, None])  # d(loss)/d(scores), natural-log domain
            ds_lo = ds.to(q.dtype)
            dk += tl.dot(tl.trans(ds_lo), q)
            dq = tl.dot(ds_lo, k) * sm_scale
            tl.atomic_add(DQ + (q_start + rows)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :], dq,
                          mask=row_ok[:, None])
        tl.store(DK + (k_start + cols)[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + (k_start + cols)[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def attention_keep_mask_kernel(SEED, OUT, threshold, rows_n, cols_n, text, head,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One text and head's keep-mask as ``[rows_n, cols_n]`` int8 (tests, debugging)."""
    seed = tl.load(SEED)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    keep = keep_tile(seed, rows, n0, text, head, threshold, BLOCK_M, BLOCK_N)
    tl.store(OUT + rows[:, None] * cols_n + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < rows_n) & (cols[None, :] < cols_n))
