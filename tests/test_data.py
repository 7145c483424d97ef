"""Tests of simlm_core.data: every loader on small generated folders, the real shared files,
one test per kind of bad input (the error must name the file and the line), and streaming."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simlm_core import data as D
from simlm_core.io import ANSWERS_SCHEMA, CORPUS_SCHEMA, QRELS_SCHEMA, QUERIES_SCHEMA, InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs = {
    name: pytest.mark.skipif(not (DATA / name).is_dir(), reason=f"shared test data {DATA / name} absent")
    for name in ("scifact", "trec", "nq-dpr-sample")
}


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(out / name)


# ---------------------------------------------------------------------------------------------
# Small generated fixtures
def make_beir(root: Path, answers: bool = False) -> Path:
    write(root / "corpus.jsonl", jsonl([
        {"_id": "d1", "title": "Cats", "text": "cats purr"},
        {"_id": "d2", "title": "", "text": "dogs bark"},
        {"_id": 3, "text": "birds sing"},  # int id, no title
    ]))
    qs = [{"_id": "q2", "text": "why bark"}, {"_id": "q1", "text": "what purrs"}, {"_id": "q3", "text": "singing"}]
    if answers:
        qs[0]["answers"], qs[1]["answers"] = ["dogs"], ["cats", "kittens"]
    write(root / "queries.jsonl", jsonl(qs))
    write(root / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n")
    write(root / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq3\t3\t1\nq3\td1\t0\n")
    return root


def make_msmarco(root: Path) -> Path:
    write(root / "collection.tsv", "".join(f"{i}\tpassage number {i}\n" for i in range(10)))
    write(root / "queries.train.tsv", "100\tfirst query\n101\tsecond query\n102\tnever judged\n")
    write(root / "qrels.train.tsv", "100\t0\t1\t1\n101\t0\t2\t1\n")
    write(root / "queries.dev.small.tsv", "200\tdev query\n")
    write(root / "qrels.dev.small.tsv", "200\t0\t3\t1\n")
    return root


def make_nq(root: Path) -> Path:
    write(root / "psgs_w100.tsv", 'id\ttext\ttitle\n1\t"Aaron is a ""prophet"" here"\tAaron\n2\tplain text two\tTwo\n3\tthree\tThree\n')
    records = [
        {"question": "who is aaron", "answers": ["a prophet"],
         "positive_ctxs": [{"passage_id": "1", "title": "Aaron", "text": "..."},
                           {"passage_id": "1", "title": "Aaron", "text": "..."}, {"passage_id": "3"}],
         "negative_ctxs": [], "hard_negative_ctxs": [{"passage_id": "3"}]},
        {"question": "what is two", "answers": ["two"], "positive_ctxs": [{"psg_id": 2}]},
    ]
    write(root / "biencoder-nq-dev.json", json.dumps(records, indent=4))
    write(root / "nq-test.csv", "who is aaron\t['a prophet', \"Aaron's\"]\nwhat is three\t['three']\n")
    return root


def test_beir_loader(tmp_path):
    src = make_beir(tmp_path / "beir", answers=True)
    out = tmp_path / "out"
    summary = D.prepare_dataset({"format": "beir", "path": str(src)}, out, progress=False)
    assert summary["splits"] == ["test", "train"]  # default: every qrels/*.tsv
    corpus = read(out, "corpus.parquet")
    assert corpus.to_dict("list") == {"pid": ["d1", "d2", "3"], "title": ["Cats", "", ""],
                                      "text": ["cats purr", "dogs bark", "birds sing"]}
    # a split's queries are those its qrels name, in queries.jsonl order
    assert read(out, "queries/train.parquet").qid.tolist() == ["q2", "q1"]
    qrels = read(out, "qrels/test.parquet")
    assert qrels.values.tolist() == [["q3", "3", 1], ["q3", "d1", 0]]  # relevance 0 kept
    assert pq.read_schema(out / "qrels/test.parquet").field("relevance").type == QRELS_SCHEMA.field("relevance").type
    answers = read(out, "answers/train.parquet")
    assert [list(a) for a in answers.answers] == [["dogs"], ["cats", "kittens"]]
    assert summary["counts"] == {"corpus.parquet": 3, "queries/test.parquet": 1, "qrels/test.parquet": 2,
                                 "answers/test.parquet": 1, "queries/train.parquet": 2,
                                 "qrels/train.parquet": 2, "answers/train.parquet": 2}
    assert sorted(D.expected_artifacts({"format": "beir", "path": str(src)})) == sorted(summary["counts"])


def test_beir_explicit_split_and_missing_split(tmp_path):
    src = make_beir(tmp_path / "beir")
    out = tmp_path / "out"
    summary = D.prepare_dataset({"format": "beir", "path": str(src), "splits": ["train"]}, out, progress=False)
    assert summary["splits"] == ["train"] and not (out / "queries/test.parquet").exists()
    assert len(read(out, "answers/train.parquet")) == 0  # no answers in the source: an empty file
    with pytest.raises(InputError, match=r"qrels/dev\.tsv: file not found \(qrels of split 'dev'\)"):
        D.prepare_dataset({"format": "beir", "path": str(src), "splits": ["dev"]}, out, progress=False)


def test_msmarco_loader_defaults_drop_unjudged(tmp_path):
    src = make_msmarco(tmp_path / "ms")
    out = tmp_path / "out"
    spec = {"format": "msmarco", "path": str(src)}
    assert D.load_dataset_splits(spec) == ["train", "dev"]  # only default splits whose files exist
    summary = D.prepare_dataset(spec, out, progress=False)
    assert read(out, "corpus.parquet").title.tolist() == [""] * 10
    assert read(out, "queries/train.parquet").qid.tolist() == ["100", "101"]
    assert any("1 of 3 topics" in w and "queries.train.tsv" in w for w in summary["warnings"])
    assert read(out, "qrels/dev.parquet").values.tolist() == [["200", "3", 1]]


def test_msmarco_trec_qrels_absolute_paths(tmp_path):
    src = make_msmarco(tmp_path / "ms")
    elsewhere = tmp_path / "trec"
    write(elsewhere / "topics.txt", "1\tgraded one\n2\tgraded two\n")
    write(elsewhere / "qrels.txt", "1 Q0 4 3\n1 Q0 5 0\n2 Q0 6 2\n")
    spec = {"format": "msmarco", "path": str(src), "corpus": "collection.tsv",
            "splits": {"dl": {"queries": str(elsewhere / "topics.txt"), "qrels": str(elsewhere / "qrels.txt")}}}
    summary = D.prepare_dataset(spec, tmp_path / "out", progress=False)
    assert summary["splits"] == ["dl"] and summary["warnings"] == []
    assert read(tmp_path / "out", "qrels/dl.parquet").relevance.tolist() == [3, 0, 2]
    spec["splits"]["dev"] = {"queries": "nope.tsv", "qrels": "qrels.dev.small.tsv"}
    with pytest.raises(InputError, match=r"nope\.tsv: file not found"):
        D.prepare_dataset(spec, tmp_path / "out2", progress=False)


def test_nq_loader_json_and_qas(tmp_path):
    src = make_nq(tmp_path / "nq")
    out = tmp_path / "out"
    spec = {"format": "nq", "path": str(src), "splits": {"dev": "biencoder-nq-dev.json", "test": "nq-test.csv"}}
    summary = D.prepare_dataset(spec, out, progress=False)
    corpus = read(out, "corpus.parquet")
    assert corpus.values.tolist()[0] == ["1", "Aaron", 'Aaron is a "prophet" here']  # DPR's CSV quoting
    assert read(out, "queries/dev.parquet").values.tolist() == [["0", "who is aaron"], ["1", "what is two"]]
    # DPR's first positive (its gold passage) graded 2, the others 1; the repeated one dropped
    assert read(out, "qrels/dev.parquet").values.tolist() == [["0", "1", 2], ["0", "3", 1], ["1", "2", 2]]
    assert any("1 repeated judgment" in w for w in summary["warnings"])
    assert read(out, "queries/test.parquet").qid.tolist() == ["0", "1"]  # 0-based line numbers
    assert [list(a) for a in read(out, "answers/test.parquet").answers] == [["a prophet", "Aaron's"], ["three"]]
    assert len(read(out, "qrels/test.parquet")) == 0  # no judgments, but the file exists
    assert pq.read_schema(out / "answers/test.parquet").remove_metadata() == ANSWERS_SCHEMA


def test_dataset_spec_from_workflow_section():
    section = {"format": "msmarco", "path": "/d", "train_split": "train", "eval_splits": ["dev"],
               "options": {"splits": {"dl19": {"queries": "t.tsv", "qrels": "q.txt"}}}}
    spec = D.dataset_spec(section, ["dev", "dl19"], seed=1)
    assert spec == {"format": "msmarco", "path": "/d", "splits": {
        "dev": D.MSMARCO_SPLITS["dev"], "dl19": {"queries": "t.tsv", "qrels": "q.txt"}}}
    with pytest.raises(ValueError, match="dl21"):
        D.dataset_spec(section, ["dl21"])
    demo = D.dataset_spec({"format": "demo", "path": None, "demo": {"num_passages": 50}}, ["train", "dev"], seed=7)
    assert demo == {"format": "demo", "seed": 7, "num_passages": 50}
    assert D.dataset_spec({"format": "beir", "path": "/b", "options": {}}, ["test"]) == {
        "format": "beir", "path": "/b", "splits": ["test"]}


def test_demo_through_prepare_dataset_and_config_errors(tmp_path):
    spec = {"format": "demo", "path": None, "seed": 3, "num_passages": 60, "num_train_queries": 40, "num_dev_queries": 10}
    summary = D.prepare_dataset(spec, tmp_path, progress=False)
    assert summary["counts"]["corpus.parquet"] == 60 and summary["splits"] == ["train", "dev"]
    with pytest.raises(ValueError, match="unknown key"):
        D.prepare_dataset({"format": "demo", "num_pasages": 10}, tmp_path)
    with pytest.raises(ValueError, match="unknown key"):
        D.prepare_dataset({"format": "beir", "path": str(tmp_path), "corpus": "x"}, tmp_path)
    with pytest.raises(ValueError, match="format"):
        D.prepare_dataset({"format": "trec", "path": str(tmp_path)}, tmp_path)


# ---------------------------------------------------------------------------------------------
# Streaming
def test_corpus_streams_in_row_groups(tmp_path):
    src = tmp_path / "collection.tsv"
    write(src, "".join(f"{i}\tpassage {i}\n" for i in range(2500)))
    n = D.convert_corpus("msmarco", src, tmp_path / "corpus.parquet", {"2499": ("qrels", 1)},
                         row_group_size=1000, progress=False)
    meta = pq.ParquetFile(tmp_path / "corpus.parquet").metadata
    assert n == 2500 and meta.num_rows == 2500 and meta.num_row_groups == 3
    assert pq.read_schema(tmp_path / "corpus.parquet").remove_metadata() == CORPUS_SCHEMA


def test_duplicate_found_across_row_groups_and_nothing_written(tmp_path):
    src = tmp_path / "collection.tsv"
    write(src, "".join(f"{i}\tpassage {i}\n" for i in range(2500)) + "7\tagain\n")
    with pytest.raises(InputError) as e:
        D.convert_corpus("msmarco", src, tmp_path / "corpus.parquet", row_group_size=1000, progress=False)
    assert str(e.value) == f"{src}, line 2501: duplicate passage id '7' (first on line 8)"
    assert not (tmp_path / "corpus.parquet").exists()  # atomic: no half-written artifact
    assert list(tmp_path.iterdir()) == [src]


def test_hash_collision_without_duplicate_is_not_an_error(tmp_path):
    src = write(tmp_path / "collection.tsv", "a\tx\nb\ty\n")
    D._find_duplicate("msmarco", src, {hash("a"), hash("b")})  # both looked at, no real duplicate


def test_json_array_streaming_lines(tmp_path):
    records = [{"question": f"q{i}", "s": "é" * i} for i in range(20)]
    path = write(tmp_path / "a.json", json.dumps(records, indent=2))
    got = list(D.iter_json_array(path, chunk_chars=64))
    assert [r for _, _, r in got] == records
    assert [line for _, line, _ in got][:3] == [2, 6, 10]  # each record spans 4 lines at indent 2
    assert list(D.iter_json_array(write(tmp_path / "e.json", " [ ] "))) == []


def test_gzip_topics(tmp_path):
    import gzip
    path = tmp_path / "t.tsv.gz"
    path.write_bytes(gzip.compress(b"1\tone\n2\ttwo\n"))
    assert D.read_topics_tsv(path) == [("1", "one", 1), ("2", "two", 2)]


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file and the (1-based) line
def _prepare_beir(root: Path, **files: str | bytes) -> None:
    make_beir(root)
    for name, text in files.items():
        write(root / name.replace("__", "/"), text)
    D.prepare_dataset({"format": "beir", "path": str(root)}, root / "out", progress=False)


def _prepare_ms(root: Path, **files: str | bytes) -> None:
    make_msmarco(root)
    for name, text in files.items():
        write(root / name, text)
    D.prepare_dataset({"format": "msmarco", "path": str(root)}, root / "out", progress=False)


def _check(excinfo, path: Path, line: int, problem: str) -> None:
    msg = str(excinfo.value)
    assert msg.startswith(f"{path}, line {line}: "), msg
    assert problem in msg, msg
    assert excinfo.value.path == str(path) and excinfo.value.line == line


def test_bad_wrong_column_count(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"collection.tsv": "0\tzero\n1\tone\textra\n"})
    _check(e, tmp_path / "collection.tsv", 2, "expected 2 tab-separated columns")


def test_bad_json_line(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_beir(tmp_path, **{"corpus.jsonl": '{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": \n'})
    _check(e, tmp_path / "corpus.jsonl", 2, "bad JSON")


def test_bad_duplicate_passage(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"collection.tsv": "".join(f"{i}\tp\n" for i in range(10)) + "\n3\tagain\n"})
    _check(e, tmp_path / "collection.tsv", 12, "duplicate passage id '3' (first on line 4)")


def test_bad_duplicate_query(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"queries.train.tsv": "100\ta\n101\tb\n100\tc\n"})
    _check(e, tmp_path / "queries.train.tsv", 3, "duplicate query id '100' (first on line 1)")


def test_bad_qrels_unknown_passage(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"qrels.dev.small.tsv": "200\t0\t3\t1\n200\t0\t999\t1\n"})
    _check(e, tmp_path / "qrels.dev.small.tsv", 2, "passage '999', which is not in the corpus")
    assert not (tmp_path / "out" / "corpus.parquet").exists()


def test_bad_qrels_unknown_query(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_beir(tmp_path, **{"qrels__train.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq9\td1\t1\n"})
    _check(e, tmp_path / "qrels" / "train.tsv", 3, "query 'q9', which is not in")


def test_bad_empty_passage_text(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"collection.tsv": "0\tzero\n1\t  \n2\tx\n3\tx\n"})
    _check(e, tmp_path / "collection.tsv", 2, "empty passage text for passage '1'")


def test_empty_text_with_title_is_counted_not_fatal(tmp_path):
    make_beir(tmp_path)
    write(tmp_path / "corpus.jsonl", jsonl([{"_id": "d1", "title": "T", "text": ""}, {"_id": "d2", "text": "x"},
                                            {"_id": "3", "text": "y"}]))
    summary = D.prepare_dataset({"format": "beir", "path": str(tmp_path)}, tmp_path / "out", progress=False)
    assert any("1 passage(s) have an empty text (title only)" in w for w in summary["warnings"])


def test_bad_empty_query(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_beir(tmp_path, **{"queries.jsonl": jsonl([{"_id": "q1", "text": "a"}, {"_id": "q2", "text": " "}])})
    _check(e, tmp_path / "queries.jsonl", 2, "empty query text for query 'q2'")


def test_bad_utf8(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"collection.tsv": b"0\tzero\n1\tone\n2\tbad \xff byte\n"})
    _check(e, tmp_path / "collection.tsv", 3, "not valid UTF-8")


def test_bad_utf8_in_json_array(tmp_path):
    path = write(tmp_path / "d.json", b'[\n{"question": "a"},\n{"question": "b\xc3"}\n]\n')
    with pytest.raises(InputError) as e:
        list(D.iter_json_array(path))
    _check(e, path, 3, "not valid UTF-8")


def test_bad_relevance(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"qrels.train.tsv": "100\t0\t1\t1\n101\t0\t2\thigh\n"})
    _check(e, tmp_path / "qrels.train.tsv", 2, "relevance 'high' is not an integer")


def test_bad_qrels_line_missing_a_column(tmp_path):
    """In a 4-column file a line that lost its last field must not read as 'qid pid rel' (it would
    judge passage '0' with relevance 123)."""
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"qrels.train.tsv": "100\t0\t1\t1\n101\t0\t2\n"})
    _check(e, tmp_path / "qrels.train.tsv", 2, "3 columns where the file's first line has 4")
    assert not (tmp_path / "out" / "corpus.parquet").exists()


def test_bad_relevance_outside_int32(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"qrels.dev.small.tsv": "200\t0\t3\t3000000000\n"})
    _check(e, tmp_path / "qrels.dev.small.tsv", 1, "outside the int32 range")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


@pytest.mark.parametrize("name, text, line, what", [
    ("collection.tsv", "0\tzero\n5 \tfive\n", 2, "passage id '5 '"),
    ("queries.train.tsv", "100\tfirst\n101 x\tsecond\n", 2, "query id '101 x'"),
    ("qrels.train.tsv", "100\t0\t1\t1\n101\t0\t2 \t1\n", 2, "passage id '2 '"),
])
def test_bad_id_with_whitespace(tmp_path, name, text, line, what):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{name: text})
    _check(e, tmp_path / name, line, f"{what} contains whitespace")


def test_line_of_tabs_is_a_record_not_a_blank_line(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"queries.train.tsv": "100\tfirst\n\t\n101\tsecond\n"})
    _check(e, tmp_path / "queries.train.tsv", 2, "empty query id")


def test_corpus_and_split_jobs_write_what_prepare_dataset_writes(tmp_path):
    """The workflow's per-job functions give the same artifacts as the one-call preparation, and a
    split judging a passage outside the prepared corpus fails naming its qrels line."""
    src = make_msmarco(tmp_path / "ms")
    section = {"format": "msmarco", "path": str(src)}
    whole = tmp_path / "whole"
    D.prepare_dataset(D.dataset_spec(section, ["train", "dev"]), whole, progress=False)
    parts = tmp_path / "parts"
    summary = D.prepare_corpus(D.dataset_spec(section, []), parts / "corpus.parquet", progress=False)
    assert summary["counts"] == {"corpus.parquet": 10}
    for split in ("train", "dev"):
        out = D.prepare_split(D.dataset_spec(section, [split]), split, parts / "corpus.parquet", parts)
        assert out["splits"] == [split]
    for name in ("corpus.parquet", "queries/train.parquet", "qrels/train.parquet", "qrels/dev.parquet",
                 "answers/dev.parquet"):
        assert read(parts, name).equals(read(whole, name)), name
    write(src / "qrels.dev.small.tsv", "200\t0\t3\t1\n200\t0\t77\t1\n")
    with pytest.raises(InputError) as e:
        D.prepare_split(D.dataset_spec(section, ["dev"]), "dev", parts / "corpus.parquet", tmp_path / "bad")
    _check(e, src / "qrels.dev.small.tsv", 2, "judges passage '77', which is not in the corpus")


def test_msmarco_titles_from_their_own_file(tmp_path):
    """RocketQA-style pid<TAB>title file, in any order: titles join the corpus; passages without a
    title and titles without a passage are counted in the warnings."""
    src = make_msmarco(tmp_path / "ms")
    write(src / "para.title.txt", "".join(f"{i}\tTitle {i}\n" for i in (7, 3, 0, 1, 2, 4, 5, 6, 42)) + "9\t\n")
    summary = D.prepare_dataset({"format": "msmarco", "path": str(src), "titles": "para.title.txt"},
                                tmp_path / "out", progress=False)
    corpus = read(tmp_path / "out", "corpus.parquet")
    assert corpus.pid.tolist() == [str(i) for i in range(10)]  # the collection's order
    assert corpus.title.tolist() == [f"Title {i}" for i in range(8)] + ["", ""]  # 8 absent, 9 empty
    assert any("1 passage(s) of the corpus have no title" in w for w in summary["warnings"])
    assert any("1 title(s) name passages that are not in the corpus" in w for w in summary["warnings"])
    for text, line, problem in (("0\tA\n1\tB\n0\tC\n", 3, "passage '0' has a second title (first on line 1)"),
                                ("0\tA\n1\tB\textra\n", 2, "expected 2 tab-separated columns (pid, title)")):
        write(src / "para.title.txt", text)
        with pytest.raises(InputError) as e:
            D.prepare_dataset({"format": "msmarco", "path": str(src), "titles": "para.title.txt"},
                              tmp_path / "out2", progress=False)
        _check(e, src / "para.title.txt", line, problem)
        assert not (tmp_path / "out2" / "corpus.parquet").exists()
    with pytest.raises(InputError, match="nope.txt: file not found"):
        D.prepare_dataset({"format": "msmarco", "path": str(src), "titles": "nope.txt"}, tmp_path / "o3",
                          progress=False)


def test_title_lookup_survives_hash_collisions(monkeypatch):
    from simlm_core import passage_titles as T

    monkeypatch.setattr(T, "id_hashes", lambda ids: np.zeros(len(ids), dtype=np.int64))  # every id collides
    lookup = T.TitleLookup(path="t", pids=pa.array(["a", "b", "c"]), titles=pa.array(["A", "B", "C"]),
                           sorted_hashes=np.zeros(3, np.int64), order=np.arange(3), _used=np.zeros(3, bool))
    assert lookup.lookup(["c", "x", "a"]) == ["C", "", "A"]
    assert (lookup.matched, lookup.missing, lookup.unused()) == (2, 1, 1)


def test_bad_conflicting_judgments(tmp_path):
    with pytest.raises(InputError) as e:
        _prepare_ms(tmp_path, **{"qrels.train.tsv": "100\t0\t1\t1\n101\t0\t2\t1\n100\t0\t1\t0\n"})
    _check(e, tmp_path / "qrels.train.tsv", 3, "(line 1 says 1, this line 0)")


def test_bad_dpr_json(tmp_path):
    make_nq(tmp_path)
    write(tmp_path / "biencoder-nq-dev.json", '[\n  {"question": "a", "answers": []},\n  {"question": "b" "answers": []}\n]')
    with pytest.raises(InputError) as e:
        D.prepare_dataset({"format": "nq", "path": str(tmp_path), "splits": {"dev": "biencoder-nq-dev.json"}},
                          tmp_path / "out", progress=False)
    _check(e, tmp_path / "biencoder-nq-dev.json", 3, "bad JSON: Expecting ',' delimiter")


def test_bad_dpr_positive_without_id(tmp_path):
    path = write(tmp_path / "d.json", json.dumps([{"question": "a", "answers": []},
                                                  {"question": "b", "answers": [], "positive_ctxs": [{"title": "t"}]}],
                                                 indent=1))
    with pytest.raises(InputError) as e:
        D._nq_split("dev", path, [])
    _check(e, path, 6, "record 1: positive_ctxs[0] has no passage_id/psg_id")


def test_bad_dpr_answer_literal(tmp_path):
    path = write(tmp_path / "nq-test.csv", "q one\t['a']\nq two\t['b', oops]\n")
    with pytest.raises(InputError) as e:
        D.read_dpr_qas(path)
    _check(e, path, 2, "not a Python list literal")


def test_bad_dpr_passage_columns(tmp_path):
    make_nq(tmp_path)
    write(tmp_path / "psgs_w100.tsv", "id\ttext\ttitle\n1\tt\tT\n2\tonly two\n")
    with pytest.raises(InputError) as e:
        D.prepare_dataset({"format": "nq", "path": str(tmp_path), "splits": {"test": "nq-test.csv"}},
                          tmp_path / "out", progress=False)
    _check(e, tmp_path / "psgs_w100.tsv", 3, "expected 3 tab-separated columns")


# ---------------------------------------------------------------------------------------------
# Real data (../shared/data)
@needs["scifact"]
def test_real_scifact(tmp_path):
    summary = D.prepare_dataset({"format": "beir", "path": str(DATA / "scifact")}, tmp_path, progress=False)
    assert summary["splits"] == ["test", "train"] and summary["warnings"] == []
    c = summary["counts"]
    assert (c["corpus.parquet"], c["queries/train.parquet"], c["qrels/train.parquet"]) == (5183, 809, 919)
    assert (c["queries/test.parquet"], c["qrels/test.parquet"], c["answers/test.parquet"]) == (300, 339, 0)
    corpus = pq.read_table(tmp_path / "corpus.parquet")
    assert corpus.schema.remove_metadata() == CORPUS_SCHEMA and corpus.column("pid")[0].as_py() == "4983"
    assert pq.read_schema(tmp_path / "queries/test.parquet").remove_metadata() == QUERIES_SCHEMA


@needs["trec"]
def test_real_dl19_topics_and_graded_qrels(tmp_path):
    topics = D.read_topics_tsv(DATA / "trec" / "topics.dl19-passage.txt")
    qrels = D.read_qrels(DATA / "trec" / "qrels.dl19-passage.txt")
    assert len(topics) == 43 and len(qrels) == 9260
    assert {r[2] for r in qrels} == {0, 1, 2, 3} and len({r[0] for r in qrels}) == 43
    dev = D.read_qrels(DATA / "trec" / "qrels.msmarco-passage.dev-subset.txt")  # MS MARCO 'qid 0 pid 1'
    assert len(dev) == 7437 and {r[2] for r in dev} == {1}


@needs["trec"]
def test_real_trec_dl_as_msmarco_splits(tmp_path):
    """DL19 (43 judged topics) and DL20 (200 topics, 54 judged) over a tiny collection of judged pids."""
    trec = DATA / "trec"
    pids = sorted({r[1] for f in ("qrels.dl19-passage.txt", "qrels.dl20-passage.txt") for r in D.read_qrels(trec / f)})
    write(tmp_path / "collection.tsv", "".join(f"{p}\tpassage {p}\n" for p in pids))
    spec = {"format": "msmarco", "path": str(tmp_path), "splits": {
        "dl19": {"queries": str(trec / "topics.dl19-passage.txt"), "qrels": str(trec / "qrels.dl19-passage.txt")},
        "dl20": {"queries": str(trec / "topics.dl20.txt"), "qrels": str(trec / "qrels.dl20-passage.txt")}}}
    summary = D.prepare_dataset(spec, tmp_path / "out", progress=False)
    c = summary["counts"]
    assert (c["queries/dl19.parquet"], c["qrels/dl19.parquet"]) == (43, 9260)
    assert (c["queries/dl20.parquet"], c["qrels/dl20.parquet"]) == (54, 11386)
    assert summary["warnings"] == [f"split dl20: 146 of 200 topics in {trec / 'topics.dl20.txt'} have no "
                                   f"judgments in {trec / 'qrels.dl20-passage.txt'} and were dropped"]
    rel = read(tmp_path / "out", "qrels/dl19.parquet").relevance
    assert rel.dtype == "int32" and sorted(rel.unique()) == [0, 1, 2, 3]


@needs["trec"]
def test_real_dpr_topics(tmp_path):
    qas = D.read_dpr_qas(DATA / "trec" / "topics.dpr.nq.dev.txt")
    assert len(qas) == 8757
    assert qas[3][:3] == ("3", "when does the new my hero academia movie come out", ["July 5 , 2018"])
    assert qas[31][2][:2] == ["the Ingres Museum", "Château d'Amboise"]  # a CSV-quoted answer list
    assert len(D.read_dpr_qas(DATA / "trec" / "topics.dpr.nq.test.txt")) == 3610


@needs["nq-dpr-sample"]
@needs["trec"]
def test_real_nq_sample(tmp_path):
    """The DPR json excerpt + DPR dev topics over a psgs_w100.tsv built from the sample's 751 passages."""
    rows = [json.loads(line) for line in (DATA / "nq-dpr-sample" / "corpus.jsonl").open()]
    quote = lambda s: '"' + s.replace('"', '""') + '"'  # noqa: E731  (DPR's CSV quoting)
    write(tmp_path / "psgs_w100.tsv", "id\ttext\ttitle\n" + "".join(
        f"{r['_id']}\t{quote(r['text'])}\t{quote(r['title'])}\n" for r in rows))
    spec = {"format": "nq", "path": str(tmp_path), "splits": {
        "dev": str(DATA / "nq-dpr-sample" / "raw" / "biencoder-nq-dev.sample.json"),
        "test": str(DATA / "trec" / "topics.dpr.nq.dev.txt")}}
    summary = D.prepare_dataset(spec, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    corpus = read(out, "corpus.parquet").set_index("pid")
    assert len(corpus) == 751 and corpus.loc[rows[0]["_id"], "text"] == rows[0]["text"]
    assert summary["counts"]["qrels/dev.parquet"] == 18  # 22 positives, 4 repeated
    assert any("4 repeated judgment" in w for w in summary["warnings"])
    dev = read(out, "queries/dev.parquet")
    assert dev.qid.tolist() == ["0", "1", "2", "3", "4"]  # DPR record index
    answers = {q: list(a) for q, a in read(out, "answers/dev.parquet").values}
    assert answers["2"] == ["July 5 , 2018"]
    beir_qrels = pd.read_csv(DATA / "nq-dpr-sample" / "qrels" / "test.tsv", sep="\t", dtype=str)
    line_of = {q["text"]: q["_id"] for q in map(json.loads, (DATA / "nq-dpr-sample" / "queries.jsonl").open())}
    ours = read(out, "qrels/dev.parquet").merge(dev, on="qid")
    ours = {(line_of[t], p) for t, p in zip(ours.text, ours.pid)}
    assert ours == set(zip(beir_qrels["query-id"], beir_qrels["corpus-id"]))
    assert summary["counts"]["queries/test.parquet"] == 8757 and summary["counts"]["qrels/test.parquet"] == 0
