"""simlm_core.report: files, CSV contract, table order, self-contained HTML, benchmarks, curves."""
from __future__ import annotations

import base64
import csv
import re
from pathlib import Path

import pandas as pd
import pytest

from simlm_core import metrics as M
from simlm_core import report as R
from simlm_core.io import QRELS_SCHEMA, RUN_SCHEMA, InputError, write_table

TREC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trec"

BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _tiny_split(tmp_path: Path, name: str, good: bool) -> tuple[Path, Path]:
    qrels = pd.DataFrame({"qid": ["q1", "q2"], "pid": ["a", "b"], "relevance": [1, 1]})
    pids = ["a", "x", "y", "b"] if good else ["x", "y", "a", "b"]
    run = pd.DataFrame(
        {"qid": ["q1"] * 4 + ["q2"] * 4, "pid": pids * 2, "rank": list(range(1, 5)) * 2, "score": [4.0, 3.0, 2.0, 1.0] * 2}
    )
    qp, rp = tmp_path / f"qrels_{name}.parquet", tmp_path / f"run_{name}.parquet"
    write_table(qrels, qp, QRELS_SCHEMA)
    write_table(run, rp, RUN_SCHEMA)
    return rp, qp


def _entries():
    return [
        {"system": "retriever_distill", "split": "dev", "metrics": {"RR@10": 0.41, "R@50": 0.87, "num_queries": {"evaluated": 2}}},
        {"system": "zeta_custom", "split": "dev", "metrics": {"RR@10": 0.2, "R@50": 0.5}},
        {"system": "bm25", "split": "dev", "metrics": {"RR@10": 0.184, "R@50": 0.6}},
        {"system": "alpha_custom", "split": "dev", "metrics": {"RR@10": 0.1, "R@50": 0.4}},
        {"system": "retriever1", "split": "dev", "metrics": {"RR@10": 0.38, "R@50": 0.85}},
        {"system": "bm25", "split": "dl19", "metrics": {"nDCG@10": 0.5058}},
    ]


def test_build_report_writes_everything(tmp_path):
    rp_good, qp = _tiny_split(tmp_path, "good", True)
    rp_bad, _ = _tiny_split(tmp_path, "bad", False)
    bench = tmp_path / "bench.tsv"
    bench.write_text(BENCH_HEADER + "12.5\t0:00:12\t512.3\t900.0\t500.0\t505.0\t1.0\t2.0\t95.0\t11.9\n")
    costs = [{"rule": "train_retriever", **R.read_snakemake_benchmark(bench)}, {"rule": "bm25_search", "wall_s": 3.0, "cpu_s": None, "max_rss_mb": None}]
    out = tmp_path / "report"
    written = R.build_report(
        _entries(), out, "Demo <run>",
        reference={"dev": {"RR@10": 41.1, "R@50": 87.8, "R@1000": 98.7}, "unused": {"RR@10": 0.3}},
        recall_curves=[
            {"system": "bm25", "split": "dev", "run_path": rp_bad, "qrels_path": qp},
            {"system": "retriever1", "split": "dev", "run_path": rp_good, "qrels_path": qp},
        ],
        costs=costs,
    )
    for name in ["metrics.csv", "report.md", "report.html", "recall_dev.png"]:
        assert (out / name).is_file(), name
    assert written["plots"] == [out / "recall_dev.png"]
    assert not list(out.glob(".*tmp*")), "temporary files left behind"

    # metrics.csv: exact header, long format, computed values only (no paper rows, no counts)
    text = (out / "metrics.csv").read_text()
    assert text.splitlines()[0] == "system,split,metric,value"
    rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) == 5 * 2 + 1
    assert {r["system"] for r in rows} == {"bm25", "retriever1", "retriever_distill", "alpha_custom", "zeta_custom"}
    assert [r["system"] for r in rows if r["split"] == "dev" and r["metric"] == "RR@10"] == [
        "bm25", "retriever1", "retriever_distill", "alpha_custom", "zeta_custom"]
    assert float(next(r["value"] for r in rows if r["system"] == "bm25" and r["split"] == "dl19")) == 0.5058

    # report.md: pipeline order, unknown systems alphabetically, then the paper row (percent -> rate)
    md = (out / "report.md").read_text()
    dev = md.split("## Split `dev`")[1].split("## ")[0]
    order = [ln.split("|")[1].strip() for ln in dev.splitlines() if ln.startswith("| ") and not ln.startswith("| system")]
    assert order == ["bm25", "retriever1", "retriever_distill", "alpha_custom", "zeta_custom", "paper"]
    assert "| system | RR@10 | R@50 | R@1000 |" in dev
    assert "| paper | 0.4110 | 0.8780 | 0.9870 |" in dev
    assert "| bm25 | 0.1840 | 0.6000 | – |" in dev
    assert "## Split `dl19`" in md and "unused" not in md
    assert "![Recall@k on dev](recall_dev.png)" in md
    assert "## Cost per stage" in md and "| train_retriever | 12.5 | 11.9 | 512 |" in md
    assert "| bm25_search | 3.0 | – | – |" in md

    # report.html: same tables, the plot inline, nothing external
    page = (out / "report.html").read_text()
    assert "<table>" in page and "<td>retriever_distill</td>" in page and "<td>0.4100</td>" in page
    assert "Demo &lt;run&gt;" in page
    m = re.search(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m, "no embedded PNG"
    assert base64.b64decode(m.group(1)) == (out / "recall_dev.png").read_bytes()
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "Cost per stage" in page


def test_build_report_minimal(tmp_path):
    R.build_report([{"system": "bm25", "split": "test", "metrics": {"nDCG@10": 0.6789}}], tmp_path, "t")
    assert (tmp_path / "metrics.csv").read_text() == "system,split,metric,value\nbm25,test,nDCG@10,0.6789\n"
    assert "<table>" in (tmp_path / "report.html").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_build_report_rejects_duplicates(tmp_path):
    e = {"system": "bm25", "split": "dev", "metrics": {"RR@10": 0.1}}
    with pytest.raises(ValueError, match="two report entries"):
        R.build_report([e, e], tmp_path, "t")
    with pytest.raises(ValueError, match="reserved"):
        R.build_report([{**e, "system": "paper"}], tmp_path, "t")


def test_reference_must_be_numbers_and_unmeasured_totals_show_a_dash(tmp_path):
    entries = [{"system": "bm25", "split": "dev", "metrics": {"RR@10": 0.1}}]
    with pytest.raises(ValueError, match=r"report reference dev\.RR@10: '18\.4' is not a number"):
        R.build_report(entries, tmp_path / "a", "t", reference={"dev": {"RR@10": "18.4"}})
    R.build_report(entries, tmp_path / "b", "t", reference={"dev": {"RR@10": None, "R@50": 60}},
                   costs=[{"rule": "bm25_search", "wall_s": None, "cpu_s": None, "max_rss_mb": None}])
    md = (tmp_path / "b" / "report.md").read_text()
    assert "| paper | – | 0.6000 |" in md  # null: left out
    assert "| total | – | – | – |" in md  # nothing measured is not 0 s


def test_cutoffs_deeper_than_a_run_are_marked(tmp_path):
    """A re-ranker's run holds its re-ranking depth: its R@1000 is recall within those, and the
    report says so (mark + footnote, markdown and HTML); shallower cutoffs and other systems are
    not marked, and the CSV keeps plain numbers."""
    entries = [
        {"system": "retriever1", "split": "dev", "metrics": {"RR@10": 0.38, "R@1000": 0.98}, "run_depth": 1000},
        {"system": "reranker", "split": "dev", "metrics": {"RR@10": 0.43, "R@1000": 0.93}, "run_depth": 200},
        {"system": "bm25", "split": "dev", "metrics": {"RR@10": 0.18, "R@1000": 0.85}},  # depth unknown
    ]
    R.build_report(entries, tmp_path, "t", reference={"dev": {"R@1000": 98.7}})
    md = (tmp_path / "report.md").read_text()
    assert "| reranker | 0.4300 | 0.9300† |" in md
    assert "| retriever1 | 0.3800 | 0.9800 |" in md and "| bm25 | 0.1800 | 0.8500 |" in md
    assert "| paper | – | 0.9870 |" in md
    assert "† cutoff deeper than the system's run (reranker holds at most 200 passages per query)" in md
    page = (tmp_path / "report.html").read_text()
    assert "<td>0.9300†</td>" in page and "reranker holds at most 200 passages per query" in page
    assert "reranker,dev,R@1000,0.93\n" in (tmp_path / "metrics.csv").read_text()
    R.build_report(entries[:1], tmp_path / "plain", "t")
    assert "†" not in (tmp_path / "plain" / "report.md").read_text()


def test_read_snakemake_benchmark(tmp_path):
    p = tmp_path / "b.tsv"
    p.write_text(BENCH_HEADER + "10.0\t0:00:10\t100.5\t200\t90\t95\t0.5\t1.5\t50.0\t8.0\n"
                 "20.0\t0:00:20\t300.0\t400\t280\t290\t0.5\t2.5\t70.0\t16.0\n")
    got = R.read_snakemake_benchmark(p)
    assert got["wall_s"] == 15.0 and got["cpu_s"] == 12.0 and got["max_rss_mb"] == 300.0
    assert got["repeats"] == 2 and got["io_out_mb"] == 2.0
    na = tmp_path / "na.tsv"  # a job faster than Snakemake's first sample
    na.write_text(BENCH_HEADER + "0.2\t0:00:00\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\n")
    got = R.read_snakemake_benchmark(na)
    assert got["wall_s"] == 0.2 and got["cpu_s"] is None and got["max_rss_mb"] is None
    bad = tmp_path / "bad.tsv"
    bad.write_text("foo\tbar\n1\t2\n")
    with pytest.raises(InputError):
        R.read_snakemake_benchmark(bad)


def test_recall_curve_tiny(tmp_path):
    rp, qp = _tiny_split(tmp_path, "bad", False)
    curves = R.compute_recall_curves([{"system": "s", "split": "dev", "run_path": rp, "qrels_path": qp}])
    assert curves == {"dev": {"s": {1: 0.0, 2: 0.0, 4: 1.0}}}


@pytest.mark.skipif(not (TREC / "runs").is_dir(), reason="shared TREC data absent")
def test_recall_curve_matches_ir_measures_on_real_run():
    import ir_measures

    run = M.load_run(TREC / "runs" / "run.dl19-passage.bm25-default.top100.txt.gz")
    qrels = M.load_qrels(TREC / "qrels.dl19-passage.txt")
    curve = M.recall_curve(run, qrels, rel=2)
    assert list(curve) == [1, 2, 5, 10, 20, 50, 100]
    direct = ir_measures.calc_aggregate(
        [ir_measures.parse_measure(f"R(rel=2)@{k}") for k in curve],
        qrels.rename(columns={"qid": "query_id", "pid": "doc_id"}),
        run.rename(columns={"qid": "query_id", "pid": "doc_id"}),
    )
    for k, v in curve.items():
        assert v == pytest.approx(direct[ir_measures.parse_measure(f"R(rel=2)@{k}")], abs=1e-12)
    assert round(curve[100], 4) == 0.4910  # the published figure
    assert all(a <= b for a, b in zip(list(curve.values()), list(curve.values())[1:]))


def test_recall_curves_skip_missing_or_empty_qrels(tmp_path):
    rp, qp = _tiny_split(tmp_path, "good", True)
    empty = tmp_path / "empty_qrels.parquet"
    write_table(pd.DataFrame({"qid": [], "pid": [], "relevance": []}), empty, QRELS_SCHEMA)
    curves = R.compute_recall_curves([
        {"system": "s", "split": "nq", "run_path": rp, "qrels_path": empty},
        {"system": "s", "split": "x", "run_path": tmp_path / "nope.parquet", "qrels_path": qp},
        {"system": "s", "split": "dev", "run_path": rp, "qrels_path": qp},
    ])
    assert list(curves) == ["dev"]
