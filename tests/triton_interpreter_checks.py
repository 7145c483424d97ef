"""Run our Triton kernels in Triton's CPU interpreter; print one JSON of results.

Started by tests/test_packed_attention.py (parts ``kernel``, ``encoder``),
tests/test_fused_norm.py (part ``fused_norm``) and tests/test_attention_train.py (part
``attention_train``) in a child process, because ``TRITON_INTERPRET=1``
must be set before a kernel is built and must not leak into other tests.

On a GPU the same checks run on the compiled kernels (``--device cuda``: every tensor is made
there; gpu_suite.sh part ``kernels``). The figures are then for reading, not for the tests'
bounds: fp32 products on tensor cores are TF32 there.
"""
from __future__ import annotations

import json
import os
import sys
import time

ON_GPU = "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cuda"
assert ON_GPU or os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (or --device cuda)"

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
    bert = BertModel(BertConfig(**TINY_BERT)).eval()
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


TINY_BERT = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded texts of 5, 11 and 2 tokens: ``(ids, mask)``."""
    lengths = torch.tensor([5, 11, 2])
    ids = torch.randint(5, 120, (3, 11))
    return ids, (torch.arange(11)[None, :] < lengths[:, None]).long()


def loss_and_grads(model: torch.nn.Module, loss_fn) -> tuple[torch.Tensor, dict]:
    """``loss_fn()``'s value and the gradients it leaves on ``model``'s parameters (compiled-module
    prefixes dropped from the names)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def against(reference: tuple[torch.Tensor, dict], got: tuple[torch.Tensor, dict], relative_loss: bool = False) -> dict:
    """How far a run's loss and gradients are from the reference run's."""
    (ref_loss, ref_grads), (loss, grads) = reference, got
    diff = (loss - ref_loss).abs() / (ref_loss.abs() if relative_loss else 1)
    return {"loss": float(diff), "grads": max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()),
            "same_grad_names": sorted(grads) == sorted(ref_grads)}


def train_losses(model: torch.nn.Module, loss_fn, steps: int = 5) -> list[float]:
    """Losses of ``steps`` SGD steps (lr 0.05) on ``loss_fn``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        loss, _ = loss_and_grads(model, loss_fn)
        opt.step()
        losses.append(float(loss))
    return losses


def fused_norm_checks() -> dict:
    """The dropout-add-LayerNorm kernel against torch's ops on the kernel's own keep-mask; its
    dropout rate; and BERTs switched over to it (eager, packed, compiled) against transformers'."""
    from simlm_core.modeling.fused_norm import (dropout_threshold, _fused_forward, dropout_add_layer_norm,
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
            _, scale = dropout_threshold(p)
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
    from simlm_core.modeling.fused_norm import _self_check, fused_norm_verified

    out["verified"] = fused_norm_verified(torch.empty(0).device)
    out["self_check_other_default"] = _under_other_default_device(_self_check)
    return out


def _under_other_default_device(check) -> float:
    """A kernel self-check's error while a caller has set another default device (``meta``): the
    check must name the devices of everything it makes (it failed on CUDA once, under
    ``set_default_device("cuda")``, and the kernels were then never used)."""
    device = torch.empty(0).device
    with torch.device("meta"):
        return float(check(device))


def _fused_bert_errors(fuse) -> dict:
    """A tiny BERT in train mode, switched over to the fused kernel: at dropout 0 its loss and
    gradients equal transformers' (padded and packed forward, eager and compiled); at 0.1 it trains."""
    import copy

    from transformers import BertConfig, BertModel

    from simlm_core.modeling.packed import PackedBatch, PackedBertEncoder

    torch.manual_seed(0)
    plain = BertModel(BertConfig(**TINY_BERT, **NO_DROPOUT), add_pooling_layer=False).train()
    fused = copy.deepcopy(plain)
    result = {"switched": fuse(fused), "switched_again": fuse(fused)}
    ids, mask = padded_batch()
    batch = PackedBatch.from_padded(ids, mask)

    def padded(model):
        return lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].pow(2).mean()

    def packed(model):
        return lambda: PackedBertEncoder(model, pooling="cls", trainable=True).encode(batch).pow(2).mean()

    reference = loss_and_grads(plain, padded(plain))
    for name, model, run in [("padded", fused, padded), ("packed", fused, packed),
                             ("compiled", torch.compile(fused, dynamic=True), padded)]:
        result[name] = against(reference, loss_and_grads(model, run(model)))
    for module in fused.modules():  # BERT's default dropout: it trains, with the kernel's masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    result["dropout_losses"] = train_losses(fused, padded(fused))
    return result


def attention_train_checks() -> dict:
    """The training attention kernel against per-text softmax attention on the kernel's own dropout
    mask (output and q/k/v gradients), its drop rate, its self-check, and a trainable packed BERT on
    it against the same encoder on SDPA."""
    from simlm_core.modeling.attention_train import (_attention_fwd, attention_keep_mask,
                                                     training_kernel_verified)
    from simlm_core.modeling.attention_train import _self_check as attention_train_self_check
    from simlm_core.modeling.fused_norm import dropout_threshold

    torch.manual_seed(0)
    lengths = [1, 5, 40, 17, 33]
    heads, dim = 2, 16
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seed = torch.tensor([42], dtype=torch.int64)

    def reference(q, k, v, cu_q, p):
        _, scale = dropout_threshold(p)
        outs = []
        for i in range(len(lengths)):
            qi, ki, vi = (x[c[i]:c[i + 1]].float().transpose(0, 1) for x, c in ((q, cu_q), (k, cu), (v, cu)))
            probs = torch.softmax(qi @ ki.transpose(1, 2) / dim ** 0.5, -1)
            if p:
                keep = torch.stack([attention_keep_mask(seed, qi.shape[1], ki.shape[1], i, h, p) for h in range(heads)])
                probs = torch.where(keep, probs * scale, 0.0)
            outs.append((probs @ vi).transpose(0, 1))
        return torch.cat(outs)

    errors = {}
    for dtype in (torch.float32, torch.float16):  # not bf16: the interpreter's bf16 dot is wrong
        # forward and backward tiled alike, and differently (the mask must not depend on the tiles)
        for blocks in [(16, 16, 4, 16, 16, 4), (64, 32, 4, 32, 64, 4)]:
            for first in (False, True):
                for p in (0.0, 0.1):
                    qkv = torch.randn(int(cu[-1]), 3, heads, dim).to(dtype).requires_grad_()
                    q, k, v = qkv.unbind(1)
                    cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32) if first else cu
                    if first:
                        q = q[cu[:-1].long()]
                    out, _ = _attention_fwd(q, k, v, cu_q[:-1], cu_q.diff(), cu[:-1], cu.diff(), seed, p,
                                            dim ** -0.5, *blocks)
                    ref = reference(q, k, v, cu_q, p)
                    grad = torch.randn(ref.shape)
                    got_g = torch.autograd.grad(out, qkv, grad.to(dtype), retain_graph=True)[0]
                    ref_g = torch.autograd.grad(ref, qkv, grad)[0]
                    key = f"{str(dtype).split('.')[-1]} {blocks} {'first' if first else 'all'} p={p}"
                    errors[key] = {"out": float((out.detach().float() - ref.detach()).abs().max()),
                                   "grad": float((got_g.float() - ref_g).abs().max() / ref_g.abs().max()),
                                   "dtype_kept": out.dtype == dtype and got_g.dtype == dtype}
    masks = torch.stack([attention_keep_mask(seed, 144, 144, t, h, 0.1) for t in range(3) for h in range(4)])
    return {
        "errors": errors,
        "drop_rate": 1 - float(masks.float().mean()),  # 248,832 draws
        "heads_differ": not torch.equal(masks[0], masks[1]),
        "texts_differ": not torch.equal(masks[0], masks[4]),
        "verified": training_kernel_verified(torch.empty(0).device),
        "self_check_other_default": _under_other_default_device(attention_train_self_check),
        "encoder": _train_attention_encoder_errors(),
        "transformers": _hf_attention_errors(),
        "checkpointing": _recomputed_dropout_error(),
    }


def _recomputed_dropout_error() -> float:
    """A BERT on both kernels (fused_attention, fused_norm) with dropout 0.1 and activation
    checkpointing: the recomputed forward must draw the same dropout bits (torch's checkpoint
    restores the generator, from which each call's seed comes), so the gradients equal those
    without checkpointing. Returns the largest difference."""
    import copy

    from transformers import BertConfig, BertModel

    from simlm_core.modeling.attention_train import use_triton_attention
    from simlm_core.modeling.fused_norm import fuse_dropout_add_layer_norm

    torch.manual_seed(0)
    bert = BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False).train()
    use_triton_attention(bert)
    fuse_dropout_add_layer_norm(bert)
    checkpointed = copy.deepcopy(bert)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fuse_dropout_add_layer_norm(checkpointed)  # deepcopy keeps the switched forwards; idempotent
    ids = torch.randint(5, 120, (3, 9))
    grads = []
    for model in (bert, checkpointed):
        torch.manual_seed(1)
        loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return max(float((grads[0][n] - g).abs().max()) for n, g in grads[1].items())


def _hf_attention_errors() -> dict:
    """transformers' own BERT and ELECTRA on a right-padded batch, switched to the kernel
    (``fused_attention``) against SDPA: dropout 0, loss and gradients, eager and compiled."""
    import copy

    from transformers import BertConfig, BertModel, ElectraConfig, ElectraForSequenceClassification

    from simlm_core.modeling.attention_train import use_triton_attention

    torch.manual_seed(0)
    small = dict(**TINY_BERT, **NO_DROPOUT)
    ids, mask = padded_batch()
    models = {
        "bert": (BertModel(BertConfig(**small), add_pooling_layer=False),
                 lambda m: (m(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]).pow(2).mean()),
        "electra": (ElectraForSequenceClassification(ElectraConfig(embedding_size=32, num_labels=1, **small)),
                    lambda m: m(input_ids=ids, attention_mask=mask).logits.pow(2).mean()),
    }
    out = {}
    for name, (plain, loss_fn) in models.items():
        plain.train()
        switched = copy.deepcopy(plain)
        out[f"{name} switched"] = use_triton_attention(switched)
        reference = loss_and_grads(plain, lambda: loss_fn(plain))
        runs = {"eager": switched}
        if name == "bert":
            runs["compiled"] = torch.compile(switched, dynamic=True)
        for run, model in runs.items():
            out[f"{name} {run}"] = against(reference, loss_and_grads(model, lambda: loss_fn(model)),
                                           relative_loss=True)
    return out


def _train_attention_encoder_errors() -> dict:
    """A trainable packed BERT: Triton training attention against SDPA on padded q/k/v (dropout 0:
    loss and gradients; eager and compiled), and training with attention dropout 0.1."""
    from transformers import BertConfig, BertModel

    from simlm_core.modeling.packed import PackedBatch, PackedBertEncoder

    torch.manual_seed(0)
    bert = BertModel(BertConfig(**TINY_BERT, **NO_DROPOUT), add_pooling_layer=False).train()
    batch = PackedBatch.from_padded(*padded_batch())

    def run(enc):
        return lambda: enc.encode(batch).pow(2).mean()

    out = {}
    for pooling in ("cls", "mean"):
        reference = loss_and_grads(bert, run(PackedBertEncoder(bert, pooling=pooling, trainable=True,
                                                               attention="padded")))
        tri = PackedBertEncoder(bert, pooling=pooling, trainable=True, attention="triton")
        runs = {"eager": tri}
        if pooling == "cls":
            compiled = PackedBertEncoder(bert, pooling=pooling, trainable=True, attention="triton")
            compiled.compile(dynamic=True)
            runs["compiled"] = compiled
        for name, enc in runs.items():
            out[f"{pooling} {name}"] = against(reference, loss_and_grads(bert, run(enc)))
        out[f"{pooling} kernel"] = tri.attention_kernel(torch.zeros(1))
    for module in bert.modules():
        if isinstance(module, torch.nn.Dropout) and module is not bert.embeddings.dropout:
            module.p = 0.1
    out["dropout_losses"] = train_losses(bert, run(PackedBertEncoder(bert, pooling="cls", trainable=True,
                                                                     attention="triton")))
    return out


if __name__ == "__main__":
    parts = [a for a in sys.argv[1:] if a not in ("--device", "cuda", "cpu")] or ["kernel", "encoder"]
    if ON_GPU:
        torch.set_default_device("cuda")
    # Each part's figures are printed (one JSON line, flushed) as it finishes, so that a run cut
    # short by a time cap still shows the parts done; the last line holds them all.
    checks = {"kernel": kernel_errors, "encoder": encoder_errors, "fused_norm": fused_norm_checks,
              "attention_train": attention_train_checks}
    result = {}
    for part in [p for p in checks if p in parts]:
        started = time.perf_counter()
        result[part] = checks[part]()
        print(json.dumps({part: result[part]}), flush=True)
        print(f"[checks] {part}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps(result))
