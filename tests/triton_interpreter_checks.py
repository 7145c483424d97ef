"""Run the packed-attention Triton kernel in Triton's CPU interpreter; print one JSON of results.

Started by tests/test_packed_attention.py in a child process, because ``TRITON_INTERPRET=1``
must be set before the kernel is built and must not leak into other tests.
"""
from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from simlm_core.modeling.packed_attention import _packed_attention_op, packed_attention  # noqa: E402


def per_text_sdpa(q, k, v, cu_q, cu_k):
    outs = []
    for i in range(cu_q.numel() - 1):
        qi = q[cu_q[i] : cu_q[i + 1]].float().transpose(0, 1)
        ki = k[cu_k[i] : cu_k[i + 1]].float().transpose(0, 1)
        vi = v[cu_k[i] : cu_k[i + 1]].float().transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(outs)


def kernel_errors() -> dict:
    """Largest |difference| from per-text SDPA, per (dtype, blocks, all tokens / first-token queries)."""
    torch.manual_seed(0)
    lengths = torch.tensor([1, 5, 67, 150, 16, 17, 33])  # 1 token, block edges, longer than any block
    heads, dim = 4, 16
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    first = cu[:-1].long()
    cu_first = torch.arange(lengths.numel() + 1, dtype=torch.int32)
    out = {}
    # fp16, not bf16: the interpreter's bf16 dot is wrong (the GPU's is not); fp32 checks exactness.
    for dtype in (torch.float32, torch.float16):
        qkv = torch.randn(int(lengths.sum()), 3, heads, dim).to(dtype)  # strided views, as the encoder passes
        q, k, v = qkv.unbind(1)
        for blocks in [(64, 32, 1, 4), (16, 16, 2, 4), (32, 64, 4, 4)]:
            got = packed_attention(q, k, v, cu, cu, blocks)
            ref = per_text_sdpa(q, k, v, cu, cu)
            key = f"{str(dtype).split('.')[-1]} {blocks}"
            out[key] = float((got.float() - ref).abs().max())
            assert got.shape == q.shape and got.dtype == dtype
            wide = _packed_attention_op(q, k, v, cu, cu, *blocks, True)  # 64-bit offsets, as past 2**31
            out[key + " wide"] = float((wide.float() - ref).abs().max())
            got_first = packed_attention(q[first], k, v, cu_first, cu, blocks)
            out[key + " first"] = float((got_first.float() - per_text_sdpa(q[first], k, v, cu_first, cu)).abs().max())
    return out


def encoder_errors() -> dict:
    """A tiny BertModel: transformers' padded forward against the packed encoder on the Triton kernel."""
    from transformers import BertConfig, BertModel

    from simlm_core.modeling.packed import PackedBatch, PackedBertEncoder

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64)).eval()
    lengths = torch.tensor([5, 17, 33, 2, 40])
    width = int(lengths.max())
    ids = torch.randint(5, 120, (lengths.numel(), width))
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    batch = PackedBatch.from_padded(ids, mask)
    out = {}
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        refs = {"cls": hidden[:, 0], "mean": (hidden * mask[..., None]).sum(1) / lengths[:, None]}
        for pooling, ref in refs.items():
            enc = PackedBertEncoder(bert, pooling=pooling, attention="triton", attention_blocks=(16, 16, 2, 4))
            out[f"{pooling} eager"] = float((enc.encode(batch) - ref).abs().max())
            out[f"{pooling} kernel"] = enc.attention_kernel(torch.zeros(1, dtype=torch.float16))
        enc = PackedBertEncoder(bert, pooling="cls", attention="triton", attention_blocks=(16, 16, 2, 4))
        enc.compile(dynamic=True)  # the kernel is a custom op: compiled graphs call it opaquely
        out["cls compiled"] = float((enc.encode(batch) - refs["cls"]).abs().max())
    return out


if __name__ == "__main__":
    parts = sys.argv[1:] or ["kernel", "encoder"]
    result = {}
    if "kernel" in parts:
        result["kernel"] = kernel_errors()
    if "encoder" in parts:
        result["encoder"] = encoder_errors()
    print(json.dumps(result))
