"""Retrieval metrics: ir-measures (pytrec_eval, i.e. trec_eval semantics) plus DPR answer matching.

Metric definitions
------------------
Every name below is the key used in ``metrics/{system}/{split}.json`` and in the report's
``metrics.csv``. Relevance-judgment metrics are ir-measures names, printed exactly as
``str(ir_measures.parse_measure(name))``; ``Answer@k`` is our own name (see below).

=====================  ==========================================================================
name                   definition (per query, then the mean over the evaluated queries)
=====================  ==========================================================================
``RR@10``              reciprocal rank of the first relevant passage (relevance >= 1) among the
                       top 10, else 0. "MRR@10" of MS MARCO (the SimLM paper's headline metric).
``RR(rel=2)@10``       same, counting only relevance >= 2 as relevant: TREC DL's MRR@10.
``R@k``                TREC recall: |relevant retrieved in the top k| / |relevant judged| (0 when
                       a query has no relevant passage). MS MARCO R@50 / R@1k in the paper (the
                       authors' ``unilm/simlm/src/metrics.py`` calls pytrec_eval ``recall_k``).
``R(rel=2)@k``         TREC recall with relevance >= 2 as relevant (Anserini's ``-l 2`` for DL).
``nDCG@10``            trec_eval ``ndcg_cut_10``: graded labels, linear gain (gain = label),
                       log2 discount, ideal ranking from all judged passages.
``P@k``, ``AP``, ...   any other ir-measures name works too (trec_eval definitions).
``Answer@k``           DPR "top-k retrieval accuracy" (a HIT RATE, not recall): 1 if any of the
                       top k passages contains one of the question's answers, else 0. The paper's
                       NQ "R@20 / R@100". Matching is DPR's: pyserini's ``has_answers`` with
                       ``SimpleTokenizer`` in string (token sequence) mode, on the passage TEXT
                       only (no title), as DPR's ``qa_validation`` and pyserini's
                       ``evaluate_dpr_retrieval`` do. ir-measures has no name for this measure;
                       ``Answer@k`` follows its ``Name@cutoff`` pattern so it sits in the same
                       ``metric`` column of ``metrics.csv``.
=====================  ==========================================================================

Conventions shared by all metrics here:

* Ranking is by SCORE, descending; ties are broken by passage id descending (trec_eval's order).
  The ``rank`` column of a run is ignored, exactly as trec_eval ignores it.
* The mean is over every query of the reference (qrels or answers); a judged query with no
  retrieved passage scores 0 (trec_eval ``-c``). Judged queries with no relevant passage count,
  with a score of 0, as in trec_eval. Queries that appear only in the run are not evaluated; they
  are counted in ``num_queries`` by :func:`evaluate_split` so nothing is dropped silently.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from simlm_core.io import (
    ANSWERS_SCHEMA,
    QRELS_SCHEMA,
    InputError,
    PassageStore,
    read_run,
    read_table,
)

log = logging.getLogger(__name__)

#: Column names of our artifacts -> the names ir-measures expects, applied by
#: :func:`_to_ir_measures` only (runs reach ir-measures as {query_id: {doc_id: score}} dicts,
#: built by :func:`per_query` after fixing the trec_eval order).
IR_MEASURES_COLUMNS = {"qid": "query_id", "pid": "doc_id"}

#: Key prefix of the DPR answer-matching hit rate (``Answer@20``, ``Answer@100``).
ANSWER_PREFIX = "Answer@"
_ANSWER_RE = re.compile(r"^Answer@(\d+)$")

#: Short definitions, keyed by metric family; :func:`describe_metric` picks the right one.
METRIC_DEFINITIONS: dict[str, str] = {
    "RR": "reciprocal rank of the first relevant passage within the cutoff (MRR@k), else 0",
    "R": "TREC recall: relevant passages retrieved within the cutoff / all relevant judged",
    "nDCG": "trec_eval nDCG at the cutoff: graded labels, linear gain, log2 discount",
    "P": "precision: relevant passages within the cutoff / cutoff",
    "AP": "average precision (trec_eval map)",
    "Answer": "DPR top-k accuracy (hit rate): any of the top k passages' text contains an answer "
    "(token-level match, pyserini has_answers)",
}

# Per-dataset default measures (DESIGN §4, §4c). Dev of MS MARCO: the paper's MRR@10, R@50, R@1k.
MSMARCO_MEASURES = ["RR@10", "R@50", "R@1000"]
# TREC DL 2019/2020: nDCG@10 on graded labels; MRR and recall count label >= 2 as relevant.
TREC_DL_MEASURES = ["nDCG@10", "RR(rel=2)@10", "R(rel=2)@1000"]
# BEIR: its standard nDCG@10 plus the recall Anserini's BEIR regressions print.
BEIR_MEASURES = ["nDCG@10", "R@100", "R@1000"]
# Offline demo: the corpus is tiny (runs are shallow), so R@1000 says nothing; MS MARCO's pair
# RR@10 / R@50 plus R@100 and nDCG@10 give one headline number per family.
DEMO_MEASURES = ["RR@10", "R@50", "R@100", "nDCG@10"]
# NQ (DPR): the paper's R@20 / R@100 are answer hit rates.
NQ_MEASURES = ["Answer@20", "Answer@100"]

_TREC_DL_SPLIT = re.compile(r"^(trec[-_]?)?dl[-_]?(19|20|2019|2020)([-_].*)?$", re.IGNORECASE)


def is_trec_dl_split(split: str) -> bool:
    """True for TREC Deep Learning split names (``dl19``, ``dl20``, ``dl19-passage``, ``trec-dl-2019``)."""
    return bool(_TREC_DL_SPLIT.match(split or ""))


def default_measures(dataset_format: str, split: str) -> list[str]:
    """The metrics reported by default for a dataset format and split (see module docstring).

    ``msmarco``: ``dev`` (and any non-DL split) -> RR@10, R@50, R@1000; ``dl19``/``dl20`` ->
    nDCG@10, RR(rel=2)@10, R(rel=2)@1000. ``beir`` -> nDCG@10, R@100, R@1000. ``demo`` -> RR@10,
    R@50, R@100, nDCG@10. ``nq`` -> Answer@20, Answer@100 (answer hit rates).
    A TREC DL split name selects the DL measures whatever the format.
    """
    fmt = (dataset_format or "").lower()
    if is_trec_dl_split(split):
        return list(TREC_DL_MEASURES)
    table = {"msmarco": MSMARCO_MEASURES, "beir": BEIR_MEASURES, "demo": DEMO_MEASURES, "nq": NQ_MEASURES}
    if fmt not in table:
        raise ValueError(f"unknown dataset format {dataset_format!r}; expected one of {sorted(table)}")
    return list(table[fmt])


def describe_metric(name: str) -> str:
    """One-line definition of a metric name (for reports)."""
    m = _ANSWER_RE.match(name)
    if m:
        return METRIC_DEFINITIONS["Answer"]
    family = re.match(r"^([A-Za-z]+)", name)
    text = METRIC_DEFINITIONS.get(family.group(1) if family else "", "see ir-measures documentation")
    rel = re.search(r"rel=(\d+)", name)
    if rel:
        text += f"; relevant = label >= {rel.group(1)}"
    return text


def metric_cutoff(name: str) -> int | None:
    """The rank cutoff k of a metric name (``RR@10``, ``R(rel=2)@1000``, ``Answer@20``), or None
    where it has none (``AP``)."""
    m = re.search(r"@(\d+)$", name)
    return int(m.group(1)) if m else None


def answer_cutoff(name: str) -> int | None:
    """k of an ``Answer@k`` name, else None."""
    m = _ANSWER_RE.match(name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Relevance-judgment metrics (ir-measures)
def parse_measures(names: Iterable[str]) -> list:
    """Parse ir-measures names; raise ValueError naming the bad one."""
    import ir_measures

    out = []
    for name in names:
        if answer_cutoff(name) is not None:
            raise ValueError(f"{name!r} is an answer-matching metric: use answer_hits / evaluate_split")
        try:
            out.append(ir_measures.parse_measure(name))
        except Exception as exc:  # ir-measures raises several types for bad names
            raise ValueError(f"unknown ir-measures measure {name!r}: {exc}") from exc
    return out


def _arrow_run(run: pd.DataFrame, what: str = "run") -> pa.Table:
    """The run as an Arrow table qid: string, pid: string, score: float64 (no NaN scores)."""
    missing = [c for c in ("qid", "pid", "score") if c not in run.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; has {list(run.columns)}")

    def strings(col: pd.Series) -> pa.Array:
        try:
            arr = pa.array(col, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = pa.array(col.astype(str), from_pandas=True)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        return arr.cast(pa.string())

    table = pa.table(
        {
            "qid": strings(run["qid"]),
            "pid": strings(run["pid"]),
            "score": pa.array(run["score"].to_numpy(dtype="float64")),
        }
    )
    if table.num_rows and pc.any(pc.is_nan(table["score"])).as_py():
        raise ValueError(f"{what} has NaN scores")
    return table


def _check_qrels(qrels: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("qid", "pid", "relevance") if c not in qrels.columns]
    if missing:
        raise ValueError(f"qrels lack column(s) {missing}; has {list(qrels.columns)}")
    qrels = pd.DataFrame(
        {"qid": qrels["qid"].astype(str), "pid": qrels["pid"].astype(str), "relevance": qrels["relevance"].astype("int64")}
    )
    dup = qrels.duplicated(["qid", "pid"])
    if dup.any():
        first = qrels[dup].iloc[0]
        raise ValueError(f"qrels judge passage {first.pid} twice for query {first.qid}")
    return qrels


def _to_ir_measures(frame: pd.DataFrame) -> pd.DataFrame:
    """Rename our qid/pid columns to ir-measures' query_id/doc_id (the single place this happens)."""
    return frame.rename(columns=IR_MEASURES_COLUMNS)


def per_query(run: pd.DataFrame, qrels: pd.DataFrame, measures: Sequence[str]) -> pd.DataFrame:
    """Per-query values: index = every qrels query (sorted), columns = ``str(measure)``.

    Judged queries the run does not retrieve anything for get 0 (trec_eval ``-c``); run queries
    without judgments are left out. Passages are ranked by score, ties by pid descending
    (trec_eval's order; the ``rank`` column is unused) before any provider sees them. Values
    come from ir-measures' pytrec_eval provider where it supports the measure (R, nDCG, AP,
    P, ...), else from ir-measures' default choice (RR@k: its MS MARCO provider, the same
    definition as trec_eval's recip_rank over the top k).
    """
    import ir_measures

    parsed = parse_measures(measures)
    qrels = _check_qrels(qrels)
    judged = sorted(qrels["qid"].unique())
    names = [str(m) for m in parsed]
    if not parsed:
        return pd.DataFrame(index=pd.Index(judged, name="qid"))
    # Fix the ranking once, trec_eval's way (score desc, ties by pid desc), and hand the
    # providers strictly decreasing scores: ir-measures routes RR@k to its MS MARCO provider,
    # whose tie order differs from trec_eval's; with no ties left every provider agrees.
    table, starts = _ranked(run, keep_qids=judged)
    pids = table["pid"].to_pylist()
    qids = table["qid"].take(pa.array(starts)).to_pylist() if len(starts) else []
    ends = np.r_[starts[1:], table.num_rows].astype(np.int64) if len(starts) else starts
    slices = list(zip(qids, starts.tolist(), ends.tolist()))
    ir_qrels = _to_ir_measures(qrels)

    def run_dict(depth: int | None) -> dict[str, dict[str, float]]:
        # ir-measures' own DataFrame -> dict conversion goes row by row (minutes for MS MARCO);
        # the run goes in as its native dict-of-dicts form {query_id: {doc_id: score}} instead.
        out = {}
        for qid, a, b in slices:
            b = b if depth is None else min(b, a + depth)
            out[qid] = dict(zip(pids[a:b], np.arange(0.0, a - b, -1.0).tolist()))
        return out

    trec = ir_measures.providers.registry["pytrec_eval"]
    native = [m for m in parsed if trec.is_available() and trec.supports(m)]
    other = [m for m in parsed if m not in native]
    rows: list[tuple[str, str, float]] = []
    if slices:
        for provider, group in ((trec, native), (ir_measures, other)):
            if not group:
                continue
            # Every cutoff measure only looks at the top k: give the group its deepest cutoff.
            cutoffs = [m["cutoff"] if "cutoff" in m.params else None for m in group]
            depth = None if any(not isinstance(c, int) for c in cutoffs) else max(cutoffs)
            rows += [
                (r.query_id, str(r.measure), float(r.value))
                for r in provider.iter_calc(group, ir_qrels, run_dict(depth))
            ]
    table = pd.DataFrame(rows, columns=["qid", "measure", "value"])
    if table.empty:
        wide = pd.DataFrame(index=pd.Index([], name="qid"), columns=names, dtype="float64")
    else:
        wide = table.pivot_table(index="qid", columns="measure", values="value", aggfunc="first")
    # Zero-fill: judged queries missing from the run (or from a provider's output) score 0.
    wide = wide.reindex(index=judged, columns=names).fillna(0.0)
    wide.index.name = "qid"
    return wide


def evaluate_run(run: pd.DataFrame, qrels: pd.DataFrame, measures: list[str]) -> dict[str, float]:
    """Mean of each measure over all judged queries.

    ``run``: columns qid, pid, rank, score; ``qrels``: qid, pid, relevance. ``measures``:
    ir-measures names (``RR@10``, ``R@50``, ``nDCG@10``, ``RR(rel=2)@10``, ...). Returns
    ``{str(measure): value}`` (keys as ir-measures prints them).

    Passages are ranked by ``score`` descending with ties broken by pid descending, as
    trec_eval / pytrec_eval do: the run's ``rank`` column is NOT used (as in trec_eval), so a
    run whose ranks disagree with its scores is evaluated by its scores. Every query in
    ``qrels`` counts; one with no retrieved passage scores 0 (trec_eval ``-c``).
    """
    if len(qrels) == 0:
        raise ValueError("qrels are empty: nothing to evaluate against")
    table = per_query(run, qrels, measures)
    return {name: float(table[name].mean()) for name in table.columns}


def recall_grid(depth: int) -> list[int]:
    """Log-spaced cutoffs 1, 2, 5, 10, 20, 50, ... up to ``depth`` (``depth`` itself included)."""
    if depth < 1:
        return []
    ks: list[int] = []
    decade = 1
    while decade <= depth:
        ks += [k for k in (decade, 2 * decade, 5 * decade) if k <= depth]
        decade *= 10
    if ks[-1] != depth:
        ks.append(depth)
    return ks


def recall_measure(k: int, rel: int = 1) -> str:
    """ir-measures name of TREC recall at k with the given minimum relevance."""
    return f"R@{k}" if rel == 1 else f"R(rel={rel})@{k}"


def run_depth(run: pd.DataFrame) -> int:
    """The most passages the run holds for one query (0 for an empty run)."""
    return int(run.groupby("qid", sort=False).size().max()) if len(run) else 0


def recall_curve(run: pd.DataFrame, qrels: pd.DataFrame, ks: Sequence[int] | None = None, rel: int = 1) -> dict[int, float]:
    """TREC recall R@k for each k (default: :func:`recall_grid` up to the run's depth), via ir-measures."""
    if ks is None:
        ks = recall_grid(run_depth(run))
    if not ks:
        return {}
    names = [recall_measure(k, rel) for k in ks]
    values = evaluate_run(run, qrels, names)
    return {k: values[n] for k, n in zip(ks, names)}


# ---------------------------------------------------------------------------------------------
# Answer matching (DPR / NQ)
def _ranked(run: pd.DataFrame, depth: int | None = None, keep_qids=None) -> tuple[pa.Table, np.ndarray]:
    """Arrow table of the run sorted by qid, then score descending, then pid descending
    (trec_eval's order; Arrow compares strings bytewise like trec_eval's strcmp), optionally
    restricted to ``keep_qids`` and cut to ``depth`` per query; plus each query's start row."""
    table = _arrow_run(run)
    if keep_qids is not None:
        table = table.filter(pc.is_in(table["qid"], value_set=pa.array(sorted(keep_qids), pa.string())))
    if table.num_rows == 0:
        return table, np.zeros(0, dtype=np.int64)
    # Duplicate (qid, pid) check on hashed integer codes (cheaper than an Arrow group-by).
    qenc = pc.dictionary_encode(table["qid"].combine_chunks())
    penc = pc.dictionary_encode(table["pid"].combine_chunks())
    key = qenc.indices.to_numpy().astype(np.int64) * max(len(penc.dictionary), 1) + penc.indices.to_numpy()
    key_order = np.argsort(key, kind="stable")
    same = np.flatnonzero(key[key_order][1:] == key[key_order][:-1])
    if len(same):
        i = int(key_order[same[0]])
        raise ValueError(
            f"run lists passage {table['pid'][i].as_py()} twice for query {table['qid'][i].as_py()} "
            f"({len(same)} duplicates)"
        )
    order = pc.sort_indices(table, sort_keys=[("qid", "ascending"), ("score", "descending"), ("pid", "descending")])
    table = table.take(order)
    qid = table["qid"].combine_chunks()
    change = pc.not_equal(qid.slice(1), qid.slice(0, len(qid) - 1)).to_numpy(zero_copy_only=False)
    starts = np.r_[0, np.flatnonzero(change) + 1].astype(np.int64)
    if depth is not None:
        sizes = np.diff(np.r_[starts, table.num_rows])
        position = np.arange(table.num_rows) - np.repeat(starts, sizes)
        keep = position < depth
        table = table.filter(pa.array(keep))
        new_sizes = np.minimum(sizes, depth)
        starts = np.r_[0, np.cumsum(new_sizes)[:-1]].astype(np.int64)
    return table, starts


def rank_by_score(run: pd.DataFrame, depth: int | None = None) -> pd.DataFrame:
    """Run rows (qid, pid, score) grouped by query (qids in sorted order) and sorted within a
    query by score descending, ties by pid descending (trec_eval's order), cut to ``depth`` per
    query when given. Raises ValueError if a query lists a passage twice (trec_eval refuses)."""
    table, _ = _ranked(run, depth)
    return pd.DataFrame(
        {
            "qid": np.asarray(table["qid"].to_pylist(), dtype=object),
            "pid": np.asarray(table["pid"].to_pylist(), dtype=object),
            "score": table["score"].to_numpy(),
        }
    )


def _answers_map(answers: pd.DataFrame) -> dict[str, list[str]]:
    missing = [c for c in ("qid", "answers") if c not in answers.columns]
    if missing:
        raise ValueError(f"answers lack column(s) {missing}; has {list(answers.columns)}")
    out: dict[str, list[str]] = {}
    for qid, ans in zip(answers["qid"].astype(str), answers["answers"]):
        if ans is None or (isinstance(ans, float) and math.isnan(ans)):
            ans = []
        elif isinstance(ans, str):
            ans = [ans]
        if qid in out:
            raise ValueError(f"answers list question {qid} twice")
        out[qid] = [str(a) for a in ans]
    return out


def answer_first_hit(
    run: pd.DataFrame, answers: pd.DataFrame, store: PassageStore, depth: int = 100, batch_queries: int = 512
) -> dict[str, int | None]:
    """0-based rank of the first passage (by score) whose text contains an answer, per question
    of ``answers``; None if none of the top ``depth`` does (or nothing was retrieved)."""
    from pyserini.eval.evaluate_dpr_retrieval import SimpleTokenizer, has_answers

    tokenizer = SimpleTokenizer()
    amap = _answers_map(answers)
    ranked = rank_by_score(run, depth)
    ranked = ranked[ranked["qid"].isin(set(amap))]
    first: dict[str, int | None] = {qid: None for qid in amap}
    qids = ranked["qid"].unique()
    for start in range(0, len(qids), batch_queries):
        chunk = ranked[ranked["qid"].isin(set(qids[start : start + batch_queries]))]
        # Fetch the batch's passages in one Arrow take; DPR matches on the text, not the title.
        texts = [text or "" for _title, text in store.get(chunk["pid"].tolist())]
        pos = 0
        for qid, size in chunk.groupby("qid", sort=False).size().items():
            for i in range(size):
                if has_answers(texts[pos + i], amap[qid], tokenizer, regex=False):
                    first[qid] = i
                    break
            pos += size
    return first


def answer_hits(
    run: pd.DataFrame, answers: pd.DataFrame, store: PassageStore, ks: Sequence[int] = (20, 100)
) -> dict[str, float]:
    """DPR top-k accuracy: share of the ``answers`` questions with an answer in the top k.

    ``answers``: columns qid, answers (list of strings). ``store``: anything with
    ``get(pids) -> [(title, text)]`` (a :class:`simlm_core.io.PassageStore`). Matching is
    pyserini's ``has_answers`` with ``SimpleTokenizer`` (string mode: NFD-normalised, uncased
    token sequences), applied to the passage text only, not the title: pyserini's
    ``evaluate_dpr_retrieval`` takes ``ctx['text'].split('\\n')[1]`` ("[0] is title, [1] is
    text") and DPR's ``qa_validation`` matches the text field of its (text, title) tuples.
    Ranking is by score (ties by pid descending); questions with no retrieved passages are
    misses. Keys are ``Answer@{k}`` (our name; ir-measures has none for this hit rate).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"answer cutoffs must be positive integers, got {ks}")
    if len(answers) == 0:
        raise ValueError("answers are empty: nothing to evaluate against")
    first = answer_first_hit(run, answers, store, depth=ks[-1])
    n = len(first)
    return {f"{ANSWER_PREFIX}{k}": sum(1 for r in first.values() if r is not None and r < k) / n for k in ks}


# ---------------------------------------------------------------------------------------------
# File loaders (Parquet artifacts, plus TREC / BEIR text for external references)
def _open_text(path: Path):
    # utf-8-sig: a byte-order mark would otherwise become part of the first query id
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.suffix == ".gz" else open(path, encoding="utf-8-sig")


def load_run(path) -> pd.DataFrame:
    """A run from Parquet (our artifact) or TREC run text (``qid Q0 pid rank score tag``, .gz ok)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return read_run(path)
    rows = []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise InputError(path, f"expected 6 fields 'qid Q0 pid rank score tag', got {len(parts)}", n)
            try:
                rows.append((parts[0], parts[2], int(parts[3]), float(parts[4])))
            except ValueError as exc:
                raise InputError(path, f"bad rank or score: {exc}", n) from exc
    return pd.DataFrame(rows, columns=["qid", "pid", "rank", "score"])


def load_qrels(path) -> pd.DataFrame:
    """Qrels from Parquet, TREC qrels text (``qid iter pid rel``) or BEIR tsv (header ``query-id``)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return read_table(path, QRELS_SCHEMA)
    from simlm_core.text_input import read_qrels  # the data preparation's parser: one set of checks

    rows = [(qid, pid, rel) for qid, pid, rel, _ in read_qrels(path)]
    return pd.DataFrame(rows, columns=["qid", "pid", "relevance"])


def _has_rows(path) -> bool:
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows > 0
    return len(load_answers(path)) > 0


def load_answers(path) -> pd.DataFrame:
    """Answers from Parquet (``qid, answers``) or BEIR-style jsonl (``_id``, ``answers``)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return read_table(path, ANSWERS_SCHEMA)
    rows = []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"invalid JSON: {exc.msg}", n) from exc
            if "answers" not in rec or not isinstance(rec["answers"], list):
                raise InputError(path, "record has no 'answers' list", n)
            qid = rec.get("_id", rec.get("qid"))
            if qid is None:
                raise InputError(path, "record has no '_id' or 'qid'", n)
            rows.append((str(qid), [str(a) for a in rec["answers"]]))
    return pd.DataFrame(rows, columns=["qid", "answers"])


# ---------------------------------------------------------------------------------------------
def evaluate_split(
    run_path,
    qrels_path=None,
    answers_path=None,
    corpus_path=None,
    measures: Sequence[str] | None = None,
    answer_ks: Sequence[int] = (20, 100),
    *,
    dataset_format: str | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Every metric of one system on one split, plus query counts.

    Returns ``{"metrics": {name: value}, "num_queries": {...}, "run_depth": int}``; ``run_depth``
    is the most passages the run holds for one query (a re-ranked run: its re-ranking depth), so a
    report can mark cutoffs deeper than the run.

    ``measures`` may mix ir-measures names and ``Answer@k``. When None it is
    :func:`default_measures` of ``dataset_format`` / ``split`` if a format is given (plus
    ``Answer@k`` for ``answer_ks`` when the answers file has rows, e.g. BEIR queries with answers), else
    RR@10, R@50, R@100, R@1000, nDCG@10 when qrels are given, plus answer hit rates when
    answers are given. Answer hit rates are computed only when ``measures`` names an
    ``Answer@k`` or names no ir-measures measure at all (None or ``[]``) while answers are
    given; their cutoffs are the named k plus ``answer_ks``. So a demo or MS MARCO split whose answers file is present but empty is
    never answer-matched.

    ``num_queries`` holds ``in_run`` and, per reference used, ``in_qrels`` / ``in_answers``,
    ``run_without_qrels`` / ``run_without_answers`` (run queries not evaluated),
    ``qrels_without_run`` / ``answers_without_run`` (reference queries that retrieved nothing,
    scored 0), and ``evaluated``: the number of queries the relevance metrics average over
    (the answer metrics' when there are no relevance metrics).
    """
    if measures is None:
        if dataset_format is not None:
            measures = default_measures(dataset_format, split or "")
            if answers_path is not None and corpus_path is not None and _has_rows(answers_path) \
                    and not any(answer_cutoff(m) is not None for m in measures):
                # a BEIR folder whose queries carry answers: report answer hit rates beside the rest
                measures += [f"{ANSWER_PREFIX}{k}" for k in answer_ks]
        else:
            measures = ["RR@10", "R@50", "R@100", "R@1000", "nDCG@10"] if qrels_path is not None else []
            if answers_path is not None:
                measures += [f"{ANSWER_PREFIX}{k}" for k in answer_ks]
    measures = list(measures)
    ir_names = [m for m in measures if answer_cutoff(m) is None]
    named_ks = [answer_cutoff(m) for m in measures if answer_cutoff(m) is not None]
    wants_answers = bool(named_ks) or (not ir_names and answers_path is not None)
    ks = sorted({int(k) for k in named_ks} | {int(k) for k in answer_ks}) if wants_answers else []
    if ir_names and qrels_path is None:
        raise ValueError(f"measures {ir_names} need qrels, but no qrels_path was given")
    if ks and (answers_path is None or corpus_path is None):
        raise ValueError(f"answer metrics {named_ks} need answers_path and corpus_path")
    if not ir_names and not ks:
        raise ValueError("nothing to evaluate: no measures, qrels or answers")

    run = load_run(run_path)
    run_q = set(run["qid"].astype(str))
    # A re-ranked run holds only the re-ranked top k: a deeper cutoff counts no more than those.
    depth = run_depth(run)
    shallow = [m for m in measures if (k := metric_cutoff(m)) is not None and k > depth]
    if shallow:
        log.warning("%s: at most %d passages per query, fewer than the cutoff of %s", run_path, depth,
                    ", ".join(shallow))
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {"in_run": len(run_q)}

    if ir_names:
        qrels = load_qrels(qrels_path)
        judged = set(qrels["qid"].astype(str))
        counts.update(
            in_qrels=len(judged),
            run_without_qrels=len(run_q - judged),
            qrels_without_run=len(judged - run_q),
            evaluated=len(judged),
        )
        metrics.update(evaluate_run(run, qrels, ir_names))
        if counts["run_without_qrels"]:
            log.warning("%s: %d run queries have no qrels and are not evaluated", run_path, counts["run_without_qrels"])
        if counts["qrels_without_run"]:
            log.warning("%s: %d judged queries retrieved nothing (scored 0)", run_path, counts["qrels_without_run"])

    if ks:
        answers = load_answers(answers_path)
        asked = set(answers["qid"].astype(str))
        counts.update(
            in_answers=len(asked),
            run_without_answers=len(run_q - asked),
            answers_without_run=len(asked - run_q),
        )
        counts.setdefault("evaluated", len(asked))
        metrics.update(answer_hits(run, answers, PassageStore(corpus_path), ks))
        if counts["answers_without_run"]:
            log.warning("%s: %d questions retrieved nothing (misses)", run_path, counts["answers_without_run"])
    # Keep the requested order (answer cutoffs added through answer_ks go last).
    order = [m for m in measures if m in metrics] + [m for m in metrics if m not in measures]
    return {"metrics": {m: metrics[m] for m in order}, "num_queries": counts, "run_depth": depth}
