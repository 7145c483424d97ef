"""Padding-free BERT inference: a batch's tokens packed into one ``[T, H]`` row, no padding anywhere.

A BERT (or ELECTRA) encoder -- a :class:`~simlm_core.modeling.biencoder.BiEncoder`'s, or a
cross-encoder's for re-ranking -- with the same weights (shared, not copied, except the fused
query/key/value matrix) and the same arithmetic as transformers' ``BertModel``, but:

- **no padding**: every linear layer, LayerNorm and activation runs on the batch's real tokens
  only; attention, on CUDA, is our Triton kernel for short packed texts
  (:mod:`simlm_core.modeling.packed_attention`, 1.9x flash attention's rate on passages) or
  variable-length flash attention (``varlen_attn``, torch >= 2.10), and elsewhere SDPA on a
  padded copy of q/k/v (the same result, for CPU and tests);
- **one fused query/key/value projection** (one GEMM of width ``3H`` instead of three of ``H``);
- **[CLS] pooling reads one row per passage**, so the last layer runs its attention queries, its
  output projection and its feed-forward block on the [CLS] rows only: those are all the pooled
  vector depends on (1/12 of BERT-base's FLOPs skipped at no change in the result);
- optionally (``gelu_epilogue``), the feed-forward GELU computed in the GEMM's epilogue
  (``torch._addmm_activation``, cuBLASLt on CUDA). That is the tanh approximation of GELU,
  not BERT's erf form: off by default; the benchmark reports how far it moves the vectors.

Training (``trainable=True``, for padding-free biencoder training): the fused projection is
built from the live query/key/value weights on every call, so gradients reach them; the BERT's
own dropout modules apply (embeddings, attention output, feed-forward output, attention
probabilities) whenever the BERT is in training mode; attention is SDPA on padded q/k/v or, for a
BERT switched to it (``fused_attention``), our Triton training kernel on CUDA in fp16/bf16
(:mod:`simlm_core.modeling.attention_train`: dropout, backward, no padding); and [CLS] pooling still
skips the last layer's other rows, which no loss reads. The sublayer ends (dropout, residual
add, LayerNorm) run through the BERT's own ``*Output`` modules, so ``fused_norm``
(:mod:`simlm_core.modeling.fused_norm`) reaches them. Supported: a ``bert`` encoder with absolute positions;
:func:`packed_support` says why a model is not.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from simlm_core.modeling.attention_train import HF_ATTENTION, kernel_head_dim, packed_attention_train
from simlm_core.modeling.packed_attention import DEFAULT_BLOCKS, packed_attention
from simlm_core.modeling.triton_support import triton_available

__all__ = ["PACKED_MODEL_TYPES", "PackedBatch", "PackedBertEncoder", "packed_support", "varlen_available"]

PACKED_MODEL_TYPES = ("bert", "electra")
"""Encoders with BERT's layer (ELECTRA's differs only by an optional embedding projection)."""


def _varlen_attn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def varlen_available(device: torch.device) -> bool:
    """Whether variable-length flash attention can run on ``device`` (CUDA, torch >= 2.10)."""
    return device.type == "cuda" and _varlen_attn() is not None


def packed_support(encoder: nn.Module) -> str | None:
    """``None`` if :class:`PackedBertEncoder` can run ``encoder``; else the reason it cannot."""
    config = getattr(encoder, "config", None)
    if getattr(config, "model_type", None) not in PACKED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} (packed: {', '.join(PACKED_MODEL_TYPES)})"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.position_embedding_type!r} (only 'absolute')"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "a decoder / cross-attention BERT"
    if not hasattr(encoder, "embeddings") or not hasattr(encoder, "encoder"):
        return f"{type(encoder).__name__} is not a BertModel or ElectraModel"
    return None


class PackedBatch:
    """A batch of ``N`` texts as one packed row of ``T`` tokens.

    ``cu_seqlens`` (int32, ``[N+1]``) holds each text's start in the row (flash attention's
    layout); ``seq_index`` (``[T]``) the text each token belongs to; ``positions`` (``[T]``)
    each token's position in its text. ``max_len`` is a host-side bound on the texts' lengths.
    ``source_index`` (``[T]``, when built by :meth:`from_flat` / :meth:`from_padded`) each token's
    row in the flat input it was gathered from, so per-token tensors of that input (labels, a
    second copy of the ids) follow without a boolean mask: see :meth:`gather`.
    """

    __slots__ = ("input_ids", "token_type_ids", "positions", "seq_index", "cu_seqlens", "max_len",
                 "source_index", "source_dims")

    def __init__(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, positions: torch.Tensor,
                 seq_index: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                 source_index: torch.Tensor | None = None) -> None:
        self.input_ids = input_ids
        self.token_type_ids = token_type_ids
        self.positions = positions
        self.seq_index = seq_index
        self.cu_seqlens = cu_seqlens
        self.max_len = max_len
        self.source_index = source_index
        self.source_dims = 1  # leading dims of the input that source_index counts over (2: [B, L])

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The packed tokens' entries of a tensor laid out like the input (``[B, L, ...]`` for
        :meth:`from_padded`, flat ``[*, ...]`` for :meth:`from_flat`): ``[T, ...]``, in packed order.

        An index gather of known size: unlike ``values[attention_mask.bool()]`` it needs no
        read-back of the mask (a host-device sync on CUDA).
        """
        if self.source_index is None:
            raise ValueError("this PackedBatch was built without source_index (use from_flat / from_padded)")
        return values.flatten(0, self.source_dims - 1)[self.source_index]

    def __len__(self) -> int:
        return self.cu_seqlens.numel() - 1

    @classmethod
    def from_flat(cls, ids: torch.Tensor, type_ids: torch.Tensor | None, starts: torch.Tensor,
                  lengths: torch.Tensor, total_tokens: int, max_len: int) -> "PackedBatch":
        """Gather texts out of flat token arrays (``ids[starts[i] : starts[i] + lengths[i]]``).

        ``total_tokens`` (``lengths.sum()``) and ``max_len`` come from the host, so building the
        batch never waits for the device.
        """
        device = ids.device
        n = lengths.numel()
        cu = torch.zeros(n + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lengths, 0)
        seq = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=total_tokens)
        pos = torch.arange(total_tokens, device=device) - cu[:-1].long()[seq]
        flat = starts[seq] + pos
        tts = None if type_ids is None else type_ids[flat]
        return cls(ids[flat], tts, pos, seq, cu, max_len, flat)

    @classmethod
    def from_padded(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None, num_tokens: int | None = None) -> "PackedBatch":
        """From an ordinary right-padded batch. Without ``num_tokens`` (the mask's sum, known on the
        host) this reads the mask back to count the tokens and check the right padding (a
        host-device sync); with it, it trusts the caller (a tokenizer's right-padded batch) and
        never waits for the device."""
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        if num_tokens is None:
            if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]):
                raise ValueError("attention_mask must be right-padded (ones, then zeros)")
            num_tokens = int(lengths.sum())
        width = input_ids.shape[1]
        starts = torch.arange(input_ids.shape[0], device=input_ids.device) * width
        tts = None if token_type_ids is None else token_type_ids.reshape(-1)
        batch = cls.from_flat(input_ids.reshape(-1), tts, starts, lengths, int(num_tokens), width)
        batch.source_dims = 2
        return batch


class PackedBertEncoder(nn.Module):
    """A ``BertModel``'s forward on packed tokens, returning pooled ``[N, H]`` vectors (see the module doc).

    ``attention``: ``"varlen"`` (flash attention over ``cu_seqlens``; CUDA, fp16/bf16),
    ``"triton"`` (one Triton program per text, :mod:`simlm_core.modeling.packed_attention`; CUDA),
    ``"padded"`` (SDPA on padded q/k/v with a key mask; any device) or ``"auto"`` (for q/k/v in
    fp16/bf16, i.e. half weights or autocast, on CUDA: Triton if importable, else varlen; else padded).
    Trainable encoders attend with ``"triton"`` (the training kernel, with dropout and backward) or
    ``"padded"``; their ``"auto"`` is the Triton kernel for fp16/bf16 q/k/v on CUDA when the BERT was
    switched to it (``fused_attention``: :func:`~simlm_core.modeling.attention_train.use_triton_attention`).
    ``attention_blocks``: the Triton kernel's ``(BLOCK_M, BLOCK_N, heads per program, warps)``.
    ``trainable``: for training (see the module doc); otherwise the encoder is put in eval mode
    and the fused projection is a frozen copy (inference only). ``pooling="tokens"`` returns
    every token's last hidden state ``[T, H]`` (for MLM heads).
    """

    def __init__(self, bert: nn.Module, pooling: str = "cls", attention: str = "auto",
                 gelu_epilogue: bool = False,
                 attention_blocks: tuple[int, int, int, int] | None = None, trainable: bool = False) -> None:
        super().__init__()
        reason = packed_support(bert)
        if reason is not None:
            raise ValueError(f"packed {'training' if trainable else 'encoding'} is not available for this "
                             f"encoder: {reason}")
        if pooling not in ("cls", "mean", "tokens"):
            raise ValueError(f"pooling must be 'cls', 'mean' or 'tokens', got {pooling!r}")
        if attention not in ("auto", "varlen", "triton", "padded"):
            raise ValueError(f"attention must be 'auto', 'varlen', 'triton' or 'padded', got {attention!r}")
        cfg = bert.config
        self.bert_config = cfg
        self.pooling = pooling
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.gelu_epilogue = bool(gelu_epilogue)
        if self.gelu_epilogue and trainable:
            raise ValueError("gelu_epilogue is for inference only (its GELU is the tanh form)")
        if self.gelu_epilogue and cfg.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"gelu_epilogue needs a GELU encoder, this one uses {cfg.hidden_act!r}")
        from transformers.activations import ACT2FN

        self.act = ACT2FN[cfg.hidden_act]
        self.embeddings = bert.embeddings
        self.embeddings_project = getattr(bert, "embeddings_project", None)  # ELECTRA, embedding size != hidden
        self.layers = bert.encoder.layer
        # One [3H, H] projection per layer: for inference a frozen copy (the only weights copied);
        # for training built from the live weights per call (see _qkv).
        self.trainable = bool(trainable)
        self.qkv_weight = nn.ParameterList()
        self.qkv_bias = nn.ParameterList()
        for layer in ([] if self.trainable else self.layers):
            s = layer.attention.self
            self.qkv_weight.append(nn.Parameter(torch.cat([s.query.weight, s.key.weight, s.value.weight]).detach(),
                                                requires_grad=False))
            self.qkv_bias.append(nn.Parameter(torch.cat([s.query.bias, s.key.bias, s.value.bias]).detach(),
                                              requires_grad=False))
        self.attention = attention
        self.attention_blocks = tuple(attention_blocks) if attention_blocks else DEFAULT_BLOCKS
        if not self.trainable:
            self.eval()

    # -- pieces ----------------------------------------------------------------------------
    def _qkv(self, i: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.trainable:
            return F.linear(x, self.qkv_weight[i], self.qkv_bias[i])
        s = layer.attention.self
        return F.linear(x, torch.cat([s.query.weight, s.key.weight, s.value.weight]),
                        torch.cat([s.query.bias, s.key.bias, s.value.bias]))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                seq_index: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                queries_are_first_tokens: bool, dropout_p: float = 0.0) -> torch.Tensor:
        """``q`` ``[Tq, heads, d]`` (every token, or only each text's first) against ``k``/``v`` ``[T, heads, d]``."""
        n = cu_seqlens.numel() - 1
        kernel = self.attention_kernel(q)
        if self.trainable and kernel == "triton":
            cu_q = torch.arange(n + 1, dtype=torch.int32, device=q.device) if queries_are_first_tokens else cu_seqlens
            return packed_attention_train(q, k, v, cu_q, cu_seqlens, dropout_p)
        if kernel != "padded":
            cu_q = torch.arange(n + 1, dtype=torch.int32, device=q.device) if queries_are_first_tokens else cu_seqlens
            if kernel == "triton":
                return packed_attention(q, k, v, cu_q, cu_seqlens, self.attention_blocks)
            return _varlen_attn()(q, k, v, cu_q, cu_seqlens, 1 if queries_are_first_tokens else max_len, max_len)
        # Padded fallback: scatter into [N, L, heads, d], SDPA with a key-padding mask, gather back.
        slot = seq_index * max_len + positions

        def padded(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(n * max_len, *x.shape[1:])
            out[slot] = x
            return out.view(n, max_len, *x.shape[1:]).transpose(1, 2)  # [N, heads, L, d]

        # From the lengths, not by writing True at ``slot``: a Python scalar put by index is copied
        # from the host, a synchronising transfer on CUDA.
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        key_mask = (torch.arange(max_len, device=q.device) < lengths[:, None]).view(n, 1, 1, max_len)
        kp, vp = padded(k), padded(v)
        if queries_are_first_tokens:
            qp = q[:, :, None, :]  # [N, heads, 1, d]
            return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_mask, dropout_p=dropout_p)[:, :, 0]
        out = F.scaled_dot_product_attention(padded(q), kp, vp, attn_mask=key_mask, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(n * max_len, *q.shape[1:])[slot]

    def attention_kernel(self, q: torch.Tensor) -> str:
        """The attention this encoder runs on queries like ``q``: "triton", "varlen" or "padded"."""
        if self.trainable:  # training: our Triton kernel (dropout, backward) or SDPA on padded q/k/v
            if self.attention == "triton":
                return "triton"
            switched = getattr(self.bert_config, "_attn_implementation", None) == HF_ATTENTION  # fused_attention
            if self.attention != "auto" or not switched or q.dtype not in (torch.float16, torch.bfloat16) \
                    or not kernel_head_dim(self.head_dim):
                return "padded"
            return "triton" if triton_available(q.device) else "padded"
        if self.attention != "auto":
            return self.attention
        if q.dtype not in (torch.float16, torch.bfloat16):  # fp32: SDPA, not tensor-core TF32 kernels
            return "padded"
        if triton_available(q.device):
            return "triton"
        return "varlen" if varlen_available(q.device) else "padded"

    def _feed_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        inter = layer.intermediate.dense
        if self.gelu_epilogue:
            h = torch._addmm_activation(inter.bias, x, inter.weight.t(), use_gelu=True)
        else:
            h = self.act(inter(x))
        return layer.output(h, x)  # dense, dropout, residual add, LayerNorm (fused_norm may have fused them)

    def _layer(self, i: int, layer: nn.Module, x: torch.Tensor, positions: torch.Tensor, seq_index: torch.Tensor,
               cu_seqlens: torch.Tensor, max_len: int, cls_only: bool) -> torch.Tensor:
        """One BERT layer on packed rows ``x`` (with ``cls_only``: returns each text's first row only)."""
        qkv = self._qkv(i, layer, x).view(-1, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        if cls_only:  # the pooled vector reads only the [CLS] rows of the last layer
            first = cu_seqlens[:-1].long()
            q, x = q[first], x[first]
        self_attn = layer.attention.self
        dropout_p = self_attn.dropout.p if self_attn.training else 0.0
        ctx = self._attend(q, k, v, positions, seq_index, cu_seqlens, max_len, cls_only,
                           dropout_p).reshape(x.shape[0], -1)
        x = layer.attention.output(ctx, x)  # BertSelfOutput: dense, dropout, residual add, LayerNorm
        return self._feed_forward(layer, x)

    def _run(self, i: int, layer: nn.Module, x: torch.Tensor, positions: torch.Tensor, seq_index: torch.Tensor,
             cu_seqlens: torch.Tensor, max_len: int, cls_only: bool) -> torch.Tensor:
        args = (i, layer, x, positions, seq_index, cu_seqlens, max_len, cls_only)
        if self.trainable and getattr(layer, "gradient_checkpointing", False) and layer.training \
                and torch.is_grad_enabled():  # the BERT's activation checkpointing, honoured here
            return torch.utils.checkpoint.checkpoint(self._layer, *args, use_reentrant=False)
        return self._layer(*args)

    def run_layer(self, layer: nn.Module, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Any BERT layer (e.g. SimLM's decoder layers) on packed rows ``x`` ``[T, H]`` of ``batch``'s
        texts, every row out (trainable encoders only: their projections read the layer's weights)."""
        if not self.trainable:
            raise ValueError("run_layer needs a trainable PackedBertEncoder (its q/k/v copies are this BERT's)")
        return self._run(-1, layer, x, batch.positions, batch.seq_index, batch.cu_seqlens, batch.max_len, False)

    # -- forward ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The BERT embedding block (word + position + token type, LayerNorm, dropout) on packed
        tokens ``[T]`` -> ``[T, E]``; token type 0 where ``token_type_ids`` is None, as BERT's."""
        emb = self.embeddings
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(positions)
        if token_type_ids is not None:
            x = x + emb.token_type_embeddings(token_type_ids)
        else:
            x = x + emb.token_type_embeddings.weight[0]
        return emb.dropout(emb.LayerNorm(x))

    def encode(self, batch: PackedBatch) -> torch.Tensor:
        """Pooled ``[N, H]`` vectors of ``batch``'s texts, in batch order (not normalised)."""
        return self(batch.input_ids, batch.positions, batch.seq_index, batch.cu_seqlens, batch.max_len,
                    batch.token_type_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_index: torch.Tensor,
                cu_seqlens: torch.Tensor, max_len: int, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The fields of a :class:`PackedBatch` (plain tensors, for ``torch.compile``) -> ``[N, H]``."""
        x = self.embed(input_ids, positions, token_type_ids)
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            cls_only = i == last and self.pooling == "cls"
            x = self._run(i, layer, x, positions, seq_index, cu_seqlens, max_len, cls_only)
        if self.pooling in ("cls", "tokens"):
            return x
        n = cu_seqlens.numel() - 1
        sums = x.new_zeros(n, x.shape[1]).index_add_(0, seq_index, x)
        counts = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).to(x.dtype)
        return sums / counts[:, None]
