"""Retriever training data: per-query groups (1 positive + hard negatives) and their batching.

Data flow: ``BiencoderDataset[i]`` -> ``{"query": str, "passages": [(title, text)] * G,
"teacher_scores": [G] (distillation only)}``; ``BiencoderCollator`` tokenises a list of those
into ``{"query": {...}, "passage": {...}, "teacher_scores": [B, G]}`` for ``BiEncoder.forward``.

Memory: pids of the negatives table and of teacher scores are turned into corpus ROW numbers
once, with Arrow's vectorised ``index_in`` (no Python object per pid), and kept as flat numpy
arrays with offsets, so MS MARCO's ~500k queries x 200 negatives cost a few hundred MB and are
shared copy-on-write by dataloader workers. The corpus itself stays an Arrow table.

Sampling (deterministic given seed, epoch and query index, whatever the worker order): the
positive is drawn uniformly from the query's positives, the ``G - 1`` negatives without
replacement from its negatives. The authors rotate through each list by ``epoch + seed``
(``loaders/loader_utils.py``); a seeded draw per (seed, epoch, query) serves the same purpose.
Too few negatives: contrastive mode fills the group with random corpus passages (never one of
the query's positives); distillation mode repeats scored negatives (a random passage has no
teacher score). Both are counted (``stats``). Duplicates are dropped, and so are negatives
that are also positives.

Passage text: by default ``tokenizer(title, text)`` as a sentence pair, exactly as the authors'
``biencoder_dataloader.py`` does (``[CLS] title [SEP] text [SEP]``, token type 1 for the text;
an empty title gives an empty first segment). ``passage_format="concat"`` instead feeds
``io.passage_text(title, text)`` as one sequence (sentence-transformers models were trained on
single sequences). The same function tokenises passages for corpus encoding (``encode.py``).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from simlm_core.io import (
    CORPUS_SCHEMA,
    NEGATIVES_SCHEMA,
    SCORES_SCHEMA,
    InputError,
    load_queries,
    passage_text,
)

PathLike = str | os.PathLike[str]

__all__ = [
    "BiencoderDataset",
    "BiencoderCollator",
    "tokenize_queries",
    "tokenize_passages",
]


# ---------------------------------------------------------------------------------------------
# Tokenisation shared by training and encoding
def tokenize_queries(tokenizer: Any, texts: Sequence[str], max_len: int, **kwargs: Any):
    return tokenizer(list(texts), max_length=max_len, truncation=True, **kwargs)


def passage_inputs(titles: Sequence[str | None], texts: Sequence[str], passage_format: str = "pair") -> list:
    """What the tokenizer is given per passage: ``(title, text)`` pairs, or one joined string."""
    if passage_format == "pair":
        return [(t or "", x) for t, x in zip(titles, texts)]
    if passage_format == "concat":
        return [passage_text(t, x) for t, x in zip(titles, texts)]
    raise ValueError(f"passage_format must be 'pair' or 'concat', got {passage_format!r}")


def tokenize_passages(
    tokenizer: Any,
    titles: Sequence[str | None],
    texts: Sequence[str],
    max_len: int,
    passage_format: str = "pair",
    **kwargs: Any,
):
    """Tokenise passages the one way training and encoding share (see the module docstring)."""
    inputs = passage_inputs(titles, texts, passage_format)
    if passage_format == "pair":
        return tokenizer([a for a, _ in inputs], text_pair=[b for _, b in inputs], max_length=max_len,
                         truncation=True, **kwargs)
    return tokenizer(inputs, max_length=max_len, truncation=True, **kwargs)


# ---------------------------------------------------------------------------------------------
def _read_checked(path: PathLike, schema: pa.Schema) -> pa.Table:
    try:
        table = pq.read_table(path, columns=[f.name for f in schema])
    except (pa.ArrowInvalid, KeyError, ValueError) as exc:
        have = pq.ParquetFile(path).schema_arrow.names if os.path.exists(path) else []
        raise InputError(path, f"cannot read columns {[f.name for f in schema]} (has {have}): {exc}") from exc
    return table


def _list_to_rows(
    column: pa.ChunkedArray, corpus_pids: pa.Array, path: PathLike, name: str, qids: Sequence[str], corpus_path: PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """A list<string> column of pids -> (flat corpus row numbers int64, offsets [n+1])."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = pc.list_flatten(arr)
    rows = pc.index_in(flat, value_set=corpus_pids)
    if rows.null_count:
        missing = np.flatnonzero(rows.is_null().to_numpy(zero_copy_only=False))
        first = int(missing[0])
        row = int(np.searchsorted(offsets, first, side="right") - 1)
        raise InputError(
            path,
            f"{len(missing)} {name} pid(s) are not in the corpus {corpus_path}; first: "
            f"{flat[first].as_py()!r} (row {row}, qid {qids[row]!r})",
        )
    return rows.to_numpy(zero_copy_only=False).astype(np.int64), offsets


class BiencoderDataset(torch.utils.data.Dataset):
    """One item per training query: its group of ``group_size`` passages, positive first."""

    def __init__(
        self,
        negatives_path: PathLike,
        queries_path: PathLike,
        corpus_path: PathLike,
        group_size: int,
        seed: int = 42,
        teacher_scores_path: PathLike | None = None,
    ) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (1 positive + negatives), got {group_size}")
        self.group_size = group_size
        self.seed = int(seed)
        self.epoch = 0
        self.distill = teacher_scores_path is not None

        # Corpus: an Arrow table (row numbers index it); no per-passage Python objects.
        # (The text columns stay chunked: a combined string array is limited to 2 GiB.)
        self.corpus = _read_checked(corpus_path, CORPUS_SCHEMA)
        if self.corpus.num_rows == 0:
            raise InputError(corpus_path, "corpus is empty")
        corpus_pids = self.corpus.column("pid").combine_chunks()
        if pc.count_distinct(corpus_pids).as_py() != len(corpus_pids):
            raise InputError(corpus_path, "duplicate pids in corpus")

        table = _read_checked(negatives_path, NEGATIVES_SCHEMA)
        self.qids: list[str] = table.column("qid").to_pylist()
        dup = [q for q, c in Counter(self.qids).items() if c > 1]
        if dup:
            raise InputError(negatives_path, f"{len(dup)} duplicate qid(s), e.g. {dup[:3]}")
        queries = load_queries(queries_path)
        missing = [q for q in self.qids if q not in queries]
        if missing:
            raise InputError(
                queries_path, f"{len(missing)} qid(s) of {negatives_path} have no query text, e.g. {missing[:3]}"
            )
        self.query_texts = [queries[q] for q in self.qids]
        del queries

        self.pos_rows, self.pos_off = _list_to_rows(
            table.column("positives"), corpus_pids, negatives_path, "positive", self.qids, corpus_path
        )
        self.neg_rows, self.neg_off = _list_to_rows(
            table.column("negatives"), corpus_pids, negatives_path, "negative", self.qids, corpus_path
        )
        no_pos = np.flatnonzero(np.diff(self.pos_off) == 0)
        if len(no_pos):
            i = int(no_pos[0])
            raise InputError(
                negatives_path, f"{len(no_pos)} query(ies) have no positive passage; first: row {i}, qid {self.qids[i]!r}"
            )
        del table

        self.usable = np.arange(len(self.qids))
        self.skipped_no_teacher = 0
        if self.distill:
            self._load_teacher(teacher_scores_path, corpus_pids, corpus_path)

        need = group_size - 1
        n_neg = self._available_negatives()
        short = n_neg[self.usable] < need
        self.stats = {
            "queries": int(len(self.usable)),
            "queries_skipped_no_teacher_scores": int(self.skipped_no_teacher),
            "queries_short_of_negatives": int(short.sum()),
            "fill_passages_per_epoch": int(np.maximum(need - n_neg[self.usable], 0).sum()),
            "fill_kind": "repeated scored negatives" if self.distill else "random corpus passages",
        }
        # Counted in whichever process builds the items (the main one with 0 workers).
        self.filled = 0

    # -- teacher scores -----------------------------------------------------------------------
    def _load_teacher(self, path: PathLike, corpus_pids: pa.Array, corpus_path: PathLike) -> None:
        t = _read_checked(path, SCORES_SCHEMA)
        qidx = pc.index_in(t.column("qid"), value_set=pa.array(self.qids, pa.string()))
        keep = qidx.is_valid()
        t = t.filter(keep)
        qidx = pc.filter(qidx, keep)
        prow = pc.index_in(t.column("pid"), value_set=corpus_pids)
        if prow.null_count:
            first = int(np.flatnonzero(prow.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(path, f"{prow.null_count} pid(s) not in the corpus {corpus_path}; first: "
                             f"{t.column('pid')[first].as_py()!r}")
        q = qidx.to_numpy(zero_copy_only=False).astype(np.int64)
        r = prow.to_numpy(zero_copy_only=False).astype(np.int64)
        s = pc.cast(t.column("score"), pa.float32()).to_numpy().astype(np.float32)
        if np.isnan(s).any():
            raise InputError(path, "teacher scores contain NaN")
        order = np.lexsort((r, q))
        self.t_q, self.t_rows, self.t_scores = q[order], r[order], s[order]
        self.t_off = np.searchsorted(self.t_q, np.arange(len(self.qids) + 1))
        usable = []
        self.n_scored_neg = np.zeros(len(self.qids), dtype=np.int64)
        for i in range(len(self.qids)):
            pos, neg = self._scored_candidates(i)
            self.n_scored_neg[i] = len(neg)
            if len(pos) and len(neg):
                usable.append(i)
        self.skipped_no_teacher = len(self.qids) - len(usable)
        if not usable:
            raise InputError(path, "no training query has teacher scores for both a positive and a negative")
        if self.skipped_no_teacher:
            print(
                f"[simlm] {self.skipped_no_teacher} of {len(self.qids)} queries lack teacher scores for a "
                f"positive or every negative; they are left out of distillation"
            )
        self.usable = np.asarray(usable, dtype=np.int64)

    def _teacher_lookup(self, i: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, scores) of corpus ``rows`` among query ``i``'s teacher scores."""
        a, b = self.t_off[i], self.t_off[i + 1]
        tr = self.t_rows[a:b]
        at = np.searchsorted(tr, rows)
        at_c = np.minimum(at, max(len(tr) - 1, 0))
        found = (at < len(tr)) & (tr[at_c] == rows) if len(tr) else np.zeros(len(rows), dtype=bool)
        scores = self.t_scores[a:b][at_c] if len(tr) else np.zeros(len(rows), dtype=np.float32)
        return found, scores

    # -- candidates ---------------------------------------------------------------------------
    def _candidates(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.unique(self.pos_rows[self.pos_off[i] : self.pos_off[i + 1]])
        neg = np.unique(self.neg_rows[self.neg_off[i] : self.neg_off[i + 1]])
        return pos, neg[~np.isin(neg, pos)]

    def _scored_candidates(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        pos, neg = self._candidates(i)
        return pos[self._teacher_lookup(i, pos)[0]], neg[self._teacher_lookup(i, neg)[0]]

    def _available_negatives(self) -> np.ndarray:
        """Negatives each query can draw from (scored ones in distillation)."""
        if self.distill:
            return self.n_scored_neg
        return np.diff(self.neg_off)

    # -- Dataset API --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Called at each epoch start (by a Trainer callback / accelerate): new groups per epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.usable)

    def group_rows(self, idx: int) -> np.ndarray:
        """Corpus rows of item ``idx``'s group for the current epoch (positive first)."""
        i = int(self.usable[idx])
        rng = np.random.default_rng((self.seed, self.epoch, i))
        need = self.group_size - 1
        pos, neg = self._scored_candidates(i) if self.distill else self._candidates(i)
        positive = pos[rng.integers(len(pos))]
        if len(neg) >= need:
            chosen = rng.choice(neg, size=need, replace=False)
        elif self.distill:
            chosen = np.concatenate([rng.permutation(neg), rng.choice(neg, size=need - len(neg), replace=True)])
            self.filled += need - len(neg)
        else:
            k = need - len(neg)
            n = self.corpus.num_rows
            exclude = set(pos.tolist()) | set(neg.tolist())
            if n <= len(set(pos.tolist())):
                raise ValueError(f"query {self.qids[i]!r}: the corpus has no passage to fill its group with")
            allow_repeats = n - len(exclude) < k  # tiny corpora only
            fill: list[int] = []
            while len(fill) < k:
                r = int(rng.integers(n))
                if r in exclude and not (allow_repeats and r not in pos):
                    continue
                fill.append(r)
                if not allow_repeats:
                    exclude.add(r)
            chosen = np.concatenate([rng.permutation(neg), np.asarray(fill, dtype=np.int64)])
            self.filled += len(fill)
        return np.concatenate([[positive], chosen]).astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i = int(self.usable[idx])
        rows = self.group_rows(idx)
        sub = self.corpus.take(pa.array(rows))
        item: dict[str, Any] = {
            "query": self.query_texts[i],
            "passages": list(zip(sub.column("title").to_pylist(), sub.column("text").to_pylist())),
        }
        if self.distill:
            found, scores = self._teacher_lookup(i, rows)
            assert found.all()
            item["teacher_scores"] = scores.astype(np.float32)
        return item


# ---------------------------------------------------------------------------------------------
@dataclass
class BiencoderCollator:
    """Tokenise a list of dataset items into one padded batch (queries and grouped passages).

    Each side also carries ``num_tokens`` (a Python int: its real tokens), which packed training
    uses so that it never reads the mask back from the device."""

    tokenizer: Any
    q_max_len: int = 32
    p_max_len: int = 144
    passage_format: str = "pair"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        group = len(features[0]["passages"])
        if any(len(f["passages"]) != group for f in features):
            raise ValueError("all items of a batch must have the same group size")
        pad = dict(padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        query = tokenize_queries(self.tokenizer, [f["query"] for f in features], self.q_max_len, **pad)
        titles = [t for f in features for t, _ in f["passages"]]
        texts = [x for f in features for _, x in f["passages"]]
        passage = tokenize_passages(self.tokenizer, titles, texts, self.p_max_len, self.passage_format, **pad)
        # Token counts from the host copy: packed training builds its flat batch on the device
        # without reading the mask back (a host-device sync per encoder pass otherwise).
        batch: dict[str, Any] = {"query": {**query, "num_tokens": int(query["attention_mask"].sum())},
                                 "passage": {**passage, "num_tokens": int(passage["attention_mask"].sum())}}
        if "teacher_scores" in features[0]:
            batch["teacher_scores"] = torch.tensor(np.stack([f["teacher_scores"] for f in features]), dtype=torch.float32)
        return batch
