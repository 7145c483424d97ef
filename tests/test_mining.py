"""simlm_core.mining: hard negatives = top-k minus labelled positives."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from simlm_core.io import InputError, NEGATIVES_SCHEMA, QRELS_SCHEMA, RUN_SCHEMA, read_table, write_run, write_table
from simlm_core.mining import iter_run_parts, mine_negatives, mine_negatives_parquet, write_negatives


def make_run(spec: dict[str, list[str]]) -> pd.DataFrame:
    rows = [(q, p, r + 1, 100.0 - r) for q, pids in spec.items() for r, p in enumerate(pids)]
    return pd.DataFrame(rows, columns=["qid", "pid", "rank", "score"])


def make_qrels(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["qid", "pid", "relevance"])


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    n_q, n_p = int(rng.integers(1, 30)), int(rng.integers(5, 60))
    run_rows = []
    for q in range(n_q):
        if rng.random() < 0.15:
            continue  # some queries are missing from the run
        depth = int(rng.integers(1, n_p + 1))
        for r, p in enumerate(rng.permutation(n_p)[:depth]):
            run_rows.append((f"q{q}", f"d{p}", r + 1, float(-r)))
    run = pd.DataFrame(run_rows, columns=["qid", "pid", "rank", "score"])
    qrel_rows = []
    for q in range(n_q + 3):  # a few qrels queries the run never saw
        for p in rng.choice(n_p, size=int(rng.integers(0, 6)), replace=False):
            qrel_rows.append((f"q{q}", f"d{p}", int(rng.integers(0, 4))))  # graded 0..3
    return run.sample(frac=1.0, random_state=seed), make_qrels(qrel_rows)


@pytest.mark.parametrize("seed", range(40))
def test_never_a_positive_property(seed):
    run, qrels = random_case(seed)
    rng = np.random.default_rng(seed + 1000)
    min_rel = int(rng.integers(1, 4))
    top_k = int(rng.integers(1, 70))
    ws = int(rng.integers(0, 5))
    we = None if rng.random() < 0.5 else ws + int(rng.integers(1, 40))
    nn = None if rng.random() < 0.5 else int(rng.integers(1, 10))
    df, stats = mine_negatives(run, qrels, top_k=top_k, window_start=ws, window_end=we,
                               num_negatives=nn, min_relevance=min_rel, seed=seed)
    judged_rel = qrels[qrels.relevance >= 1].groupby("qid").pid.apply(set).to_dict()
    positives = qrels[qrels.relevance >= min_rel].groupby("qid").pid.apply(sorted).to_dict()
    ranked = run.sort_values(["qid", "rank"]).groupby("qid").pid.apply(list).to_dict()
    stop = top_k if we is None else min(top_k, we)
    for row in df.itertuples(index=False):
        negs = list(row.negatives)
        assert not set(negs) & judged_rel.get(row.qid, set())  # no judged-relevant pid, any grade
        assert list(row.positives) == positives[row.qid]
        window = [p for p in ranked[row.qid][ws:stop] if p not in judged_rel.get(row.qid, set())]
        if nn is None:
            assert negs == window
        else:
            assert len(negs) == min(nn, len(window))
            pos = [window.index(p) for p in negs]
            assert pos == sorted(pos)  # subset of the window, in rank order
        assert len(negs) > 0
    # every query with a positive is either output or counted
    assert stats["queries_with_positives"] == len(positives)
    assert (stats["queries_in_output"] + stats["queries_missing_from_run"]
            + stats["queries_without_negatives"]) == len(positives)
    assert stats["queries_in_output"] == len(df)
    assert df.qid.tolist() == sorted(df.qid)


def test_window_positions_counted_before_removing_positives():
    run = make_run({"q1": ["a", "P", "b", "c", "d", "e"]})
    qrels = make_qrels([("q1", "P", 1)])
    df, _ = mine_negatives(run, qrels, window_start=0, window_end=3)
    assert list(df.negatives[0]) == ["a", "b"]  # positions 0..2 are a, P, b
    df, _ = mine_negatives(run, qrels, window_start=2, window_end=4)
    assert list(df.negatives[0]) == ["b", "c"]
    df, _ = mine_negatives(run, qrels, top_k=4, window_start=1)
    assert list(df.negatives[0]) == ["b", "c"]  # top_k caps the window
    # ranks need not start at 1 or be contiguous: only their order matters
    run2 = run.assign(rank=run["rank"] * 10 + 7).iloc[::-1]
    df2, st = mine_negatives(run2, qrels, window_start=0, window_end=3)
    assert list(df2.negatives[0]) == ["a", "b"] and st["run_order"] == "unsorted"


def test_graded_qrels_exclusion_and_positives():
    run = make_run({"q1": ["r1", "r2", "r0", "n1"]})
    qrels = make_qrels([("q1", "r2", 2), ("q1", "r1", 1), ("q1", "r0", 0)])
    df, _ = mine_negatives(run, qrels, min_relevance=2)
    assert list(df.positives[0]) == ["r2"]
    assert list(df.negatives[0]) == ["r0", "n1"]  # judged 1 is no positive but never a negative
    df, _ = mine_negatives(run, qrels, min_relevance=1)
    assert list(df.positives[0]) == ["r1", "r2"]


def test_sampling_is_deterministic_and_per_query():
    pids = [f"d{i}" for i in range(100)]
    run = make_run({"q1": pids, "q2": pids[::-1], "q3": pids})
    qrels = make_qrels([("q1", "d0", 1), ("q2", "d5", 1), ("q3", "d9", 1)])
    a, _ = mine_negatives(run, qrels, num_negatives=7, seed=1)
    b, _ = mine_negatives(run.sample(frac=1.0, random_state=3), qrels, num_negatives=7, seed=1)
    c, _ = mine_negatives(run, qrels, num_negatives=7, seed=2)
    as_lists = lambda df: [list(x) for x in df.negatives]  # noqa: E731
    assert as_lists(a) == as_lists(b)
    assert as_lists(a) != as_lists(c)
    for negs, order in zip(as_lists(a), [pids, pids[::-1], pids]):
        assert len(negs) == 7 and len(set(negs)) == 7
        assert [order.index(p) for p in negs] == sorted(order.index(p) for p in negs)
    # a query's sample does not depend on the other queries in the run
    only_q1, _ = mine_negatives(run[run.qid == "q1"], qrels, num_negatives=7, seed=1)
    assert as_lists(only_q1) == as_lists(a)[:1]
    # fewer candidates than num_negatives: all of them
    d, _ = mine_negatives(run, qrels, num_negatives=7, top_k=5)
    assert [len(x) for x in as_lists(d)] == [4, 5, 5]  # q1 loses its positive d0


def test_stats_count_dropped_queries():
    run = make_run({"q1": ["a", "b"], "q2": ["P2"], "q9": ["a"]})
    qrels = make_qrels([
        ("q1", "P1", 1),            # in output
        ("q2", "P2", 1),            # only a positive retrieved: no negatives
        ("q3", "P3", 1),            # no run
        ("q4", "P4", 1),            # no run
        ("q5", "x", 0),             # no positive
    ])
    df, st = mine_negatives(run, qrels)
    assert df.qid.tolist() == ["q1"]
    assert st["queries_with_positives"] == 4
    assert st["queries_missing_from_run"] == 2 and st["queries_missing_from_run_examples"] == ["q3", "q4"]
    assert st["queries_without_negatives"] == 1 and st["queries_without_negatives_examples"] == ["q2"]
    assert st["queries_without_positives"] == 1 and st["queries_without_positives_examples"] == ["q5"]
    assert st["run_rows"] == 4 and st["run_rows_ignored"] == 1  # q9 is not labelled
    assert st["positives_removed_from_window"] == 1
    assert st["negatives_total"] == 2 and st["rows_per_s"] > 0
    json.dumps(st)  # serialisable as the stats artifact

    # restricting to a query list: q1 and an unlabelled query
    df, st = mine_negatives(run, qrels, queries=["q1", "q7"])
    assert df.qid.tolist() == ["q1"]
    assert st["queries_with_positives"] == 1 and st["queries_without_positives_examples"] == ["q7"]
    assert st["qrels_queries_ignored"] == 4


def test_duplicate_run_rows_keep_best_rank():
    run = pd.DataFrame({"qid": ["q"] * 4, "pid": ["a", "b", "a", "c"], "rank": [1, 2, 3, 4]})
    df, st = mine_negatives(run, make_qrels([("q", "z", 1)]))
    assert list(df.negatives[0]) == ["a", "b", "c"] and st["run_duplicate_rows_dropped"] == 1
    # the repeated row still occupies its position (positions are the run's own rank order)
    df, _ = mine_negatives(run, make_qrels([("q", "z", 1)]), window_end=3)
    assert list(df.negatives[0]) == ["a", "b"]
    # a pid seen before the window is not a negative inside it either
    df, _ = mine_negatives(run, make_qrels([("q", "z", 1)]), window_start=2)
    assert list(df.negatives[0]) == ["c"]


def test_string_fingerprints_and_duplicates():
    from simlm_core.mining import _duplicate_pairs, _string_fingerprints

    rng = np.random.default_rng(0)
    alphabet = list("abcdefghij0123456789é€")
    words = ["", "a", "é"] + ["".join(rng.choice(alphabet, size=int(rng.integers(1, 40)))) for _ in range(3000)]
    words = list(dict.fromkeys(words))
    arr = pa.array(words + words[::-1])
    h = _string_fingerprints(arr, chunk_rows=257)
    n = len(words)
    assert len(set(h[:n].tolist())) == n  # distinct strings, distinct fingerprints
    np.testing.assert_array_equal(h[:n], h[n:][::-1])  # equal strings, equal fingerprints
    sliced = arr.slice(5, 100)  # non-zero array offset
    np.testing.assert_array_equal(_string_fingerprints(sliced), h[5:105])
    np.testing.assert_array_equal(_string_fingerprints(arr.cast(pa.large_string())), h)
    groups = np.array([0, 0, 0, 1, 1, 1])
    fp = _string_fingerprints(pa.array(["x", "y", "x", "x", "z", "z"]))
    assert _duplicate_pairs(groups, fp).tolist() == [False, False, True, False, False, True]


def test_bad_arguments():
    run, qrels = make_run({"q": ["a"]}), make_qrels([("q", "b", 1)])
    for kwargs in [{"top_k": 0}, {"window_start": -1}, {"window_start": 3, "window_end": 3},
                   {"num_negatives": 0}]:
        with pytest.raises(ValueError):
            mine_negatives(run, qrels, **kwargs)
    with pytest.raises(ValueError, match="lacks column"):
        mine_negatives(run.drop(columns="rank"), qrels)


def test_arrow_input_and_roundtrip(tmp_path):
    run = make_run({"q1": ["a", "b", "c"], "q2": ["c", "d"]})
    qrels = make_qrels([("q1", "b", 1), ("q2", "x", 3)])
    df_pd, _ = mine_negatives(run, qrels)
    df_pa, _ = mine_negatives(pa.Table.from_pandas(run), pa.Table.from_pandas(qrels))
    assert [list(x) for x in df_pd.negatives] == [list(x) for x in df_pa.negatives]
    write_negatives(df_pd, tmp_path / "neg.parquet")
    back = read_table(tmp_path / "neg.parquet", NEGATIVES_SCHEMA)
    assert back.qid.tolist() == ["q1", "q2"]
    assert [list(x) for x in back.negatives] == [["a", "c"], ["c", "d"]]
    assert [list(x) for x in back.positives] == [["b"], ["x"]]


def test_mine_negatives_driver(tmp_path):
    from simlm_core.drivers.mine_negatives import main

    write_run(make_run({"q1": ["a", "b", "c", "d"], "q2": ["e"]}), tmp_path / "run.parquet")
    write_table(make_qrels([("q1", "b", 1), ("q2", "e", 1), ("q3", "a", 1)]), tmp_path / "qrels.parquet",
                QRELS_SCHEMA)
    args = {"run_path": str(tmp_path / "run.parquet"), "qrels_path": str(tmp_path / "qrels.parquet"),
            "out_path": str(tmp_path / "neg.parquet"), "stats_path": str(tmp_path / "neg.json"),
            "num_negatives": 2, "seed": 7}
    main(["--args-json", json.dumps(args)])
    neg = read_table(tmp_path / "neg.parquet", NEGATIVES_SCHEMA)
    assert neg.qid.tolist() == ["q1"] and len(neg.negatives[0]) == 2
    st = json.loads((tmp_path / "neg.json").read_text())
    assert st["queries_missing_from_run"] == 1 and st["queries_without_negatives"] == 1
    write_table(pd.DataFrame({"qid": ["q"], "pid": ["p"]}), tmp_path / "bad.parquet",
                RUN_SCHEMA.remove(3).remove(2))
    from simlm_core.io import InputError

    for part_rows in (None, 1000):
        with pytest.raises(InputError, match="bad.parquet.*rank"):
            main(["--args-json", json.dumps({**args, "run_path": str(tmp_path / "bad.parquet"),
                                             "part_rows": part_rows})])
    main(["--args-json", json.dumps({**args, "part_rows": None, "out_path": str(tmp_path / "n2.parquet")})])
    assert read_table(tmp_path / "n2.parquet", NEGATIVES_SCHEMA).equals(neg)


def test_unsorted_run_with_huge_rank_values():
    # rank values too wide to pack into one sort key: the lexsort fallback, same answer
    run = pd.DataFrame({"qid": ["q2", "q1", "q2", "q1", "q1"], "pid": ["c", "b", "d", "a", "e"],
                        "rank": [10**17, 2**62, 5, -(2**62), 2**62 + 1]})
    qrels = make_qrels([("q1", "zz", 1), ("q2", "zz", 1)])
    df, st = mine_negatives(run, qrels)
    assert [list(x) for x in df.negatives] == [["a", "b", "e"], ["d", "c"]]
    assert st["run_order"] == "unsorted"


def test_empty_inputs(tmp_path):
    empty_run = make_run({})
    qrels = make_qrels([("a", "x", 1)])
    df, st = mine_negatives(empty_run.astype({"qid": str, "pid": str, "rank": "int32"}), qrels, num_negatives=3)
    assert len(df) == 0 and st["queries_missing_from_run"] == 1
    df, st = mine_negatives(make_run({"a": ["y"]}), make_qrels([]).astype({"qid": str, "pid": str, "relevance": "int32"}))
    assert len(df) == 0 and st["queries_with_positives"] == 0 and st["run_rows_ignored"] == 1
    write_negatives(df, tmp_path / "empty.parquet")
    assert len(read_table(tmp_path / "empty.parquet", NEGATIVES_SCHEMA)) == 0


def _lists(df):
    return [(q, list(p), list(n)) for q, p, n in zip(df.qid, df.positives, df.negatives)]


@pytest.mark.parametrize("seed", range(6))
def test_parquet_parts_equal_whole_run(tmp_path, seed):
    run, qrels = random_case(seed)
    path = tmp_path / "run.parquet"
    write_run(run, path)  # sorted by qid, rank
    kwargs = dict(top_k=30, window_start=1, num_negatives=5 if seed % 2 else None, seed=seed)
    whole, st_whole = mine_negatives(run, qrels, **kwargs)
    for part_rows in (1, 13, 10**6):
        parted, st = mine_negatives_parquet(path, qrels, part_rows=part_rows, **kwargs)
        assert _lists(parted) == _lists(whole)
        for key in ("queries_missing_from_run", "queries_without_negatives", "negatives_total",
                    "run_rows", "run_rows_ignored", "positives_removed_from_window"):
            assert st[key] == st_whole[key], key
        assert st["run_order"] == "sorted"
    # parts never split a query
    parts = list(iter_run_parts(path, part_rows=13))
    seen = [set(p.column("qid").to_pylist()) for p in parts]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert sum(p.num_rows for p in parts) == len(run)


def test_parquet_grouped_and_split_runs(tmp_path):
    run = make_run({"q2": ["a", "b", "c"], "q1": ["d", "e"], "q3": ["f", "g"]})
    qrels = make_qrels([("q1", "e", 1), ("q2", "zz", 1), ("q3", "g", 1)])
    write_table(run, tmp_path / "grouped.parquet", RUN_SCHEMA)  # query blocks in no qid order
    df, st = mine_negatives_parquet(tmp_path / "grouped.parquet", qrels, part_rows=2)
    assert _lists(df) == _lists(mine_negatives(run, qrels)[0])
    assert df.qid.tolist() == ["q1", "q2", "q3"] and st["run_order"] == "grouped"
    split = pd.concat([run.iloc[:2], run.iloc[3:], run.iloc[2:3]])  # q2's rank 3 at the end
    write_table(split, tmp_path / "split.parquet", RUN_SCHEMA)
    with pytest.raises(InputError, match="split.parquet.*'q2'"):
        mine_negatives_parquet(tmp_path / "split.parquet", qrels, part_rows=2)
    # in one part the same run is fine (sorted in memory)
    df, st = mine_negatives_parquet(tmp_path / "split.parquet", qrels, part_rows=100)
    assert _lists(df) == _lists(mine_negatives(run, qrels)[0]) and st["run_order"] == "unsorted"
