"""Tests of simlm_core.demo: determinism, shape, and that the task is what the pipeline needs
(BM25 moderate, a synonym-aware ranker far better: the gap a dense model can learn)."""
from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simlm_core import demo
from simlm_core.demo import generate_demo, normalise


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    summary = generate_demo(out)
    return out, summary, time.perf_counter() - start


def _load(out: Path, split: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return (pd.read_parquet(out / "corpus.parquet"), pd.read_parquet(out / "queries" / f"{split}.parquet"),
            pd.read_parquet(out / "qrels" / f"{split}.parquet"))


def bm25_mrr10(pids: list[str], docs: list[str], queries: list[str], targets: list[str],
               k1: float = 0.9, b: float = 0.4) -> float:
    """A plain BM25 (Anserini's defaults, whitespace tokens) and MRR@10 against one target each."""
    tokens = [d.split() for d in docs]
    lengths = np.array([len(t) for t in tokens], dtype=float)
    postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, toks in enumerate(tokens):
        for word, tf in Counter(toks).items():
            postings[word].append((i, tf))
    n, avg = len(docs), lengths.mean()
    rr = []
    for query, target in zip(queries, targets):
        scores = np.zeros(n)
        for word in set(query.split()):
            if word not in postings:
                continue
            idx = np.array([p[0] for p in postings[word]])
            tf = np.array([p[1] for p in postings[word]], dtype=float)
            idf = math.log(1 + (n - len(idx) + 0.5) / (len(idx) + 0.5))
            scores[idx] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[idx] / avg))
        top = [pids[i] for i in np.argsort(-scores, kind="stable")[:10]]
        rr.append(1 / (top.index(target) + 1) if target in top else 0.0)
    return float(np.mean(rr))


def test_deterministic_bytes(tmp_path):
    small = dict(num_passages=300, num_train_queries=150, num_dev_queries=30)
    generate_demo(tmp_path / "a", seed=5, **small)
    generate_demo(tmp_path / "b", seed=5, **small)
    generate_demo(tmp_path / "c", seed=6, **small)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert len(files) == 7
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "corpus.parquet").read_bytes() != (tmp_path / "c" / "corpus.parquet").read_bytes()


def test_shape_and_text(default_demo):
    out, summary, seconds = default_demo
    assert seconds < 5, f"generation took {seconds:.1f}s"
    assert summary["splits"] == ["train", "dev"] and summary["counts"]["corpus.parquet"] == 3000
    corpus = pd.read_parquet(out / "corpus.parquet")
    assert corpus.pid.is_unique and (corpus.title == "").all()
    words = corpus.text.str.split().str.len()
    assert words.min() >= 30 and words.max() <= 60
    qids = set()
    for split, n in (("train", 2000), ("dev", 200)):
        _, queries, qrels = _load(out, split)
        assert len(queries) == n and queries.qid.is_unique and not (qids & set(queries.qid))
        qids |= set(queries.qid)
        lengths = queries.text.str.split().str.len()
        assert lengths.min() >= 5 and lengths.max() <= 12
        # exactly one relevant passage per query, relevance 1, present in the corpus
        assert len(qrels) == n and qrels.qid.is_unique and set(qrels.qid) == set(queries.qid)
        assert (qrels.relevance == 1).all() and set(qrels.pid) <= set(corpus.pid)
        assert len(pd.read_parquet(out / "answers" / f"{split}.parquet")) == 0
    text = " ".join(corpus.text) + " " + " ".join(queries.text)
    assert re.fullmatch(r"[a-z ,.]+", text)  # lowercase real words and plain punctuation


def test_vocabulary_is_consistent():
    forms = [w for groups in demo.GROUPS.values() for group in groups for w in group]
    assert len(forms) == len(set(forms)), "a surface form in two concept groups"
    assert not set(forms) & set(demo.BACKGROUND), "background words must not be concept forms"
    assert all(len(g) >= 3 for groups in demo.GROUPS.values() for g in groups)
    assert normalise("the physician fixes a bike") == "the agent:doctor action:repairs a object:bicycle"


def test_dev_needs_the_synonyms_train_teaches(default_demo):
    """Every concept in a dev query appears in train queries too (mostly in other surface forms)."""
    out = default_demo[0]
    concepts = set(demo.concept_of().values())

    def used(split: str) -> set[str]:
        return {w for t in _load(out, split)[1].text for w in normalise(t).split() if w in concepts}

    dev, train = used("dev"), used("train")
    assert len(dev - train) <= 0.02 * len(dev)


def test_bm25_gap_is_learnable(default_demo):
    """BM25 on dev is moderate; BM25 on synonym-normalised text is far better (the learnable gap)."""
    out = default_demo[0]
    corpus, queries, qrels = _load(out, "dev")
    targets = dict(zip(qrels.qid, qrels.pid))
    pids, docs, qs = list(corpus.pid), list(corpus.text), list(queries.text)
    tg = [targets[q] for q in queries.qid]
    raw = bm25_mrr10(pids, docs, qs, tg)
    norm = bm25_mrr10(pids, [normalise(d) for d in docs], [normalise(q) for q in qs], tg)
    print(f"demo dev MRR@10: BM25 {raw:.3f}, synonym-normalised BM25 {norm:.3f}")
    assert 0.2 <= raw <= 0.6
    assert norm >= raw + 0.15


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_passages"):
        generate_demo(tmp_path, num_passages=10, num_train_queries=10, num_dev_queries=5)
    with pytest.raises(ValueError, match="passage_words"):
        generate_demo(tmp_path, passage_words=(60, 30))
