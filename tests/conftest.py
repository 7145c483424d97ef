"""Shared fixtures: a tiny BERT (random weights, word-level vocab) and a tiny retrieval dataset.

Both are built offline in a session temp dir, deterministically. Other test modules may use the
fixtures ``tiny_bert_dir`` and ``tiny_dataset`` directly, or call ``make_tiny_bert(dir)`` /
``make_tiny_dataset(dir)`` to build private copies.

The dataset: 10 topics x 4 passages (40 passages, pids ``p00``..``p39``); 20 queries (2 per
topic, qids ``q00``..``q19``) made of two of their topic's keywords; each query has one positive
(a passage of its topic, which contains those keywords) and 12 negatives from other topics.
Teacher scores: positive 8 + noise, negatives in [-2, 2]. A model can learn it in a few dozen
steps, which the training tests rely on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP spinning
# made one tiny-BERT training step 25x slower (757 ms with 2 threads vs 28 ms with 1). Override
# with SIMLM_TEST_THREADS. Subprocesses started by tests inherit OMP_NUM_THREADS.
_THREADS = os.environ.get("SIMLM_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)

import torch  # noqa: E402

torch.set_num_threads(int(_THREADS))

from simlm_core.io import (  # noqa: E402
    CORPUS_SCHEMA,
    NEGATIVES_SCHEMA,
    QRELS_SCHEMA,
    QUERIES_SCHEMA,
    SCORES_SCHEMA,
    write_table,
)

TOPICS = [
    ["apple", "banana", "cherry", "grape"],
    ["river", "lake", "ocean", "stream"],
    ["guitar", "piano", "violin", "drum"],
    ["soccer", "tennis", "hockey", "golf"],
    ["python", "java", "rust", "kotlin"],
    ["lion", "tiger", "zebra", "giraffe"],
    ["paris", "london", "berlin", "madrid"],
    ["rain", "snow", "storm", "wind"],
    ["doctor", "nurse", "hospital", "medicine"],
    ["rocket", "planet", "comet", "galaxy"],
]
FILLER = ["the", "a", "of", "and", "is", "in", "about", "with", "for", "on", "this", "that", "some"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = sorted({w for t in TOPICS for w in t} | set(FILLER))
    return SPECIAL + words + letters + ["##" + c for c in letters] + [str(d) for d in range(10)]


def make_tiny_bert(path: str | os.PathLike[str], hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised BertModel + its word-level tokenizer to ``path``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = Path(path)
    vocab = tiny_vocab()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=160,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@dataclass
class TinyDataset:
    root: Path
    corpus_path: Path
    queries_path: Path
    qrels_path: Path
    negatives_path: Path
    teacher_scores_path: Path
    num_passages: int
    num_queries: int


def make_tiny_dataset(root: str | os.PathLike[str], seed: int = 0) -> TinyDataset:
    root = Path(root)
    rng = np.random.default_rng(seed)
    corpus = []
    for t, words in enumerate(TOPICS):
        for j in range(4):
            pid = f"p{4 * t + j:02d}"
            kws = list(rng.permutation(words)[:3])
            filler = list(rng.choice(FILLER, size=5))
            body = " ".join(rng.permutation(kws + filler))
            corpus.append((pid, f"{words[j]} {words[(j + 1) % 4]}", body))
    corpus_df = pd.DataFrame(corpus, columns=["pid", "title", "text"])
    corpus_df.loc[3, "title"] = ""  # one passage without a title
    queries, qrels, negs, scores = [], [], [], []
    for t, words in enumerate(TOPICS):
        for k in range(2):
            qid = f"q{2 * t + k:02d}"
            pos_pid = f"p{4 * t + k:02d}"
            # the positive's title holds words[k], words[k+1]: the query asks for them
            queries.append((qid, f"{words[k]} {words[(k + 1) % 4]}"))
            qrels.append((qid, pos_pid, 1))
            others = [p for p in corpus_df.pid if not (4 * t <= int(p[1:]) < 4 * t + 4)]
            neg = list(rng.choice(others, size=12, replace=False))
            negs.append((qid, [pos_pid], neg))
            scores.append((qid, pos_pid, float(8 + rng.normal())))
            scores += [(qid, p, float(rng.uniform(-2, 2))) for p in neg]
    paths = dict(
        corpus_path=root / "corpus.parquet",
        queries_path=root / "queries.parquet",
        qrels_path=root / "qrels.parquet",
        negatives_path=root / "negatives.parquet",
        teacher_scores_path=root / "teacher_scores.parquet",
    )
    write_table(corpus_df, paths["corpus_path"], CORPUS_SCHEMA)
    write_table(pd.DataFrame(queries, columns=["qid", "text"]), paths["queries_path"], QUERIES_SCHEMA)
    write_table(pd.DataFrame(qrels, columns=["qid", "pid", "relevance"]), paths["qrels_path"], QRELS_SCHEMA)
    write_table(pd.DataFrame(negs, columns=["qid", "positives", "negatives"]), paths["negatives_path"], NEGATIVES_SCHEMA)
    write_table(pd.DataFrame(scores, columns=["qid", "pid", "score"]), paths["teacher_scores_path"], SCORES_SCHEMA)
    return TinyDataset(root=root, num_passages=len(corpus_df), num_queries=len(queries), **paths)


def biencoder_train_values(ds: TinyDataset, bert: str | os.PathLike[str], tmp_path: Path, **over) -> dict:
    """Retriever-training arguments for a quick run on the tiny dataset; ``over`` replaces any."""
    values = dict(
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        model_name_or_path=str(bert),
        corpus_path=str(ds.corpus_path),
        queries_path=str(ds.queries_path),
        negatives_path=str(ds.negatives_path),
        train_group_size=4,
        q_max_len=16,
        p_max_len=32,
        temperature=0.05,
        learning_rate=1e-3,
        warmup_steps=0,
        num_train_epochs=10,
        per_device_train_batch_size=4,
        logging_steps=5,
        save_steps=1000,
        disable_tqdm=True,
    )
    values.update(over)
    return values


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (hidden 32, 2 layers) + tokenizer, saved with ``save_pretrained``."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    """Corpus / queries / qrels / negatives / teacher scores Parquet files (see module doc)."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))
