"""Training losses of the SimLM recipe, as pure functions on tensors (no model, no I/O).

Conventions shared by every function here:

* A *group* is the list of passages scored for one query, positive first: ``[pos, neg, neg, ...]``.
  Passage embeddings of a batch are laid out group after group, so the positive of query ``i``
  sits at row ``i * group_size`` of the passage matrix.
* Scores are logits: for the retriever ``q . p / t`` (the temperature is applied by
  :func:`contrastive_scores`), for the re-ranker whatever the cross-encoder outputs.

How these map to the authors' code (microsoft/unilm ``simlm/src/models/biencoder_model.py``):

* ``contrastive_loss`` is their cross-entropy over ``q @ p.T`` (each query against every passage
  of the batch: its own hard negatives plus all in-batch passages). Their default
  ``full_contrastive_loss=True`` (used by the released scripts) also appends, per query ``i``,
  the similarities positive_i . q_j, q_i . q_j and positive_i . positive_j for ``j != i`` as extra
  negatives; ``full_contrastive=True`` reproduces that.
* ``kd_loss`` is their ``KLDivLoss(reduction="batchmean", log_target=True)`` between
  ``log_softmax(teacher)`` and ``log_softmax(student group scores)``. The student group scores
  are gathered from the same score matrix as the contrastive loss, i.e. they ARE already divided
  by the retriever temperature ``t`` (0.02); the teacher (re-ranker) logits enter as they are
  (temperature 1). ``teacher_temperature`` generalises the latter and defaults to 1.
* ``distill_loss`` = ``kd_loss + contrastive_weight * contrastive`` (``kd_cont_loss_weight`` 0.2
  in ``train_kd_biencoder.sh``; hard negatives are NOT masked from the contrastive term there,
  ``kd_mask_hn False``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "contrastive_scores",
    "contrastive_loss",
    "group_indices",
    "group_scores",
    "listwise_ce",
    "kd_loss",
    "distill_loss",
]


def contrastive_scores(
    q: torch.Tensor,
    p: torch.Tensor,
    temperature: float | torch.Tensor,
    full_contrastive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of the in-batch contrastive loss.

    ``q``: ``[B, D]`` query embeddings; ``p``: ``[B * G, D]`` passage embeddings, group after group.
    Returns ``scores`` ``[B, B*G]`` (``[B, B*G + 3B]`` with ``full_contrastive``) equal to
    similarity / temperature, and ``labels`` ``[B]`` = ``i * G`` (each query's positive).
    """
    if q.dim() != 2 or p.dim() != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"expected q [B, D] and p [B*G, D]; got {tuple(q.shape)} and {tuple(p.shape)}")
    b = q.shape[0]
    if b == 0 or p.shape[0] % b != 0:
        raise ValueError(f"{p.shape[0]} passages cannot be split into groups for {b} queries")
    g = p.shape[0] // b
    labels = torch.arange(b, device=q.device, dtype=torch.long) * g
    scores = q @ p.t()
    if full_contrastive:
        pos = p[labels]  # [B, D]: each query's positive
        eye = torch.eye(b, dtype=torch.bool, device=q.device)
        neg_inf = torch.finfo(scores.dtype).min
        kq = (pos @ q.t()).masked_fill(eye, neg_inf)  # positive_i . q_j
        qq = (q @ q.t()).masked_fill(eye, neg_inf)  # q_i . q_j
        kk = (pos @ pos.t()).masked_fill(eye, neg_inf)  # positive_i . positive_j
        scores = torch.cat([scores, kq, qq, kk], dim=1)
    return scores / temperature, labels


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    group_size: int,
    temperature: float,
    full_contrastive: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of each query against all ``B * G`` passages of the batch.

    The target of query ``i`` is passage ``i * group_size``. ``group_size`` must match the layout
    of ``p`` (checked).
    """
    if p.shape[0] != q.shape[0] * group_size:
        raise ValueError(f"p has {p.shape[0]} rows; expected {q.shape[0]} queries x group {group_size}")
    scores, labels = contrastive_scores(q, p, temperature, full_contrastive)
    return F.cross_entropy(scores.float(), labels)


def group_indices(batch_size: int, group_size: int, start: int = 0, device=None) -> torch.Tensor:
    """``[B, G]`` column indices of each query's own group in a ``[B, N*G]`` score matrix.

    ``start`` is the column of the first group (``rank * B * G`` for a rank's rows of a
    gathered matrix).
    """
    idx = torch.arange(group_size, device=device).unsqueeze(0) + start
    return idx + torch.arange(batch_size, device=device).unsqueeze(1) * group_size


def group_scores(scores: torch.Tensor, group_size: int, start: int = 0) -> torch.Tensor:
    """Each query's own group scores ``[B, G]`` out of a ``[B, >= B*G]`` score matrix."""
    idx = group_indices(scores.shape[0], group_size, start, device=scores.device)
    return scores.gather(1, idx)


def listwise_ce(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each row of ``[B, G]`` scores, the positive at index 0."""
    labels = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), labels)


def kd_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    teacher_temperature: float = 1.0,
) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student))``, averaged over queries (batchmean).

    ``student_scores`` are the retriever's logits for the group, already divided by its
    temperature (as in the authors' code); only the teacher is scaled here.
    """
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"student {tuple(student_scores.shape)} vs teacher {tuple(teacher_scores.shape)}")
    log_student = F.log_softmax(student_scores.float(), dim=-1)
    log_teacher = F.log_softmax(teacher_scores.float() / teacher_temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def distill_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    teacher_scores: torch.Tensor,
    group_size: int,
    temperature: float,
    contrastive_weight: float = 0.2,
    teacher_temperature: float = 1.0,
    full_contrastive: bool = False,
) -> torch.Tensor:
    """Distillation loss of the final retriever: ``kd + contrastive_weight * contrastive``.

    ``teacher_scores``: ``[B, G]`` re-ranker logits for each query's group (positive first).
    """
    scores, labels = contrastive_scores(q, p, temperature, full_contrastive)
    if teacher_scores.shape != (q.shape[0], group_size) or p.shape[0] != q.shape[0] * group_size:
        raise ValueError(
            f"teacher scores {tuple(teacher_scores.shape)} / passages {p.shape[0]} do not match "
            f"{q.shape[0]} queries x group {group_size}"
        )
    kd = kd_loss(group_scores(scores, group_size), teacher_scores, teacher_temperature)
    ce = F.cross_entropy(scores.float(), labels)
    return kd + contrastive_weight * ce
