"""Dense retriever: one shared Hugging Face encoder for queries and passages (SimLM's setting).

Score = (pooled query) . (pooled passage) / t, with the pooled vectors L2-normalised by default,
as in the authors' code (``l2_normalize`` defaults to True there and the released scripts keep
it; ``t`` = 0.02). Pooling is the last layer's [CLS] vector (``cls``, SimLM) or the masked mean of
the last layer (``mean``, e.g. for sentence-transformers MiniLM).

A saved retriever is a plain HF model directory (``config.json`` + ``model.safetensors`` +
tokenizer files, loadable by ``AutoModel.from_pretrained``) plus ``biencoder_config.json``, which
records pooling / normalisation / temperature / passage formatting so that encoding uses exactly
what training used.

Multi-GPU (DDP) and the loss scaling
------------------------------------
With ``gather_across_ranks`` and an initialised process group, every rank all-gathers the query
and passage embeddings of all ranks; its own slice is replaced by the local tensor so gradients
flow into the local encoder pass (:func:`gather_with_local_grad`). Each rank then computes the
contrastive cross-entropy of ALL ``W*B`` queries against ALL ``W*B*G`` passages (the global
batch's in-batch negatives), as the authors' ``use_scaled_loss`` does (their default, used by
the released scripts). Gradient scaling: rank ``r``'s loss ``L(all)`` back-propagates only
through rank ``r``'s embeddings, giving ``sum_{e on r} dL/de de/dtheta``; DDP AVERAGES over
ranks, so the sum over ranks -- the full single-process gradient ``dL/dtheta`` -- is divided by
``W``. The authors multiply the loss by ``W`` to undo that; we multiply only the gradient
flowing into the local slices by ``W`` (:func:`scale_grad`), which is the same gradient while
the logged loss stays the true global loss. (Computing only the local queries' rows instead
would drop the gradient that other ranks' queries send into this rank's passages.) The KD term
of distillation depends only on a rank's own queries and groups, so it is computed from the
local tensors without scaling; DDP's average of the per-rank means is the global mean.
``tests/test_biencoder.py`` checks both against a single process by simulating the ranks with
:func:`biencoder_loss`. ``loss_scale`` is the authors' option of the same name: the factor on the
contrastive gradient through the local slices (None: ``W``, their default). Their NQ scripts set
1, which leaves DDP's average, i.e. the global contrastive gradient divided by ``W``, against an
unscaled KD term.

Temperature warm-up (the authors' ``t_warmup``, used by their NQ scripts): the similarity scale
``1 / t`` grows linearly with the optimizer step up to the warm-up's end, never below 1:
``max(1, min(1, step / warmup) / t)``. The current temperature lives in a buffer that a
:class:`~transformers.TrainerCallback` updates in place before each step, so compiled graphs and
CUDA-graph replays read it without recompiling.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput

from simlm_core.losses import contrastive_scores, group_scores, kd_loss
from simlm_core.modeling.sdpa_mask import encoder_attention_mask

POOLINGS = ("cls", "mean")
PASSAGE_FORMATS = ("pair", "concat")
CONFIG_NAME = "biencoder_config.json"

__all__ = [
    "BiEncoder",
    "BiEncoderConfig",
    "BiEncoderOutput",
    "CONFIG_NAME",
    "pool",
    "gather_with_local_grad",
    "all_gather",
    "all_gather_with_grad",
    "biencoder_loss",
    "scale_grad",
    "load_biencoder_config",
    "warmed_up_temperature",
]


@dataclass
class BiEncoderConfig:
    """What encoding needs to reproduce training: written as ``biencoder_config.json``."""

    pooling: str = "cls"
    normalize: bool = True
    temperature: float = 0.02
    passage_format: str = "pair"
    """``pair``: tokenizer(title, text) as a sentence pair (the authors' way); ``concat``:
    io.passage_text(title, text) as one sequence."""
    q_max_len: int = 32
    p_max_len: int = 144

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.passage_format not in PASSAGE_FORMATS:
            raise ValueError(f"passage_format must be one of {PASSAGE_FORMATS}, got {self.passage_format!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def load_biencoder_config(model_dir: str | os.PathLike[str]) -> BiEncoderConfig | None:
    """The ``biencoder_config.json`` of a local model dir, or None (a raw HF model / hub id)."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(BiEncoderConfig)}
    return BiEncoderConfig(**{k: v for k, v in values.items() if k in known})


@dataclass
class BiEncoderOutput(ModelOutput):
    loss: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    """``[B, W*B*G]`` this rank's queries against every passage of the (global) batch, / t."""
    q_reps: torch.Tensor | None = None
    p_reps: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    """The unscaled global contrastive cross-entropy (for logging)."""
    kd_loss: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Pure functions
def pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[N, L, D]`` hidden states -> ``[N, D]``: first token (``cls``) or masked mean (``mean``)."""
    if pooling == "cls":
        return last_hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
        return (last_hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def gather_with_local_grad(local: torch.Tensor, gathered: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """Concatenate all ranks' tensors, using ``local`` (which carries the graph) for ``rank``.

    ``gathered`` is what ``all_gather`` returned (no gradient); the result is ``[W*N, ...]``.
    """
    shapes = {tuple(t.shape) for t in gathered}
    if len(shapes) != 1 or tuple(local.shape) not in shapes:
        raise ValueError(f"ranks hold tensors of different shapes {sorted(shapes)}; local {tuple(local.shape)}")
    parts = list(gathered)
    parts[rank] = local
    return torch.cat(parts, dim=0)


def all_gather(local: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every rank's copy of ``local`` (no gradient) and this rank's index, over the default group."""
    import torch.distributed as dist

    local_c = local.detach().contiguous()
    buf = [torch.empty_like(local_c) for _ in range(dist.get_world_size())]
    dist.all_gather(buf, local_c)
    return buf, dist.get_rank()


def all_gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """``[W*N, ...]`` all ranks' tensors, gradient flowing into this rank's slice only."""
    gathered, rank = all_gather(local)
    return gather_with_local_grad(local, gathered, rank)


def _distributed_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``factor``."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


def warmed_up_temperature(temperature: float, step: int, warmup_steps: int) -> float:
    """The temperature at optimizer step ``step`` under the authors' ``t_warmup``:
    ``1 / max(1, min(1, step / warmup_steps) / temperature)`` (``temperature`` itself once warm)."""
    if warmup_steps <= 0:
        return temperature
    return 1.0 / max(1.0, min(1.0, step / warmup_steps) / temperature)


def biencoder_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    teacher_scores: torch.Tensor | None = None,
    contrastive_weight: float = 0.2,
    teacher_temperature: float = 1.0,
    full_contrastive: bool = False,
    world_q: Sequence[torch.Tensor] | None = None,
    world_p: Sequence[torch.Tensor] | None = None,
    rank: int = 0,
    loss_scale: float | None = None,
) -> BiEncoderOutput:
    """One rank's training loss (see the module docstring for the DDP gradient scaling).

    ``q`` ``[B, D]``, ``p`` ``[B*G, D]`` are this rank's embeddings. ``world_q`` / ``world_p``:
    every rank's embeddings as all-gathered (None: single process). The loss VALUE is the
    global batch's loss (``kd`` averaged over this rank's queries), so logs read the same for
    any number of ranks. Scores are computed in fp32 outside autocast: with t = 0.02 a bf16
    cosine's rounding error would be ~0.2 in the logits. ``temperature`` may be a 0-dim tensor
    (the warm-up's buffer). ``loss_scale``: the contrastive gradient's factor (None: ``W``).
    """
    b = q.shape[0]
    if b == 0 or p.shape[0] % b:
        raise ValueError(f"{p.shape[0]} passages for {b} queries: not whole groups")
    g = p.shape[0] // b
    world = 1 if world_q is None else len(world_q)
    # Default: gradient x W through this rank's slice, so that DDP's average over ranks yields the
    # single-process gradient of the global contrastive loss.
    grad_factor = float(world) if loss_scale is None else float(loss_scale)
    if world_q is None:
        all_q, all_p, rank = scale_grad(q, grad_factor), scale_grad(p, grad_factor), 0
    else:
        assert world_p is not None and len(world_q) == len(world_p)
        all_q = gather_with_local_grad(scale_grad(q, grad_factor), world_q, rank)
        all_p = gather_with_local_grad(scale_grad(p, grad_factor), world_p, rank)
    # The meta device (on which tests check that a step never reads data back) has no autocast. A
    # device-type test, not torch.amp.is_autocast_available: Dynamo cannot trace that call, and
    # the graph break split every compiled step in two.
    with (torch.autocast(device_type=q.device.type, enabled=False)
          if q.device.type != "meta" else contextlib.nullcontext()):
        scores, labels = contrastive_scores(all_q.float(), all_p.float(), temperature, full_contrastive)
        ce = F.cross_entropy(scores, labels)
        kd = None
        if teacher_scores is not None:
            # Each query's own group only involves this rank's tensors: no gradient scaling.
            local_scores = (q.float() @ p.float().t()) / temperature
            student = group_scores(local_scores, g)
            kd = kd_loss(student, teacher_scores.to(student.device), teacher_temperature)
            loss = kd + contrastive_weight * ce
        else:
            loss = ce
        local = scores[rank * b : (rank + 1) * b, : world * b * g]
    return BiEncoderOutput(
        loss=loss,
        scores=local.detach(),
        q_reps=q,
        p_reps=p,
        contrastive_loss=ce.detach(),
        kd_loss=None if kd is None else kd.detach(),
    )


# ---------------------------------------------------------------------------------------------
class BiEncoder(nn.Module):
    """Shared-encoder dense retriever.

    ``forward(query=..., passage=..., teacher_scores=None)`` takes tokenised batches (dicts with
    ``input_ids``, ``attention_mask`` and optionally ``token_type_ids``; passages group after
    group, positive first) and returns :class:`BiEncoderOutput` with the contrastive loss, or the
    distillation loss ``kd + contrastive_weight * contrastive`` when teacher scores are given.
    """

    def __init__(
        self,
        encoder: PreTrainedModel,
        pooling: str = "cls",
        normalize: bool = True,
        temperature: float = 0.02,
        *,
        passage_format: str = "pair",
        q_max_len: int = 32,
        p_max_len: int = 144,
        full_contrastive: bool = False,
        contrastive_weight: float = 0.2,
        teacher_temperature: float = 1.0,
        gather_across_ranks: bool = True,
        tokenizer: Any = None,
        packed_training: bool = False,
        loss_scale: float | None = None,
        temperature_warmup: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        # No ``config`` attribute on purpose: the HF Trainer would treat this wrapper as an HF
        # model (token alignment, use_cache); the HF config is ``self.encoder.config``.
        self.bi_config = BiEncoderConfig(pooling, normalize, temperature, passage_format, q_max_len, p_max_len)
        self.full_contrastive = full_contrastive
        self.contrastive_weight = contrastive_weight
        self.teacher_temperature = teacher_temperature
        self.gather_across_ranks = gather_across_ranks
        if loss_scale is not None and loss_scale <= 0:
            raise ValueError(f"loss_scale must be > 0 (or None: the number of ranks), got {loss_scale}")
        self.loss_scale = loss_scale
        self.temperature_warmup = bool(temperature_warmup)
        if self.temperature_warmup:
            # The training loss's temperature, set before each step (set_training_step); not saved.
            self.register_buffer("training_temperature", torch.tensor(1.0), persistent=False)
        self.tokenizer = tokenizer
        self.packed_training = bool(packed_training)
        if self.packed_training:
            from simlm_core.modeling.packed import PackedBertEncoder

            # Raises, naming the reason, for an encoder it cannot pack. Kept out of the module tree:
            # it shares every weight with ``encoder`` (no state of its own to save or move), and
            # registering it would list each weight twice.
            object.__setattr__(self, "_packed_encoder",
                               PackedBertEncoder(encoder, pooling=pooling, trainable=True))
        # BERT-style encoders carry a pooler (dense + tanh over [CLS]) that our pooling never
        # uses. Freeze it: DDP (find_unused_parameters=False) requires every trainable parameter
        # to receive a gradient, and the saved model keeps its original pooler weights.
        pooler = getattr(encoder, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)

    # -- properties mirroring the config ------------------------------------------------------
    @property
    def pooling(self) -> str:
        return self.bi_config.pooling

    @property
    def normalize(self) -> bool:
        return self.bi_config.normalize

    @property
    def temperature(self) -> float:
        return self.bi_config.temperature

    def set_training_step(self, step: int, warmup_steps: int) -> None:
        """With ``temperature_warmup``: the loss's temperature for optimizer step ``step`` (in place)."""
        if self.temperature_warmup:
            self.training_temperature.fill_(warmed_up_temperature(self.temperature, step, warmup_steps))

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    # -- encoding -----------------------------------------------------------------------------
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        *,
        num_tokens: int | None = None,
    ) -> torch.Tensor:
        """``[N, D]`` pooled (and, if configured, L2-normalised) representations.

        The transformer gets the mask it takes without reading the batch back
        (:func:`~simlm_core.modeling.sdpa_mask.encoder_attention_mask`: none at all if the host's
        ``num_tokens``, the mask's sum, says there is no padding); pooling reads the 2D one.
        """
        kwargs = {"input_ids": input_ids,
                  "attention_mask": encoder_attention_mask(self.encoder.config, attention_mask, num_tokens)}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(**kwargs, return_dict=True)
        return self.normalized(pool(out.last_hidden_state, attention_mask, self.pooling))

    def normalized(self, emb: torch.Tensor) -> torch.Tensor:
        """Pooled vectors as this retriever scores them: L2-normalised (in fp32) if configured."""
        return F.normalize(emb.float(), dim=-1) if self.normalize else emb

    def _encode_batch(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        encode = self.encode_packed if self.packed_training and self.training else self.encode
        return encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                      num_tokens=batch.get("num_tokens"))

    def encode_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, num_tokens: int | None = None) -> torch.Tensor:
        """:meth:`encode` of a right-padded batch without computing its padding (training's path
        with ``packed_training``; same result as :meth:`encode` up to float rounding and dropout).
        ``num_tokens``: the mask's sum if the host knows it (the collator's), which spares a sync."""
        from simlm_core.modeling.packed import PackedBatch

        batch = PackedBatch.from_padded(input_ids, attention_mask, token_type_ids, num_tokens)
        return self.normalized(self._packed_encoder.encode(batch))

    def forward(
        self,
        query: Mapping[str, torch.Tensor] | None = None,
        passage: Mapping[str, torch.Tensor] | None = None,
        teacher_scores: torch.Tensor | None = None,
    ) -> BiEncoderOutput:
        q = self._encode_batch(query) if query is not None else None
        p = self._encode_batch(passage) if passage is not None else None
        if q is None or p is None:
            return BiEncoderOutput(q_reps=q, p_reps=p)
        world_q = world_p = None
        rank = 0
        if self.gather_across_ranks and _distributed_world() > 1:
            world_q, rank = all_gather(q)
            world_p, _ = all_gather(p)
        return biencoder_loss(
            q,
            p,
            temperature=self.training_temperature if self.temperature_warmup and self.training else self.temperature,
            teacher_scores=teacher_scores,
            contrastive_weight=self.contrastive_weight,
            teacher_temperature=self.teacher_temperature,
            full_contrastive=self.full_contrastive,
            world_q=world_q,
            world_p=world_p,
            rank=rank,
            loss_scale=self.loss_scale,
        )

    # -- activation checkpointing (called by the HF Trainer) ----------------------------------
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        kwargs = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        enable = getattr(self.encoder, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload)
        else:  # older transformers
            self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # -- persistence --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike[str],
        pooling: str | None = None,
        normalize: bool | None = None,
        temperature: float | None = None,
        *,
        passage_format: str | None = None,
        attn_implementation: str | None = "sdpa",
        dtype: torch.dtype | None = None,
        load_tokenizer: bool = True,
        **loss_options: Any,
    ) -> "BiEncoder":
        """Load a saved retriever, or wrap any HF encoder (local dir or hub id).

        Settings come from the arguments where given, else from ``biencoder_config.json``,
        else the SimLM defaults (cls pooling, L2-normalised, t = 0.02, title/text pair).
        ``loss_options``: ``full_contrastive``, ``contrastive_weight``, ``teacher_temperature``,
        ``gather_across_ranks``, ``loss_scale``, ``temperature_warmup``, ``q_max_len``, ``p_max_len``.
        """
        saved = load_biencoder_config(path_or_hub_id) if Path(path_or_hub_id).is_dir() else None
        base = saved or BiEncoderConfig()
        kwargs: dict[str, Any] = {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            encoder = AutoModel.from_pretrained(str(path_or_hub_id), attn_implementation=attn_implementation, **kwargs)
        except (ValueError, ImportError):  # architecture without SDPA support: use its default
            encoder = AutoModel.from_pretrained(str(path_or_hub_id), **kwargs)
        tokenizer = None
        if load_tokenizer:
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path_or_hub_id))
            except (OSError, ValueError):
                tokenizer = None
        return cls(
            encoder,
            pooling=pooling if pooling is not None else base.pooling,
            normalize=normalize if normalize is not None else base.normalize,
            temperature=temperature if temperature is not None else base.temperature,
            passage_format=passage_format if passage_format is not None else base.passage_format,
            q_max_len=loss_options.pop("q_max_len", base.q_max_len),
            p_max_len=loss_options.pop("p_max_len", base.p_max_len),
            tokenizer=tokenizer,
            **loss_options,
        )

    def save_pretrained(self, save_directory: str | os.PathLike[str], tokenizer: Any = None) -> None:
        """Write a plain HF model dir (safetensors) + tokenizer + ``biencoder_config.json``."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(str(out))
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is not None:
            tok.save_pretrained(str(out))
        (out / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.bi_config), indent=2) + "\n")
