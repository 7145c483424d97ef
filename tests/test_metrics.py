"""simlm_core.metrics: trec_eval semantics, published figures on real runs, DPR answer matching."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from simlm_core import metrics as M
from simlm_core.io import CORPUS_SCHEMA, QRELS_SCHEMA, RUN_SCHEMA, ANSWERS_SCHEMA, InputError, PassageStore, write_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TREC = DATA / "trec"
NQ = DATA / "nq-dpr-sample"


def run_df(rows):
    """rows: (qid, pid, score); rank filled in from the order given."""
    df = pd.DataFrame(rows, columns=["qid", "pid", "score"])
    df["rank"] = df.groupby("qid").cumcount() + 1
    return df[["qid", "pid", "rank", "score"]]


def qrels_df(rows):
    return pd.DataFrame(rows, columns=["qid", "pid", "relevance"])


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
def test_rr_at_10_hand_computed():
    qrels = qrels_df([("q1", "d3", 1), ("q2", "d9", 1), ("q2", "d1", 1)])
    run = run_df(
        [("q1", "d1", 9.0), ("q1", "d2", 8.0), ("q1", "d3", 7.0)]  # first relevant at rank 3 -> 1/3
        + [("q2", "d1", 5.0), ("q2", "d9", 4.0)]  # rank 1 -> 1
    )
    got = M.evaluate_run(run, qrels, ["RR@10"])
    assert list(got) == ["RR@10"]
    assert got["RR@10"] == pytest.approx((1 / 3 + 1) / 2)


def test_rr_cutoff_excludes_rank_11():
    qrels = qrels_df([("q", "rel", 1)])
    run = run_df([("q", f"n{i:02d}", 100.0 - i) for i in range(10)] + [("q", "rel", 1.0)])
    assert M.evaluate_run(run, qrels, ["RR@10"])["RR@10"] == 0.0
    assert M.evaluate_run(run, qrels, ["RR@100"])["RR@100"] == pytest.approx(1 / 11)


def test_trec_recall_hand_computed():
    # q1: 3 relevant, 2 in the top 2 -> R@2 = 2/3; q2: 1 relevant at rank 3 -> R@2 = 0, R@5 = 1
    qrels = qrels_df([("q1", "a", 1), ("q1", "b", 1), ("q1", "c", 1), ("q1", "z", 0), ("q2", "x", 1)])
    run = run_df([("q1", "a", 3.0), ("q1", "b", 2.0), ("q1", "z", 1.0)] + [("q2", "m", 3.0), ("q2", "n", 2.0), ("q2", "x", 1.0)])
    got = M.evaluate_run(run, qrels, ["R@2", "R@5"])
    assert got["R@2"] == pytest.approx((2 / 3 + 0) / 2)
    assert got["R@5"] == pytest.approx((2 / 3 + 1) / 2)


def test_graded_relevance_levels():
    # label 1 counts for RR@10 but not for RR(rel=2)@10
    qrels = qrels_df([("q", "a", 1), ("q", "b", 2)])
    run = run_df([("q", "a", 2.0), ("q", "b", 1.0)])
    got = M.evaluate_run(run, qrels, ["RR@10", "RR(rel=2)@10", "R(rel=2)@1"])
    assert got == {"RR@10": 1.0, "RR(rel=2)@10": 0.5, "R(rel=2)@1": 0.0}


def test_unretrieved_judged_query_counts_as_zero():
    qrels = qrels_df([("q1", "a", 1), ("q2", "b", 1)])
    run = run_df([("q1", "a", 1.0)])  # q2 retrieved nothing
    got = M.evaluate_run(run, qrels, ["RR@10", "R@50", "nDCG@10"])
    assert got == {"RR@10": 0.5, "R@50": 0.5, "nDCG@10": 0.5}
    table = M.per_query(run, qrels, ["RR@10"])
    assert table.loc["q2", "RR@10"] == 0.0


def test_empty_run_scores_zero():
    qrels = qrels_df([("q1", "a", 1)])
    assert M.evaluate_run(run_df([]), qrels, ["RR@10"]) == {"RR@10": 0.0}


def test_run_only_queries_are_not_evaluated():
    qrels = qrels_df([("q1", "a", 1)])
    run = run_df([("q1", "a", 1.0), ("q9", "a", 1.0)])
    assert M.evaluate_run(run, qrels, ["RR@10"]) == {"RR@10": 1.0}


def test_ranked_by_score_not_rank_column_and_ties_as_trec_eval():
    qrels = qrels_df([("q", "a", 1)])
    # rank column claims 'a' is first, but its score is lower: trec_eval uses the score
    run = pd.DataFrame({"qid": ["q", "q"], "pid": ["a", "b"], "rank": [1, 2], "score": [1.0, 2.0]})
    assert M.evaluate_run(run, qrels, ["RR@10"])["RR@10"] == 0.5
    # equal scores: trec_eval orders by doc id descending, so 'b' comes before 'a'
    tie = pd.DataFrame({"qid": ["q", "q"], "pid": ["a", "b"], "rank": [1, 2], "score": [1.0, 1.0]})
    assert M.evaluate_run(tie, qrels, ["RR@10"])["RR@10"] == 0.5
    assert list(M.rank_by_score(tie)["pid"]) == ["b", "a"]


def test_tie_heavy_run_agrees_with_pytrec_eval():
    """Many tied scores: every measure (whatever ir-measures provider computes it) follows
    trec_eval's order, checked against pytrec_eval on the raw run (depth 30 < every cutoff)."""
    import numpy as np
    import pytrec_eval

    rng = np.random.default_rng(0)
    rows, qrows = [], []
    for q in range(20):
        docs = [f"d{j:03d}" for j in rng.choice(200, size=30, replace=False)]
        rows += [(f"q{q}", d, float(rng.integers(0, 4))) for d in docs]  # 4 score levels: ties galore
        qrows += [(f"q{q}", d, int(rng.integers(0, 3))) for d in rng.choice(docs, size=6, replace=False)]
    qrows.append(("q99", "d000", 1))  # judged, never retrieved
    run, qrels = run_df(rows), qrels_df(qrows)
    qd: dict = {}
    for r in qrels.itertuples():
        qd.setdefault(r.qid, {})[r.pid] = r.relevance
    rd: dict = {}
    for r in run.itertuples():
        rd.setdefault(r.qid, {})[r.pid] = r.score
    n = len(qd)
    plain = pytrec_eval.RelevanceEvaluator(qd, {"recip_rank", "recall.5", "ndcg_cut.5"}).evaluate(rd)
    rel2 = pytrec_eval.RelevanceEvaluator(qd, {"recip_rank", "recall.5"}, relevance_level=2).evaluate(rd)
    expect = {
        "RR@100": sum(v["recip_rank"] for v in plain.values()) / n,
        "R@5": sum(v["recall_5"] for v in plain.values()) / n,
        "nDCG@5": sum(v["ndcg_cut_5"] for v in plain.values()) / n,
        "RR(rel=2)@100": sum(v["recip_rank"] for v in rel2.values()) / n,
        "R(rel=2)@5": sum(v["recall_5"] for v in rel2.values()) / n,
    }
    got = M.evaluate_run(run, qrels, list(expect))
    for name, value in expect.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_output_keys_are_ir_measures_names():
    qrels = qrels_df([("q", "a", 2)])
    run = run_df([("q", "a", 1.0)])
    names = ["RR@10", "R@50", "R@1000", "nDCG@10", "RR(rel=2)@10", "R(rel=2)@1000"]
    assert list(M.evaluate_run(run, qrels, names)) == names


def test_bad_inputs():
    qrels = qrels_df([("q", "a", 1)])
    with pytest.raises(ValueError, match="unknown ir-measures"):
        M.evaluate_run(run_df([("q", "a", 1.0)]), qrels, ["NotAMeasure@3"])
    with pytest.raises(ValueError, match="twice"):
        M.evaluate_run(run_df([("q", "a", 1.0), ("q", "a", 0.5)]), qrels, ["RR@10"])
    with pytest.raises(ValueError, match="answer"):
        M.evaluate_run(run_df([("q", "a", 1.0)]), qrels, ["Answer@20"])
    with pytest.raises(ValueError, match="empty"):
        M.evaluate_run(run_df([("q", "a", 1.0)]), qrels_df([]), ["RR@10"])


def test_default_measures():
    assert M.default_measures("msmarco", "dev") == ["RR@10", "R@50", "R@1000"]
    assert M.default_measures("msmarco", "dl19") == ["nDCG@10", "RR(rel=2)@10", "R(rel=2)@1000"]
    assert M.default_measures("msmarco", "dl20") == M.default_measures("msmarco", "dl19")
    assert M.default_measures("beir", "test") == ["nDCG@10", "R@100", "R@1000"]
    assert M.default_measures("demo", "dev") == ["RR@10", "R@50", "R@100", "nDCG@10"]
    assert M.default_measures("nq", "test") == ["Answer@20", "Answer@100"]
    with pytest.raises(ValueError):
        M.default_measures("robust04", "test")
    for name in M.default_measures("msmarco", "dev") + M.default_measures("msmarco", "dl19"):
        assert M.parse_measures([name])  # all valid ir-measures names


def test_recall_grid():
    assert M.recall_grid(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert M.recall_grid(30) == [1, 2, 5, 10, 20, 30]
    assert M.recall_grid(0) == []


# ---------------------------------------------------------------------------------------------
# Loaders and evaluate_split on Parquet artifacts
def test_evaluate_split_counts_queries(tmp_path):
    qrels = qrels_df([("q1", "a", 1), ("q2", "b", 1), ("q3", "c", 1)])
    run = run_df([("q1", "a", 2.0), ("q2", "x", 2.0), ("q2", "b", 1.0), ("q7", "a", 1.0)])
    write_table(qrels, tmp_path / "qrels.parquet", QRELS_SCHEMA)
    write_table(run, tmp_path / "run.parquet", RUN_SCHEMA)
    out = M.evaluate_split(tmp_path / "run.parquet", tmp_path / "qrels.parquet", measures=["RR@10", "R@50"])
    assert list(out) == ["metrics", "num_queries", "run_depth"]
    assert out["run_depth"] == 2  # q2's two passages: R@50 here is recall within those
    assert list(out["metrics"]) == ["RR@10", "R@50"]
    assert out["metrics"]["RR@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["metrics"]["R@50"] == pytest.approx(2 / 3)
    assert M.metric_cutoff("R(rel=2)@1000") == 1000 and M.metric_cutoff("Answer@20") == 20
    assert M.metric_cutoff("AP") is None and M.metric_cutoff("nDCG@10") == 10
    assert out["num_queries"] == {
        "in_run": 3, "in_qrels": 3, "evaluated": 3, "run_without_qrels": 1, "qrels_without_run": 1,
    }
    by_format = M.evaluate_split(tmp_path / "run.parquet", tmp_path / "qrels.parquet", dataset_format="msmarco", split="dev")
    assert list(by_format["metrics"]) == ["RR@10", "R@50", "R@1000"]
    with pytest.raises(ValueError, match="qrels"):
        M.evaluate_split(tmp_path / "run.parquet", measures=["RR@10"])
    # an answers file given for a split without answer metrics is not touched (demo, MS MARCO)
    empty = pd.DataFrame({"qid": pd.Series([], dtype=str), "answers": pd.Series([], dtype=object)})
    write_table(empty, tmp_path / "answers.parquet", ANSWERS_SCHEMA)
    demo = M.evaluate_split(tmp_path / "run.parquet", tmp_path / "qrels.parquet", answers_path=tmp_path / "answers.parquet",
                            corpus_path=tmp_path / "missing.parquet", measures=M.default_measures("demo", "dev"), answer_ks=(20, 100))
    assert list(demo["metrics"]) == ["RR@10", "R@50", "R@100", "nDCG@10"]


def test_trec_loaders_report_line(tmp_path):
    bad = tmp_path / "run.txt"
    bad.write_text("q Q0 d 1 2.0 tag\nq Q0 d2 x 1.0 tag\n")
    with pytest.raises(InputError, match="line 2"):
        M.load_run(bad)
    badq = tmp_path / "qrels.txt"
    badq.write_text("q 0 d 1\nq 0 d\n")
    with pytest.raises(InputError, match="line 2"):
        M.load_qrels(badq)
    with pytest.raises(InputError, match="3 columns where the file's first line has 4"):
        M.load_qrels(badq)  # not read as 'qid pid rel' = (q, 0, d)
    beir = tmp_path / "test.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert M.load_qrels(beir).to_dict("records") == [{"qid": "q1", "pid": "d1", "relevance": 1}]


def test_trec_loaders_drop_a_byte_order_mark(tmp_path):
    """A BOM must not become part of the first query id (that query would go unmatched)."""
    run, qrels = tmp_path / "run.txt", tmp_path / "qrels.txt"
    run.write_bytes(b"\xef\xbb\xbfq1 Q0 d1 1 2.0 tag\nq1 Q0 d2 2 1.0 tag\n")
    qrels.write_bytes(b"\xef\xbb\xbfq1 0 d2 1\n")
    assert M.load_run(run).qid.tolist() == ["q1", "q1"]
    assert M.load_qrels(qrels).qid.tolist() == ["q1"]
    assert M.evaluate_run(M.load_run(run), M.load_qrels(qrels), ["RR@10"])["RR@10"] == 0.5


# ---------------------------------------------------------------------------------------------
# Real TREC DL runs: published figures and pytrec_eval agreement
needs_trec = pytest.mark.skipif(not (TREC / "runs").is_dir(), reason="shared TREC data absent")

PUBLISHED = [  # Pyserini 2CR / Anserini regressions (shared/data/README.md)
    ("dl19", "bm25-default", 0.5058, 0.4910),
    ("dl19", "distilbert-kd-tasb", 0.7210, 0.6097),
    ("dl20", "bm25-default", 0.4796, 0.5599),
    ("dl20", "distilbert-kd-tasb", 0.6854, 0.7135),
]


@needs_trec
@pytest.mark.parametrize("ds,system,ndcg,recall", PUBLISHED)
def test_published_trec_dl_figures(ds, system, ndcg, recall):
    run = M.load_run(TREC / "runs" / f"run.{ds}-passage.{system}.top100.txt.gz")
    qrels = M.load_qrels(TREC / f"qrels.{ds}-passage.txt")
    got = M.evaluate_run(run, qrels, ["nDCG@10", "R(rel=2)@100"])
    assert round(got["nDCG@10"], 4) == ndcg
    assert round(got["R(rel=2)@100"], 4) == recall


@needs_trec
@pytest.mark.parametrize("system", ["bm25-default", "distilbert-kd-tasb", "bm25-rm3-default"])
def test_agrees_with_pytrec_eval_directly(system):
    import pytrec_eval

    run = M.load_run(TREC / "runs" / f"run.dl19-passage.{system}.top100.txt.gz")
    qrels = M.load_qrels(TREC / "qrels.dl19-passage.txt")
    qrel_dict: dict = {}
    for r in qrels.itertuples():
        qrel_dict.setdefault(r.qid, {})[r.pid] = int(r.relevance)
    run_dict: dict = {}
    for r in run.itertuples():
        run_dict.setdefault(r.qid, {})[r.pid] = float(r.score)
    # recip_rank has no cutoff in trec_eval: cut each query to its top 10 in trec_eval's order.
    top10: dict = {}
    for r in M.rank_by_score(run, depth=10).itertuples():
        top10.setdefault(r.qid, {})[r.pid] = float(r.score)
    ev = pytrec_eval.RelevanceEvaluator(qrel_dict, {"recall.100", "ndcg_cut.10"})
    per = ev.evaluate(run_dict)
    rr = pytrec_eval.RelevanceEvaluator(qrel_dict, {"recip_rank"}).evaluate(top10)
    n = len(qrel_dict)
    expect = {
        "R@100": sum(v["recall_100"] for v in per.values()) / n,
        "nDCG@10": sum(v["ndcg_cut_10"] for v in per.values()) / n,
        "RR@10": sum(v["recip_rank"] for v in rr.values()) / n,
    }
    got = M.evaluate_run(run, qrels, list(expect))
    for name, value in expect.items():
        assert got[name] == pytest.approx(value, abs=5e-5), name
        assert round(got[name], 4) == round(value, 4)


@needs_trec
def test_real_run_with_dropped_query_counts_zero():
    run = M.load_run(TREC / "runs" / "run.dl19-passage.bm25-default.top100.txt.gz")
    qrels = M.load_qrels(TREC / "qrels.dl19-passage.txt")
    full = M.per_query(run, qrels, ["nDCG@10"])
    victim = full.index[0]
    got = M.evaluate_run(run[run.qid != victim], qrels, ["nDCG@10"])
    assert got["nDCG@10"] == pytest.approx(full["nDCG@10"].drop(victim).sum() / len(full))


# ---------------------------------------------------------------------------------------------
# DPR answer matching on the real NQ sample
needs_nq = pytest.mark.skipif(not NQ.is_dir(), reason="shared NQ sample absent")


@pytest.fixture(scope="module")
def nq(tmp_path_factory):
    pytest.importorskip("pyserini.eval.evaluate_dpr_retrieval")
    if not NQ.is_dir():
        pytest.skip("shared NQ sample absent")
    rows = [json.loads(line) for line in open(NQ / "corpus.jsonl", encoding="utf-8")]
    corpus = pd.DataFrame({"pid": [r["_id"] for r in rows], "title": [r["title"] for r in rows], "text": [r["text"] for r in rows]})
    path = tmp_path_factory.mktemp("nq") / "corpus.parquet"
    write_table(corpus, path, CORPUS_SCHEMA)
    return {
        "store": PassageStore(path),
        "corpus_path": path,
        "answers": M.load_answers(NQ / "queries.jsonl"),
        "qrels": M.load_qrels(NQ / "qrels" / "test.tsv"),
    }


@needs_nq
def test_positives_give_full_hit_rate_incl_tokenised_answer(nq):
    run = nq["qrels"].assign(rank=1, score=1.0)[["qid", "pid", "rank", "score"]]
    assert M.answer_hits(run, nq["answers"], nq["store"]) == {"Answer@20": 1.0, "Answer@100": 1.0}
    # question 3: 'July 5 , 2018' is DPR-tokenised; a raw substring test fails on its positives
    q3 = nq["qrels"][nq["qrels"].qid == "3"]
    texts = [t for _, t in nq["store"].get(q3.pid.tolist())]
    assert not any("July 5 , 2018" in t for t in texts)
    only_q3 = run[run.qid == "3"]
    assert M.answer_hits(only_q3, nq["answers"][nq["answers"].qid == "3"], nq["store"]) == {"Answer@20": 1.0, "Answer@100": 1.0}


@needs_nq
def test_passage_without_answer_is_a_miss(nq):
    answers = nq["answers"][nq["answers"].qid == "0"]  # 'Linda Davis'
    # 11828871: hard negative 'Does He Love You' whose text lacks the answer
    (_, text), = nq["store"].get(["11828871"])
    assert "linda davis" not in text.lower()
    run = pd.DataFrame({"qid": ["0"], "pid": ["11828871"], "rank": [1], "score": [1.0]})
    assert M.answer_hits(run, answers, nq["store"]) == {"Answer@20": 0.0, "Answer@100": 0.0}
    # nothing retrieved at all is a miss too
    assert M.answer_hits(run.iloc[:0], answers, nq["store"]) == {"Answer@20": 0.0, "Answer@100": 0.0}


@needs_nq
def test_cutoff_counts_by_score(nq):
    answers = nq["answers"][nq["answers"].qid == "0"]
    pos = nq["qrels"][nq["qrels"].qid == "0"].pid.iloc[0]
    negatives = [p for p, (_, t) in zip(nq["store"].table.column("pid").to_pylist(), nq["store"].get(nq["store"].table.column("pid").to_pylist()))
                 if "linda davis" not in t.lower()][:30]
    rows = [("0", p, 100.0 - i) for i, p in enumerate(negatives)] + [("0", pos, 1.0)]  # positive at rank 31
    run = run_df(rows)
    assert M.answer_hits(run, answers, nq["store"], ks=(20, 30, 100)) == {"Answer@20": 0.0, "Answer@30": 0.0, "Answer@100": 1.0}
    # the rank column is ignored: raising the positive's score to the top makes it a hit@1
    run.loc[run.pid == pos, "score"] = 1000.0
    assert M.answer_hits(run, answers, nq["store"], ks=(1,)) == {"Answer@1": 1.0}


def test_answer_in_title_only_is_a_miss(tmp_path):
    pytest.importorskip("pyserini.eval.evaluate_dpr_retrieval")
    corpus = pd.DataFrame({"pid": ["p1", "p2"], "title": ["Linda Davis", "x"], "text": ["a country singer", "sung by Linda   DAVIS."]})
    write_table(corpus, tmp_path / "c.parquet", CORPUS_SCHEMA)
    store = PassageStore(tmp_path / "c.parquet")
    answers = pd.DataFrame({"qid": ["q", "r"], "answers": [["Linda Davis"], ["Linda Davis"]]})
    run = pd.DataFrame({"qid": ["q", "r"], "pid": ["p1", "p2"], "rank": [1, 1], "score": [1.0, 1.0]})
    # q: answer only in the title -> miss (DPR matches text only); r: case/space-insensitive hit
    assert M.answer_hits(run, answers, store, ks=(20,)) == {"Answer@20": 0.5}


@needs_nq
def test_evaluate_split_nq(nq, tmp_path):
    run = nq["qrels"].assign(rank=1, score=1.0)
    run = run[run.qid != "7"]  # question 7 retrieves nothing
    write_table(run, tmp_path / "run.parquet", RUN_SCHEMA)
    write_table(nq["answers"], tmp_path / "answers.parquet", ANSWERS_SCHEMA)
    out = M.evaluate_split(tmp_path / "run.parquet", answers_path=tmp_path / "answers.parquet",
                           corpus_path=nq["corpus_path"], dataset_format="nq", split="dev")
    assert out["metrics"] == pytest.approx({"Answer@20": 4 / 5, "Answer@100": 4 / 5})
    assert out["num_queries"] == {"in_run": 4, "in_answers": 5, "run_without_answers": 0, "answers_without_run": 1, "evaluated": 5}
    # jsonl answers (BEIR layout with an 'answers' field) work as well
    out2 = M.evaluate_split(tmp_path / "run.parquet", answers_path=NQ / "queries.jsonl",
                            corpus_path=nq["corpus_path"], answer_ks=(20,))
    assert out2["metrics"] == pytest.approx({"Answer@20": 4 / 5})
    # named cutoffs plus answer_ks, as the evaluate rule calls it
    out3 = M.evaluate_split(tmp_path / "run.parquet", None,
                            answers_path=tmp_path / "answers.parquet", corpus_path=nq["corpus_path"],
                            measures=["Answer@5"], answer_ks=(20, 100))
    assert list(out3["metrics"]) == ["Answer@5", "Answer@20", "Answer@100"]
    # measures=[] (configs/nq.yaml): answer matching only, at answer_ks
    out4 = M.evaluate_split(tmp_path / "run.parquet", answers_path=tmp_path / "answers.parquet",
                            corpus_path=nq["corpus_path"], measures=[], answer_ks=(20, 100))
    assert list(out4["metrics"]) == ["Answer@20", "Answer@100"]


def test_beir_split_with_answers_gets_answer_hit_rates_by_default(nq, tmp_path):
    """The format's defaults, plus Answer@k when the split's answers file has rows (BEIR queries
    with an 'answers' field); an empty answers file (MS MARCO, the demo) adds nothing."""
    run = nq["qrels"].assign(rank=1, score=1.0)
    write_table(run, tmp_path / "run.parquet", RUN_SCHEMA)
    write_table(nq["qrels"], tmp_path / "qrels.parquet", QRELS_SCHEMA)
    write_table(nq["answers"], tmp_path / "answers.parquet", ANSWERS_SCHEMA)
    write_table(nq["answers"].iloc[:0], tmp_path / "none.parquet", ANSWERS_SCHEMA)
    kw = dict(corpus_path=nq["corpus_path"], dataset_format="beir", split="test", answer_ks=(20, 100))
    out = M.evaluate_split(tmp_path / "run.parquet", tmp_path / "qrels.parquet", tmp_path / "answers.parquet", **kw)
    assert list(out["metrics"]) == M.default_measures("beir", "test") + ["Answer@20", "Answer@100"]
    assert out["metrics"]["Answer@20"] == pytest.approx(1.0)
    out = M.evaluate_split(tmp_path / "run.parquet", tmp_path / "qrels.parquet", tmp_path / "none.parquet", **kw)
    assert list(out["metrics"]) == M.default_measures("beir", "test")


def test_metric_definitions_cover_defaults():
    for fmt, split in [("msmarco", "dev"), ("msmarco", "dl19"), ("beir", "test"), ("nq", "test"), ("demo", "dev")]:
        for name in M.default_measures(fmt, split):
            assert "ir-measures documentation" not in M.describe_metric(name)
    assert "hit rate" in M.describe_metric("Answer@20")
    assert "label >= 2" in M.describe_metric("R(rel=2)@1000")
