"""Losses against small hand-computed numbers (numpy / closed forms), no model involved."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simlm_core.losses import (
    contrastive_loss,
    contrastive_scores,
    distill_loss,
    group_indices,
    group_scores,
    kd_loss,
    listwise_ce,
)


def _np_ce(logits: np.ndarray, targets: list[int]) -> float:
    m = logits.max(axis=1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return float(-np.mean([logp[i, t] for i, t in enumerate(targets)]))


def test_contrastive_loss_two_queries_by_hand():
    # 2 queries, group size 2 -> 4 passages; unit vectors make the dot products obvious.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    t = 0.5
    # q0 . p = [1, 0, 0, 1] / 0.5 = [2, 0, 0, 2]; target 0.
    # q1 . p = [0, 1, 1, 0] / 0.5 = [0, 2, 2, 0]; target 2.
    # Each row: -log(e^2 / (2 e^2 + 2)).
    expected = -math.log(math.exp(2) / (2 * math.exp(2) + 2))
    got = contrastive_loss(q, p, group_size=2, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_random_matches_numpy():
    rng = np.random.default_rng(0)
    qn, pn = rng.normal(size=(3, 4)), rng.normal(size=(9, 4))
    logits = qn @ pn.T / 0.02
    expected = _np_ce(logits, [0, 3, 6])
    got = contrastive_loss(torch.tensor(qn), torch.tensor(pn), group_size=3, temperature=0.02)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_full_contrastive_adds_qq_kq_kk_terms():
    rng = np.random.default_rng(1)
    qn, pn = rng.normal(size=(2, 3)), rng.normal(size=(4, 3))
    t = 0.1
    pos = pn[[0, 2]]
    # Row i: q_i.p (all 4), then pos_i.q_j, q_i.q_j, pos_i.pos_j for j != i.
    rows = []
    for i in range(2):
        j = 1 - i
        rows.append(np.concatenate([qn[i] @ pn.T, [pos[i] @ qn[j]], [qn[i] @ qn[j]], [pos[i] @ pos[j]]]))
    expected = _np_ce(np.stack(rows) / t, [0, 2])
    got = contrastive_loss(torch.tensor(qn), torch.tensor(pn), 2, t, full_contrastive=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    scores, labels = contrastive_scores(torch.tensor(qn), torch.tensor(pn), t, full_contrastive=True)
    assert scores.shape == (2, 4 + 3 * 2)
    assert labels.tolist() == [0, 2]


def test_contrastive_loss_checks_layout():
    with pytest.raises(ValueError):
        contrastive_loss(torch.zeros(2, 3), torch.zeros(5, 3), group_size=2, temperature=1.0)


def test_listwise_ce_by_hand():
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    row0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    row1 = -math.log(1 / (1 + 2 * math.e))
    assert listwise_ce(scores).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_kd_loss_by_hand():
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    # Row 0: teacher (3/4, 1/4), student (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2).
    # Row 1: teacher (1/2, 1/2), student (e/(1+e), 1/(1+e)).
    s1 = np.array([math.e, 1.0]) / (1 + math.e)
    kl0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl1 = 0.5 * math.log(0.5 / s1[0]) + 0.5 * math.log(0.5 / s1[1])
    got = kd_loss(student, teacher)
    assert got.item() == pytest.approx((kl0 + kl1) / 2, rel=1e-6)  # batchmean: sum / B
    # identical distributions -> 0
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_teacher_temperature():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2.0 * math.log(3.0), 0.0]])  # / T=2 -> (3/4, 1/4)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(student, teacher, teacher_temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_group_scores_select_own_groups():
    scores = torch.arange(2 * 8, dtype=torch.float).view(2, 8)
    assert group_indices(2, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert group_scores(scores, 2, start=4).tolist() == [[4.0, 5.0], [14.0, 15.0]]


def test_distill_loss_is_kd_plus_weighted_contrastive():
    rng = np.random.default_rng(2)
    qn, pn = rng.normal(size=(2, 3)), rng.normal(size=(6, 3))
    teacher = rng.normal(size=(2, 3))
    t, w = 0.2, 0.2
    logits = qn @ pn.T / t
    ce = _np_ce(logits, [0, 3])
    student = np.stack([logits[0, 0:3], logits[1, 3:6]])  # already divided by t
    ps = np.exp(student - student.max(1, keepdims=True))
    ps /= ps.sum(1, keepdims=True)
    pt = np.exp(teacher - teacher.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    kd = float(np.sum(pt * (np.log(pt) - np.log(ps))) / 2)
    got = distill_loss(torch.tensor(qn), torch.tensor(pn), torch.tensor(teacher), 3, t, contrastive_weight=w)
    assert got.item() == pytest.approx(kd + w * ce, rel=1e-5)
