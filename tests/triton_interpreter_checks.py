"""Run our Triton kernels in Triton's CPU interpreter; print one JSON of results.

Started by tests/test_packed_attention.py (parts ``kernel``, ``encoder``) and
tests/test_fused_norm.py (part ``fused_norm``) in a child process, because ``TRITON_INTERPRET=1``
must be set before a kernel is built and must not leak into other tests.
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


def fused_norm_checks() -> dict:
    """The dropout-add-LayerNorm kernel against torch's ops on the kernel's own keep-mask; its
    dropout rate; and BERTs switched over to it (eager, packed, compiled) against transformers'."""
    from simlm_core.modeling.fused_norm import (_drop_threshold, _fused_forward, dropout_add_layer_norm,
                                                dropout_keep_mask, fuse_dropout_add_layer_norm)

    torch.manual_seed(0)
    out: dict = {"errors": {}}
    # x in the sublayer's dtype; the residual stream in fp32 (autocast) or x's dtype. bf16 is fine
    # here: only the interpreter's bf16 tl.dot is wrong, and this kernel has no dot.
    cases = [(36, torch.float32, torch.float32), (64, torch.float16, torch.float32),
             (96, torch.bfloat16, torch.bfloat16), (768, torch.float32, torch.float32)]
    for hidden, x_dtype, r_dtype in cases:
        rows = 29
        x = torch.randn(rows, hidden).to(x_dtype).requires_grad_()
        r = torch.randn(rows, hidden).to(r_dtype).requires_grad_()
        w = (1 + 0.2 * torch.randn(hidden)).requires_grad_()
        b = (0.2 * torch.randn(hidden)).requires_grad_()
        seed = torch.tensor([987654321987], dtype=torch.int64)
        for p in (0.0, 0.1):
            y = _fused_forward(x, r, w, b, seed, 1e-12, p)
            keep = dropout_keep_mask(seed, rows, hidden, p)
            _, scale = _drop_threshold(p)
            ref = F.layer_norm(torch.where(keep, x.float() * scale, 0.0) + r.float(), (hidden,), w, b, 1e-12)
            grad = torch.randn(rows, hidden)
            got_g = torch.autograd.grad(y, (x, r, w, b), grad)
            ref_g = torch.autograd.grad(ref, (x, r, w, b), grad)
            key = f"{hidden} {str(x_dtype).split('.')[-1]}/{str(r_dtype).split('.')[-1]} p={p}"
            out["errors"][key] = {
                "y": float((y.float() - ref).abs().max().detach()), "dtype": str(y.dtype),
                **{f"d{n}": float((g.float() - gr.float()).abs().max() / (gr.float().abs().max() + 1e-12))
                   for n, g, gr in zip("xrwb", got_g, ref_g)},
                "grad_dtypes_match": all(g.dtype == t.dtype for g, t in zip(got_g, (x, r, w, b))),
            }
    seed = torch.tensor([5], dtype=torch.int64)
    big = dropout_keep_mask(seed, 256, 768, 0.1)
    out["drop_rate"] = 1 - float(big.float().mean())
    out["same_seed_same_mask"] = bool(torch.equal(big, dropout_keep_mask(seed, 256, 768, 0.1)))
    out["other_seed_overlap"] = float((big == dropout_keep_mask(torch.tensor([6]), 256, 768, 0.1)).float().mean())
    out["rows_differ"] = not torch.equal(big[0], big[1])
    x, r = torch.randn(7, 32), torch.randn(7, 32)
    w, b = torch.ones(32), torch.zeros(32)
    out["eval_error"] = float((dropout_add_layer_norm(x, r, w, b, 1e-5, 0.1, training=False)
                               - F.layer_norm(x + r, (32,), w, b, 1e-5)).abs().max())
    out["bert"] = _fused_bert_errors(fuse_dropout_add_layer_norm)
    return out


def _fused_bert_errors(fuse) -> dict:
    """A tiny BERT in train mode, switched over to the fused kernel: at dropout 0 its loss and
    gradients equal transformers' (padded and packed forward, eager and compiled); at 0.1 it trains."""
    import copy

    from transformers import BertConfig, BertModel

    from simlm_core.modeling.packed import PackedBatch, PackedBertEncoder

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    plain = BertModel(cfg, add_pooling_layer=False).train()
    fused = copy.deepcopy(plain)
    result = {"switched": fuse(fused), "switched_again": fuse(fused)}
    lengths = torch.tensor([5, 11, 2])
    ids = torch.randint(5, 120, (lengths.numel(), int(lengths.max())))
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()

    def loss_and_grads(model, run):
        model.zero_grad(set_to_none=True)
        loss = run(model).pow(2).mean()
        loss.backward()
        return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    def padded(model):
        return model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]

    batch = PackedBatch.from_padded(ids, mask)

    def packed(model):
        return PackedBertEncoder(model, pooling="cls", trainable=True).encode(batch)

    ref_loss, ref_grads = loss_and_grads(plain, padded)
    for name, model, run in [("padded", fused, padded), ("packed", fused, packed),
                             ("compiled", torch.compile(fused, dynamic=True), padded)]:
        loss, grads = loss_and_grads(model, run)
        result[name] = {"loss": float((loss - ref_loss).abs()),
                        "grads": max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()),
                        "same_grad_names": sorted(grads) == sorted(ref_grads)}
    for module in fused.modules():  # BERT's default dropout: it trains, with the kernel's masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    opt = torch.optim.SGD(fused.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        loss, _ = loss_and_grads(fused, padded)
        opt.step()
        losses.append(float(loss))
    result["dropout_losses"] = losses
    return result


if __name__ == "__main__":
    parts = sys.argv[1:] or ["kernel", "encoder"]
    result = {}
    if "kernel" in parts:
        result["kernel"] = kernel_errors()
    if "encoder" in parts:
        result["encoder"] = encoder_errors()
    if "fused_norm" in parts:
        result["fused_norm"] = fused_norm_checks()
    print(json.dumps(result))
