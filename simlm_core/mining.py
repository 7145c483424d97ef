"""Hard-negative mining from a retrieval run (DESIGN.md §4 "Mining").

For every query with at least one labelled positive, the negatives are the query's top-``k``
retrieved passages minus every labelled positive. The same code serves round 1 (a BM25 run) and
later rounds (a dense retriever's run).

Positions and the window
    A query's run rows are ordered by ``rank`` (ties keep their input order) and numbered
    0, 1, 2, ... : *position* ``p`` is the
    ``(p+1)``-th retrieved passage, i.e. rank 1 is position 0 in a 1-based run. Only positions
    ``< top_k`` are considered, and only positions in ``[window_start, window_end)`` become
    negatives. Positions are counted BEFORE positives are removed, so ``window_start=30`` always
    skips the retriever's first 30 hits (positives among them included), whatever the labels.
    A pid listed twice for one query (a faulty run) counts once, at its best position; the later
    copy still occupies its own position.

Which passages are excluded
    ``positives`` are the pids judged ``relevance >= min_relevance``. Excluded from the negatives
    are all pids judged ``relevance >= min(min_relevance, 1)``: with graded labels and
    ``min_relevance=2`` a "related" (1) passage is neither a positive nor ever a negative.

Sampling
    With ``num_negatives``, queries with more candidates keep a random subset of that size, in
    rank order. The choice for a query depends only on ``(seed, qid, positions)``: it does not
    change when other queries are added to or removed from the run.

Implementation: vectorised over the whole run with Arrow compute (string matching in C++, no
Python string objects per row) and NumPy (integer codes); no per-row or per-query Python loop.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from simlm_core.io import NEGATIVES_SCHEMA, InputError, PathLike, write_table

NUM_EXAMPLES = 5


def _as_string_array(values, name: str) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(values, from_pandas=True)
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    if values.null_count:
        raise ValueError(f"{values.null_count} null value(s) in column {name!r}")
    return values


def _column(frame, name: str):
    if isinstance(frame, pa.Table):
        return frame.column(name)
    return frame[name]


def _int_column(frame, name: str) -> np.ndarray:
    col = _column(frame, name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.Array):
        if col.null_count:
            raise ValueError(f"{col.null_count} null value(s) in column {name!r}")
        return col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    arr = pd.Series(col)
    if arr.isna().any():
        raise ValueError(f"{int(arr.isna().sum())} null value(s) in column {name!r}")
    return arr.to_numpy(dtype=np.int64)


def _check_columns(frame, needed: Iterable[str], what: str) -> None:
    have = frame.column_names if isinstance(frame, pa.Table) else list(frame.columns)
    missing = [c for c in needed if c not in have]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; has {list(have)}")


def _codes(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Index of each value in ``value_set`` (int64), -1 where absent."""
    idx = pc.index_in(values, value_set=value_set)
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Stateless 64-bit mixing (SplitMix64 finaliser), vectorised; overflow wraps by design."""
    z = x.astype(np.uint64, copy=True)
    z += np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _bits(n: int) -> int:
    """Bits needed to store 0..n-1 (at least 1)."""
    return max(1, int(max(n, 1) - 1).bit_length())


def _string_fingerprints(arr: pa.Array, chunk_rows: int = 1 << 20) -> np.ndarray:
    """A 64-bit hash of every string, vectorised over the Arrow buffers (8 bytes per step).

    Used only to find repeated pids within a query (equal strings have equal fingerprints; a
    collision of two different pids of one query has probability ~ k^2 / 2^64).
    """
    if pa.types.is_large_string(arr.type):
        off_type = np.int64
    else:
        arr = arr.cast(pa.string()) if not pa.types.is_string(arr.type) else arr
        off_type = np.int32
    n = len(arr)
    out = np.empty(n, np.uint64)
    if n == 0:
        return out
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=off_type)[arr.offset : arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    masks = np.array([(1 << (8 * i)) - 1 for i in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
    for a in range(0, n, chunk_rows):
        b = min(n, a + chunk_rows)
        lo, hi = int(offsets[a]), int(offsets[b])
        seg = np.zeros(hi - lo + 8, np.uint8)
        seg[: hi - lo] = data[lo:hi]
        windows = np.lib.stride_tricks.as_strided(seg, shape=(hi - lo + 1, 8), strides=(1, 1))
        start, length = offsets[a:b] - lo, lengths[a:b]
        h = length.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        active = np.arange(b - a)
        j = 0
        while len(active):
            words = windows[start[active] + j].view("<u8").ravel()
            remaining = np.minimum(length[active] - j, 8)
            h[active] = _splitmix64(h[active] ^ (words & masks[remaining]))
            j += 8
            active = active[length[active] > j]
        out[a:b] = h
    return out


def _duplicate_pairs(group: np.ndarray, fingerprint: np.ndarray) -> np.ndarray:
    """Mask of rows whose (group, fingerprint) occurred at an earlier row (first one kept)."""
    n = len(group)
    dup = np.zeros(n, bool)
    if n < 2:
        return dup
    key = fingerprint ^ _splitmix64(group)
    sorted_key = np.sort(key)
    repeated = sorted_key[1:][sorted_key[1:] == sorted_key[:-1]]
    if len(repeated) == 0:  # the usual case: no repeats
        return dup
    repeated = np.unique(repeated)
    at = np.minimum(np.searchsorted(repeated, key), len(repeated) - 1)
    rows = np.flatnonzero(repeated[at] == key)  # the (few) rows sharing a key with another row
    order = rows[np.argsort(key[rows], kind="stable")]  # equal keys stay in row (= rank) order
    sk = key[order]
    dup[order[1:][sk[1:] == sk[:-1]]] = True
    return dup


def _order_by(group: np.ndarray, rank: np.ndarray | None, num_groups: int) -> np.ndarray:
    """Stable permutation sorting rows by (group, rank): one packed-integer sort when it fits."""
    n = len(group)
    ibits, gbits = _bits(n), _bits(num_groups)
    if rank is not None:
        rmin = int(rank.min())
        rbits = _bits(int(rank.max()) - rmin + 1)
    else:
        rbits = 0
    if ibits + gbits + rbits > 64:
        return np.lexsort((rank, group)) if rank is not None else np.argsort(group, kind="stable")
    key = group.astype(np.uint64) << np.uint64(rbits + ibits)
    if rank is not None:
        key |= (rank - rmin).astype(np.uint64) << np.uint64(ibits)
    key |= np.arange(n, dtype=np.uint64)  # the row number breaks ties: stable
    key.sort()  # SIMD sort of plain integers, far faster than argsort/lexsort
    key &= np.uint64((1 << ibits) - 1)
    return key.astype(np.int64)


def _within_group_index(sorted_codes: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a sorted integer array."""
    n = len(sorted_codes)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    lengths = np.diff(np.r_[starts, n])
    return np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)


def _list_array(values: pa.Array, group_codes: np.ndarray, num_groups: int) -> pa.Array:
    """A list<string> array of ``num_groups`` lists from values already sorted by group code."""
    counts = np.bincount(group_codes, minlength=num_groups)
    offsets = np.zeros(num_groups + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] < 2**31 - 1:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)


@dataclasses.dataclass
class _Labels:
    """What the qrels say, in integer codes over ``targets`` (the sorted qids with a positive)."""

    targets: pa.Array
    positives: pa.Array  # list<string> per target
    excluded_pids: pa.Array  # every pid judged relevant for some target
    excluded_pairs: np.ndarray  # sorted keys target_code * len(excluded_pids) + pid_code
    no_positive: pa.Array  # qids judged (or listed in ``queries``) without any positive
    ignored_qrels_queries: int
    qid_hash: np.ndarray | None = None  # per target, for sampling


def _prepare_labels(qrels, min_relevance: int, queries, seed: int | None) -> _Labels:
    _check_columns(qrels, ["qid", "pid", "relevance"], "qrels")
    q_qid = _as_string_array(_column(qrels, "qid"), "qrels.qid")
    q_pid = _as_string_array(_column(qrels, "pid"), "qrels.pid")
    q_rel = _int_column(qrels, "relevance")
    judged_qids = pc.unique(q_qid)
    if queries is not None:
        wanted = pc.unique(_as_string_array(list(queries), "queries"))
        keep = pc.is_in(q_qid, value_set=wanted)
        known = pc.sum(pc.is_in(judged_qids, value_set=wanted)).as_py() or 0
        ignored = int(len(judged_qids) - known)
        q_qid, q_pid = q_qid.filter(keep), q_pid.filter(keep)
        q_rel = q_rel[keep.to_numpy(zero_copy_only=False)]
        universe = wanted
    else:
        ignored, universe = 0, judged_qids
    pos_mask = pa.array(q_rel >= min_relevance)
    targets = pc.unique(q_qid.filter(pos_mask))
    targets = targets.take(pc.sort_indices(targets))  # output order: sorted qid
    no_pos = universe.filter(pc.invert(pc.is_in(universe, value_set=targets)))

    # positives lists, sorted by (qid, pid), deduplicated
    pos_table = pa.table({"qid": q_qid.filter(pos_mask), "pid": q_pid.filter(pos_mask)})
    pos_table = pos_table.group_by(["qid", "pid"]).aggregate([])
    pos_table = pos_table.sort_by([("qid", "ascending"), ("pid", "ascending")])
    pos_codes = _codes(pos_table.column("qid").combine_chunks(), targets)
    positives = _list_array(pos_table.column("pid").combine_chunks(), pos_codes, len(targets))

    # excluded from negatives: judged relevant at any grade counted as relevant (>= 1)
    excl_mask = pa.array(q_rel >= min(min_relevance, 1))
    ex_pids = pc.unique(q_pid.filter(excl_mask))
    ex_q = _codes(q_qid.filter(excl_mask), targets)
    ex_p = _codes(q_pid.filter(excl_mask), ex_pids)
    n_ex = np.int64(max(len(ex_pids), 1))
    pairs = np.unique(ex_q[ex_q >= 0] * n_ex + ex_p[ex_q >= 0])
    qid_hash = None
    if seed is not None:
        qid_hash = pd.util.hash_array(np.asarray(targets.to_pylist(), dtype=object),
                                      hash_key=f"{seed & 0xFFFFFFFFFFFFFFFF:016x}")
    return _Labels(targets, positives, ex_pids, pairs, no_pos, ignored, qid_hash)


def _mine_part(run, labels: _Labels, window_start: int, stop: int, num_negatives: int | None,
               seed: int, timings: dict[str, float]) -> dict:
    """Mine one part of a run holding ALL rows of each of its queries. Integer codes out."""
    _check_columns(run, ["qid", "pid", "rank"], "run")
    n_targets = len(labels.targets)

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - since
        return now

    # --- restrict to target queries, order by (query, rank), number positions ------------------
    t = time.perf_counter()
    r_qid = _as_string_array(_column(run, "qid"), "run.qid")
    r_pid = _as_string_array(_column(run, "pid"), "run.pid")
    r_rank = _int_column(run, "rank")
    n_run_rows = len(r_qid)
    qcode = _codes(r_qid, labels.targets)
    del r_qid
    rows = np.flatnonzero(qcode >= 0)
    n_target_rows = len(rows)
    qcode, rank = qcode[rows], r_rank[rows]
    del r_rank
    t = lap("match_queries", t)
    order_kind = "sorted"
    if len(rows) > 1:
        starts = np.r_[True, qcode[1:] != qcode[:-1]]
        ascending = bool(np.all(np.diff(rank)[~starts[1:]] >= 0))
        grouped = int(starts.sum()) == len(np.unique(qcode[starts]))
        if not (ascending and grouped and np.all(qcode[1:] >= qcode[:-1])):
            order_kind = "grouped" if (ascending and grouped) else "unsorted"
            order = _order_by(qcode, None if order_kind == "grouped" else rank, n_targets)
            rows, qcode = rows[order], qcode[order]
            del order
        del starts
    del rank
    position = _within_group_index(qcode)  # 0-based, before any removal
    present = np.unique(qcode) if len(qcode) else np.zeros(0, np.int64)
    cut = position < stop  # rows past the top_k / window end play no part
    rows, qcode, position = rows[cut], qcode[cut], position[cut]
    del cut
    cand_pid = r_pid.take(pa.array(rows))
    del r_pid, rows
    t = lap("order", t)

    # a pid listed twice for one query counts once, at its best position (the copy keeps its slot)
    dup = _duplicate_pairs(qcode, _string_fingerprints(cand_pid))
    n_dup = int(dup.sum())
    t = lap("duplicates", t)

    # --- exclusion of judged-relevant pids ------------------------------------------------------
    n_ex = np.int64(max(len(labels.excluded_pids), 1))
    cand_code = _codes(cand_pid, labels.excluded_pids)  # -1 for the vast majority
    hit = np.flatnonzero(cand_code >= 0)
    is_excluded = np.zeros(len(qcode), bool)
    is_excluded[hit] = np.isin(qcode[hit] * n_ex + cand_code[hit], labels.excluded_pairs)
    del cand_code, hit
    in_window = position >= window_start
    positives_in_window = int((in_window & is_excluded).sum())
    keep = in_window & ~is_excluded & ~dup
    del is_excluded, in_window, dup
    t = lap("exclude", t)

    # --- sampling -------------------------------------------------------------------------------
    if num_negatives is not None:
        keep_idx = np.flatnonzero(keep)
        kq, kpos = qcode[keep_idx], position[keep_idx]
        key = _splitmix64(labels.qid_hash[kq] ^ _splitmix64(kpos.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF)))
        # One packed sort: query code (high bits) | random key | position (low bits); positions are
        # unique within a query, so (query, position) finds the row again after sorting.
        qbits, pbits = _bits(n_targets), _bits(stop)
        rbits = 64 - qbits - pbits
        if rbits < 16:
            raise ValueError(f"too many queries ({n_targets}) x top_k ({stop}) to sample in 64-bit keys")
        combined = kq.astype(np.uint64) << np.uint64(64 - qbits)
        combined |= (key >> np.uint64(64 - rbits)) << np.uint64(pbits)
        combined |= kpos.astype(np.uint64)
        combined.sort()
        sq = (combined >> np.uint64(64 - qbits)).astype(np.int64)
        chosen_pos = (combined & np.uint64((1 << pbits) - 1)).astype(np.int64)
        take = _within_group_index(sq) < num_negatives
        chosen = np.sort((sq[take] << np.int64(pbits)) | chosen_pos[take])
        kept_key = (kq << np.int64(pbits)) | kpos  # ascending: rows are in (query, position) order
        keep[keep_idx] = False
        keep[keep_idx[np.searchsorted(kept_key, chosen)]] = True
        del keep_idx, kq, kpos, key, combined, sq, chosen_pos, take, chosen, kept_key
    lap("sample", t)
    return {
        "run_rows": n_run_rows,
        "target_rows": n_target_rows,
        "duplicates": n_dup,
        "positives_in_window": positives_in_window,
        "order": order_kind,
        "present": present,
        "neg_q": qcode[keep],
        "neg_pid": cand_pid.filter(pa.array(keep)),
    }


def _check_args(top_k, window_start, window_end, num_negatives) -> int:
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if window_start < 0:
        raise ValueError(f"window_start must be >= 0, got {window_start}")
    if window_end is not None and window_end <= window_start:
        raise ValueError(f"window_end ({window_end}) must be > window_start ({window_start})")
    if num_negatives is not None and num_negatives <= 0:
        raise ValueError(f"num_negatives must be positive or None, got {num_negatives}")
    return min(top_k, window_end) if window_end is not None else top_k


def _assemble(labels: _Labels, parts: list[dict], params: dict, t0: float, timings: dict,
              run_order: str) -> tuple[pd.DataFrame, dict]:
    t = time.perf_counter()
    n_targets = len(labels.targets)
    in_run = np.zeros(n_targets, bool)
    for part in parts:
        in_run[part["present"]] = True
    neg_q = np.concatenate([p["neg_q"] for p in parts]) if parts else np.zeros(0, np.int64)
    values = (pa.concat_arrays([p["neg_pid"] for p in parts]) if parts else pa.array([], pa.string()))
    if len(neg_q) > 1 and not np.all(neg_q[1:] >= neg_q[:-1]):  # parts not in qid order
        order = _order_by(neg_q, None, n_targets)
        neg_q, values = neg_q[order], values.take(pa.array(order))
    negatives = _list_array(values, neg_q, n_targets)
    n_neg = np.bincount(neg_q, minlength=n_targets)
    out_mask = n_neg > 0
    missing = ~in_run
    no_neg = in_run & (n_neg == 0)
    table = pa.table({"qid": labels.targets, "positives": labels.positives, "negatives": negatives})
    table = table.filter(pa.array(out_mask))
    # Arrow-backed columns: no Python object per negative (100M of them at MS MARCO scale).
    df = table.to_pandas(types_mapper=pd.ArrowDtype)
    timings["assemble"] = timings.get("assemble", 0.0) + time.perf_counter() - t
    seconds = time.perf_counter() - t0

    def examples(mask: np.ndarray) -> list[str]:
        return labels.targets.filter(pa.array(mask)).slice(0, NUM_EXAMPLES).to_pylist()

    n_run_rows = sum(p["run_rows"] for p in parts)
    kept_counts = n_neg[out_mask]
    stats = {
        "params": params,
        "run_rows": n_run_rows,
        "run_rows_ignored": int(n_run_rows - sum(p["target_rows"] for p in parts)),
        "run_duplicate_rows_dropped": sum(p["duplicates"] for p in parts),
        "run_order": run_order,
        "run_parts": len(parts),
        "queries_with_positives": n_targets,
        "queries_in_output": int(out_mask.sum()),
        "queries_missing_from_run": int(missing.sum()),
        "queries_missing_from_run_examples": examples(missing),
        "queries_without_negatives": int(no_neg.sum()),
        "queries_without_negatives_examples": examples(no_neg),
        "queries_without_positives": int(len(labels.no_positive)),
        "queries_without_positives_examples": labels.no_positive.slice(0, NUM_EXAMPLES).to_pylist(),
        "qrels_queries_ignored": labels.ignored_qrels_queries,
        "positives_removed_from_window": sum(p["positives_in_window"] for p in parts),
        "negatives_total": int(n_neg.sum()),
        "negatives_per_query_mean": float(kept_counts.mean()) if len(kept_counts) else 0.0,
        "negatives_per_query_min": int(kept_counts.min()) if len(kept_counts) else 0,
        "negatives_per_query_max": int(kept_counts.max()) if len(kept_counts) else 0,
        "seconds": round(seconds, 3),
        "rows_per_s": round(n_run_rows / seconds, 1) if seconds > 0 else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    return df, stats


def mine_negatives(
    run: pd.DataFrame | pa.Table,
    qrels: pd.DataFrame | pa.Table,
    top_k: int = 200,
    window_start: int = 0,
    window_end: int | None = None,
    num_negatives: int | None = None,
    min_relevance: int = 1,
    seed: int = 42,
    queries: Iterable[str] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Negatives per query: its run's top-k minus all labelled positives (see the module doc).

    ``run``: ``qid, pid, rank`` (any row order; a pandas DataFrame or an Arrow table).
    ``qrels``: ``qid, pid, relevance``. ``queries``: optional qids to mine for (e.g. the
    training queries); qrels of other queries are ignored, listed queries without a positive
    are counted.

    Returns ``(table, stats)``. ``table`` has one row per query that keeps at least one negative,
    sorted by qid: ``qid``, ``positives`` (sorted), ``negatives`` (rank order); its columns are
    Arrow-backed (``pd.ArrowDtype``; a cell is a list). ``stats`` counts every query that was
    dropped, with a few examples: ``queries_missing_from_run``, ``queries_without_negatives``,
    ``queries_without_positives``, plus totals, ``rows_per_s`` and per-step ``timings``.
    """
    stop = _check_args(top_k, window_start, window_end, num_negatives)
    _check_columns(run, ["qid", "pid", "rank"], "run")
    t0 = time.perf_counter()
    labels = _prepare_labels(qrels, min_relevance, queries, seed if num_negatives else None)
    timings = {"labels": time.perf_counter() - t0}
    part = _mine_part(run, labels, window_start, stop, num_negatives, seed, timings)
    params = {"top_k": top_k, "window_start": window_start, "window_end": window_end,
              "num_negatives": num_negatives, "min_relevance": min_relevance, "seed": seed}
    return _assemble(labels, [part], params, t0, timings, part["order"])


def iter_run_parts(path: PathLike, part_rows: int = 20_000_000, batch_rows: int = 1_000_000) -> Iterator[pa.Table]:
    """Stream a run Parquet as tables of about ``part_rows`` rows that never split a query's rows.

    Needs the rows of each query to be contiguous (``io.write_run`` sorts by qid, rank).
    """
    pf = pq.ParquetFile(path)
    missing = [c for c in ("qid", "pid", "rank") if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; has {pf.schema_arrow.names}")
    buf: list[pa.RecordBatch] = []
    n_buf = 0
    for batch in pf.iter_batches(batch_size=max(1, min(batch_rows, part_rows)), columns=["qid", "pid", "rank"]):
        buf.append(batch)
        n_buf += batch.num_rows
        if n_buf < part_rows:
            continue
        table = pa.Table.from_batches(buf)
        qid = table.column("qid")
        not_last = np.flatnonzero(~pc.equal(qid, qid[-1]).to_numpy(zero_copy_only=False))
        cut = int(not_last[-1]) + 1 if len(not_last) else 0  # the last query may go on: keep it
        if cut:
            yield table.slice(0, cut)
            rest = table.slice(cut)
            buf, n_buf = rest.to_batches(), rest.num_rows
    if n_buf:
        yield pa.Table.from_batches(buf)


def mine_negatives_parquet(
    run_path: PathLike,
    qrels: pd.DataFrame | pa.Table,
    top_k: int = 200,
    window_start: int = 0,
    window_end: int | None = None,
    num_negatives: int | None = None,
    min_relevance: int = 1,
    seed: int = 42,
    queries: Iterable[str] | None = None,
    part_rows: int = 20_000_000,
) -> tuple[pd.DataFrame, dict]:
    """``mine_negatives`` over a run Parquet read in parts of ~``part_rows`` rows: same result,
    memory bounded by one part plus the output (for runs of 100M+ rows).

    The run must keep each query's rows together (any query order; ``write_run`` output does);
    a query split across parts is an ``InputError`` naming the file.
    """
    stop = _check_args(top_k, window_start, window_end, num_negatives)
    t0 = time.perf_counter()
    labels = _prepare_labels(qrels, min_relevance, queries, seed if num_negatives else None)
    timings = {"labels": time.perf_counter() - t0}
    seen = np.zeros(len(labels.targets), bool)
    parts, orders = [], []
    last_code = -1
    for table in iter_run_parts(run_path, part_rows):
        part = _mine_part(table, labels, window_start, stop, num_negatives, seed, timings)
        present = part["present"]
        if seen[present].any():
            again = labels.targets[int(present[seen[present]][0])].as_py()
            raise InputError(run_path, f"the run does not keep each query's rows together: query "
                             f"{again!r} appears in separate parts; sort it by qid (write_run does)")
        seen[present] = True
        orders.append(part["order"])
        if len(present) and present[0] < last_code:
            orders.append("grouped")
        if len(present):
            last_code = int(present[-1])
        parts.append(part)
        del table
    run_order = "unsorted" if "unsorted" in orders else "grouped" if "grouped" in orders else "sorted"
    params = {"top_k": top_k, "window_start": window_start, "window_end": window_end,
              "num_negatives": num_negatives, "min_relevance": min_relevance, "seed": seed,
              "part_rows": part_rows}
    return _assemble(labels, parts, params, t0, timings, run_order)


def write_negatives(df: pd.DataFrame | pa.Table, path: PathLike) -> None:
    """Write a negatives table (``qid, positives, negatives``) atomically with NEGATIVES_SCHEMA."""
    write_table(df, path, NEGATIVES_SCHEMA)


__all__ = ["iter_run_parts", "mine_negatives", "mine_negatives_parquet", "write_negatives"]
