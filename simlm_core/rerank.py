"""Inference with the trained cross-encoder: re-rank a first-stage run, score distillation teachers.

* :func:`rerank_run` re-scores each query's top-k of a run (the authors re-rank the round-1
  retriever's top 200 on MS MARCO dev) and writes a new run ranked by the re-ranker's score.
* :func:`score_teacher` scores, for each training query of one contiguous shard of the negatives
  table, its positives and its first ``num_negatives`` mined negatives; the distilled retriever
  draws its groups (1 positive + 23 negatives) from exactly these scored candidates.
  :func:`merge_score_shards` concatenates shard outputs (in shard order).

Both stream: pairs are fetched from the corpus and scored in chunks, outputs are written
atomically, and no more than one chunk of passage text is held as Python strings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from simlm_core.io import (
    NEGATIVES_SCHEMA,
    SCORES_SCHEMA,
    InputError,
    ParquetStreamWriter,
    PassageStore,
    load_queries,
    read_run,
    write_run,
)
from simlm_core.modeling.reranker import DEFAULT_MAX_LEN, CrossEncoder, format_passage, resolve_device


@dataclass
class RerankArgs:
    """Re-rank a run with a cross-encoder (``python -m simlm_core.drivers.rerank``)."""

    model_dir: str
    corpus_path: str
    queries_path: str
    run_path: str
    out_run_path: str
    top_k: int = 200
    batch_size: int = 128
    max_len: int = DEFAULT_MAX_LEN
    device: str = "auto"
    bf16: bool = True
    chunk_pairs: int = 16384
    """Pairs fetched from the corpus and scored per chunk (bounds memory)."""
    packed: bool | None = None
    """Score padding-free (BERT / ELECTRA cross-encoders; None: wherever possible)."""


@dataclass
class ScoreTeacherArgs:
    """Teacher scores for distillation (``python -m simlm_core.drivers.score_teacher``)."""

    model_dir: str
    corpus_path: str
    queries_path: str
    negatives_path: str
    out_path: str
    num_negatives: int = 23
    """Mined negatives scored per query (the first ones in the table); -1 scores all of them."""
    shard_index: int = 0
    num_shards: int = 1
    batch_size: int = 128
    max_len: int = DEFAULT_MAX_LEN
    device: str = "auto"
    bf16: bool = True
    queries_per_chunk: int = 1024
    packed: bool | None = None
    """Score padding-free (BERT / ELECTRA cross-encoders; None: wherever possible)."""


def _score_in_chunks(encoder: CrossEncoder, qids: Sequence[str], pids: Sequence[str], queries: dict[str, str],
                     store: PassageStore, chunk_pairs: int, desc: str, **score_kwargs) -> np.ndarray:
    scores = np.empty(len(qids), dtype=np.float32)
    for start in tqdm(range(0, len(qids), chunk_pairs), desc=desc, unit="chunk", mininterval=10,
                      disable=len(qids) <= chunk_pairs):
        end = min(start + chunk_pairs, len(qids))
        passages = [format_passage(t, x) for t, x in store.get(pids[start:end])]
        qtexts = [queries[q] for q in qids[start:end]]
        scores[start:end] = encoder.score_pairs(qtexts, passages, show_progress=False, **score_kwargs)
    return scores


def _check_queries(qids: Sequence[str], queries: dict[str, str], queries_path: str | Path, source: str | Path) -> None:
    missing = sorted({q for q in qids if q not in queries})
    if missing:
        raise InputError(queries_path, f"{len(missing)} qid(s) of {source} have no query text, e.g. {missing[:5]}")


# ---------------------------------------------------------------------------------------------
def rerank_run(
    model_dir: str | Path,
    corpus_path: str | Path,
    queries_path: str | Path,
    run_path: str | Path,
    out_run_path: str | Path,
    top_k: int = 200,
    batch_size: int = 128,
    max_len: int = DEFAULT_MAX_LEN,
    device: str = "auto",
    bf16: bool = True,
    chunk_pairs: int = 16384,
    packed: bool | None = None,
) -> dict[str, Any]:
    """Re-score each query's top ``top_k`` of ``run_path``; write them ranked by the new score.

    The output run holds exactly the re-scored (qid, pid) pairs (the first-stage tail below
    ``top_k`` is dropped), ranks 1..k by descending re-ranker score, ties kept in first-stage order.
    """
    started = time.time()
    run = read_run(run_path)
    run = run.sort_values(["qid", "rank"], kind="stable")
    top = run.groupby("qid", sort=False).head(top_k).reset_index(drop=True)
    dup = top.duplicated(["qid", "pid"])
    if dup.any():
        row = top[dup].iloc[0]
        raise InputError(run_path, f"pid {row.pid} appears twice for qid {row.qid}")
    queries = load_queries(queries_path)
    _check_queries(top.qid.unique(), queries, queries_path, run_path)
    encoder = CrossEncoder.from_pretrained(model_dir)
    store = PassageStore(corpus_path)
    dev = resolve_device(device)
    qids = top.qid.tolist()
    scores = _score_in_chunks(encoder, qids, top.pid.tolist(), queries, store, chunk_pairs, "rerank",
                              batch_size=batch_size, max_len=max_len, device=dev, bf16=bf16, packed=packed)
    out = pd.DataFrame({"qid": top.qid, "pid": top.pid, "score": scores, "_first": top["rank"]})
    out = out.sort_values(["qid", "score", "_first"], ascending=[True, False, True], kind="stable")
    out["rank"] = (out.groupby("qid", sort=False).cumcount() + 1).astype(np.int32)
    write_run(out[["qid", "pid", "rank", "score"]], out_run_path)
    seconds = time.time() - started
    return {
        "queries": int(top.qid.nunique()),
        "pairs": int(len(top)),
        "top_k": top_k,
        "device": str(dev),
        "seconds": round(seconds, 3),
        "pairs_per_second": round(len(top) / seconds, 2) if seconds > 0 else None,
    }


# ---------------------------------------------------------------------------------------------
def shard_bounds(n_rows: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Rows [start, end) of a contiguous shard; shards partition 0..n_rows."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"bad shard {shard_index} of {num_shards}")
    return n_rows * shard_index // num_shards, n_rows * (shard_index + 1) // num_shards


def _iter_row_range(pf: pq.ParquetFile, start: int, end: int, columns: list[str],
                    batch_rows: int) -> Iterator[pa.Table]:
    """Rows [start, end) of a Parquet file in tables of <= batch_rows rows, skipping row groups."""
    offset = 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            table = pf.read_row_group(rg, columns=columns).slice(lo - offset, hi - lo)
            for s in range(0, table.num_rows, batch_rows):
                yield table.slice(s, batch_rows)
        offset += n
        if offset >= end:
            break


def teacher_pairs(table: pa.Table, num_negatives: int) -> tuple[list[str], list[str]]:
    """(qids, pids) to score: each query's positives, then its first ``num_negatives`` negatives.

    A pid listed twice for one query is scored once (first occurrence).
    """
    qids, pids = [], []
    for qid, positives, negatives in zip(table.column("qid").to_pylist(), table.column("positives").to_pylist(),
                                         table.column("negatives").to_pylist()):
        negatives = negatives or []
        if num_negatives >= 0:
            negatives = negatives[:num_negatives]
        seen: set[str] = set()
        for pid in (positives or []) + negatives:
            if pid not in seen:
                seen.add(pid)
                qids.append(qid)
                pids.append(pid)
    return qids, pids


def score_teacher(
    model_dir: str | Path,
    corpus_path: str | Path,
    queries_path: str | Path,
    negatives_path: str | Path,
    out_path: str | Path,
    num_negatives: int = 23,
    shard_index: int = 0,
    num_shards: int = 1,
    batch_size: int = 128,
    max_len: int = DEFAULT_MAX_LEN,
    device: str = "auto",
    bf16: bool = True,
    queries_per_chunk: int = 1024,
    packed: bool | None = None,
) -> dict[str, Any]:
    """Teacher scores (qid, pid, score) for one contiguous shard of the negatives table's rows."""
    started = time.time()
    try:
        pf = pq.ParquetFile(negatives_path)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(negatives_path, f"cannot read negatives Parquet: {e}") from e
    columns = [f.name for f in NEGATIVES_SCHEMA]
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(negatives_path, f"missing column(s) {missing}; has {pf.schema_arrow.names}")
    start, end = shard_bounds(pf.metadata.num_rows, shard_index, num_shards)
    queries = load_queries(queries_path)
    encoder = CrossEncoder.from_pretrained(model_dir)
    store = PassageStore(corpus_path)
    dev = resolve_device(device)
    n_queries = n_pairs = 0
    progress = tqdm(total=end - start, desc=f"teacher scores shard {shard_index}/{num_shards}", unit="query",
                    mininterval=10)
    with ParquetStreamWriter(out_path, SCORES_SCHEMA) as writer:
        for table in _iter_row_range(pf, start, end, columns, queries_per_chunk):
            table = table.cast(NEGATIVES_SCHEMA)
            qids, pids = teacher_pairs(table, num_negatives)
            _check_queries(qids, queries, queries_path, negatives_path)
            scores = _score_in_chunks(encoder, qids, pids, queries, store, max(len(qids), 1), "teacher",
                                      batch_size=batch_size, max_len=max_len, device=dev, bf16=bf16,
                                      packed=packed)
            writer.write({"qid": qids, "pid": pids, "score": scores})
            n_queries += table.num_rows
            n_pairs += len(qids)
            progress.update(table.num_rows)
    progress.close()
    seconds = time.time() - started
    return {
        "shard_index": shard_index,
        "num_shards": num_shards,
        "rows": [start, end],
        "queries": n_queries,
        "pairs": n_pairs,
        "device": str(dev),
        "seconds": round(seconds, 3),
        "pairs_per_second": round(n_pairs / seconds, 2) if seconds > 0 else None,
    }


def merge_score_shards(paths: Sequence[str | Path], out_path: str | Path) -> dict[str, Any]:
    """Concatenate teacher-score shards in the given order into one Parquet file (atomically).

    Refuses shards that share a qid (a sign of overlapping or duplicated shards).
    """
    seen: set[str] = set()
    rows = 0
    with ParquetStreamWriter(out_path, SCORES_SCHEMA) as writer:
        for path in paths:
            pf = pq.ParquetFile(path)
            missing = [f.name for f in SCORES_SCHEMA if f.name not in pf.schema_arrow.names]
            if missing:
                raise InputError(path, f"missing column(s) {missing}; has {pf.schema_arrow.names}")
            shard_qids: set[str] = set()
            for batch in pf.iter_batches(batch_size=65536, columns=[f.name for f in SCORES_SCHEMA]):
                table = pa.Table.from_batches([batch]).cast(SCORES_SCHEMA)
                shard_qids.update(table.column("qid").unique().to_pylist())
                writer.write(table)
                rows += table.num_rows
            overlap = seen & shard_qids
            if overlap:
                raise InputError(path, f"{len(overlap)} qid(s) also appear in an earlier shard, "
                                       f"e.g. {sorted(overlap)[:5]}")
            seen |= shard_qids
    return {"shards": len(paths), "rows": rows, "queries": len(seen)}
