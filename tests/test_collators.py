"""Training groups: layout, determinism per (seed, epoch), filling, teacher alignment, errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from simlm_core.collators import BiencoderCollator, BiencoderDataset, tokenize_passages
from simlm_core.io import NEGATIVES_SCHEMA, SCORES_SCHEMA, InputError, read_table, write_table


def _negatives(ds):
    return read_table(ds.negatives_path, NEGATIVES_SCHEMA).set_index("qid")


def _pids(dataset, rows):
    return [dataset.corpus.column("pid")[int(r)].as_py() for r in rows]


def test_groups_positive_first_and_batch_shapes(tiny_dataset, tiny_bert_dir):
    data = BiencoderDataset(tiny_dataset.negatives_path, tiny_dataset.queries_path, tiny_dataset.corpus_path, 4, seed=1)
    negs = _negatives(tiny_dataset)
    assert len(data) == tiny_dataset.num_queries
    for idx in range(len(data)):
        qid = data.qids[idx]
        pids = _pids(data, data.group_rows(idx))
        assert len(pids) == 4 and len(set(pids)) == 4
        assert pids[0] in set(negs.loc[qid, "positives"])
        assert set(pids[1:]) <= set(negs.loc[qid, "negatives"])
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = BiencoderCollator(tok, q_max_len=8, p_max_len=16)([data[i] for i in range(3)])
    assert batch["query"]["input_ids"].shape[0] == 3 and batch["query"]["input_ids"].shape[1] <= 8
    assert batch["passage"]["input_ids"].shape[0] == 12 and batch["passage"]["input_ids"].shape[1] <= 16
    assert "teacher_scores" not in batch
    for side in ("query", "passage"):  # host-side token counts, for packed training (no sync)
        assert batch[side]["num_tokens"] == int(batch[side]["attention_mask"].sum())
        assert isinstance(batch[side]["num_tokens"], int)
    # first passage of each group is the positive passage's text
    item = data[0]
    title, text = item["passages"][0]
    row = data.group_rows(0)[0]
    assert (title, text) == (data.corpus.column("title")[int(row)].as_py(), data.corpus.column("text")[int(row)].as_py())


def test_sampling_deterministic_per_seed_and_epoch(tiny_dataset):
    args = (tiny_dataset.negatives_path, tiny_dataset.queries_path, tiny_dataset.corpus_path, 5)
    a, b, c = BiencoderDataset(*args, seed=7), BiencoderDataset(*args, seed=7), BiencoderDataset(*args, seed=8)

    def groups(d):
        return [tuple(d.group_rows(i)) for i in range(len(d))]

    assert groups(a) == groups(b)
    assert groups(a) != groups(c)
    epoch0 = groups(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert groups(a) == groups(b)
    assert groups(a) != epoch0
    a.set_epoch(0)
    assert groups(a) == epoch0
    # access order does not matter (what dataloader workers rely on)
    assert [tuple(a.group_rows(i)) for i in reversed(range(len(a)))] == list(reversed(epoch0))


def test_fill_from_random_corpus_when_short(tiny_dataset, tmp_path):
    negs = pd.DataFrame(
        [("q00", ["p00"], ["p10"]), ("q01", ["p01", "p02"], ["p20", "p21", "p22", "p23", "p24"])],
        columns=["qid", "positives", "negatives"],
    )
    path = tmp_path / "negs.parquet"
    write_table(negs, path, NEGATIVES_SCHEMA)
    data = BiencoderDataset(path, tiny_dataset.queries_path, tiny_dataset.corpus_path, 4, seed=0)
    assert data.stats["queries_short_of_negatives"] == 1
    assert data.stats["fill_passages_per_epoch"] == 2
    for epoch in range(5):
        data.set_epoch(epoch)
        pids = _pids(data, data.group_rows(0))
        assert pids[0] == "p00" and "p10" in pids[1:]
        assert len(set(pids)) == 4 and "p00" not in pids[1:]
        assert len(set(_pids(data, data.group_rows(1))[1:]) - {"p20", "p21", "p22", "p23", "p24"}) == 0
    assert data.filled == 2 * 5


def test_teacher_scores_aligned_and_restricting(tiny_dataset, tiny_bert_dir, tmp_path):
    data = BiencoderDataset(
        tiny_dataset.negatives_path, tiny_dataset.queries_path, tiny_dataset.corpus_path, 4, seed=3,
        teacher_scores_path=tiny_dataset.teacher_scores_path,
    )
    table = read_table(tiny_dataset.teacher_scores_path, SCORES_SCHEMA)
    lookup = {(q, p): s for q, p, s in zip(table.qid, table.pid, table.score)}
    for idx in range(len(data)):
        item = data[idx]
        pids = _pids(data, data.group_rows(idx))
        expected = np.array([lookup[(data.qids[idx], p)] for p in pids], dtype=np.float32)
        assert np.array_equal(item["teacher_scores"], expected)
        assert item["teacher_scores"][0] > 5  # the positive's teacher score comes first
    batch = BiencoderCollator(AutoTokenizer.from_pretrained(tiny_bert_dir))([data[0], data[1]])
    assert batch["teacher_scores"].shape == (2, 4)

    # Only scored passages are used; queries without a scored positive are left out.
    q01 = pd.DataFrame([("q01", "p01", 9.0), ("q01", "p20", 1.0), ("q01", "p21", 0.5)], columns=["qid", "pid", "score"])
    sub = pd.concat([table[~table.qid.isin(["q00", "q01"])], q01])
    sub_path = tmp_path / "scores.parquet"
    write_table(sub, sub_path, SCORES_SCHEMA)
    negs = _negatives(tiny_dataset)
    negs.at["q01", "negatives"] = ["p20", "p30", "p21", "p31", "p32", "p20"]  # p20 twice: deduplicated
    negs_path = tmp_path / "negs.parquet"
    write_table(negs.reset_index(), negs_path, NEGATIVES_SCHEMA)
    data = BiencoderDataset(negs_path, tiny_dataset.queries_path, tiny_dataset.corpus_path, 4, seed=3,
                            teacher_scores_path=sub_path)
    assert "q00" not in [data.qids[i] for i in data.usable]
    assert data.stats["queries_skipped_no_teacher_scores"] == 1
    idx = [data.qids[i] for i in data.usable].index("q01")
    assert data.stats["queries_short_of_negatives"] == 1
    pids = _pids(data, data.group_rows(idx))
    assert pids[0] == "p01" and set(pids[1:]) == {"p20", "p21"}  # repeats of scored negatives
    assert data[idx]["teacher_scores"].tolist() == [9.0] + [{"p20": 1.0, "p21": 0.5}[p] for p in pids[1:]]


def test_input_errors_name_the_file(tiny_dataset, tmp_path):
    bad = tmp_path / "negs.parquet"
    write_table(pd.DataFrame([("q00", ["nope"], ["p10"])], columns=["qid", "positives", "negatives"]), bad,
                NEGATIVES_SCHEMA)
    with pytest.raises(InputError, match="negs.parquet.*'nope'"):
        BiencoderDataset(bad, tiny_dataset.queries_path, tiny_dataset.corpus_path, 4)
    write_table(pd.DataFrame([("q00", [], ["p10"])], columns=["qid", "positives", "negatives"]), bad, NEGATIVES_SCHEMA)
    with pytest.raises(InputError, match="no positive"):
        BiencoderDataset(bad, tiny_dataset.queries_path, tiny_dataset.corpus_path, 4)
    write_table(pd.DataFrame([("zz", ["p00"], ["p10"])], columns=["qid", "positives", "negatives"]), bad, NEGATIVES_SCHEMA)
    with pytest.raises(InputError, match="no query text"):
        BiencoderDataset(bad, tiny_dataset.queries_path, tiny_dataset.corpus_path, 4)
    pq.write_table(pq.read_table(tiny_dataset.queries_path), bad)
    with pytest.raises(InputError, match="negs.parquet"):
        BiencoderDataset(bad, tiny_dataset.queries_path, tiny_dataset.corpus_path, 4)


def test_passage_formats(tiny_bert_dir):
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    pair = tokenize_passages(tok, ["apple banana", ""], ["river lake", "golf"], 32, "pair")
    ids = pair["input_ids"][0]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "apple", "banana", "[SEP]", "river", "lake", "[SEP]"]
    assert pair["token_type_ids"][0] == [0, 0, 0, 0, 1, 1, 1]
    assert tok.convert_ids_to_tokens(pair["input_ids"][1]) == ["[CLS]", "[SEP]", "golf", "[SEP]"]
    concat = tokenize_passages(tok, ["apple banana"], ["river lake"], 32, "concat")
    assert tok.convert_ids_to_tokens(concat["input_ids"][0]) == ["[CLS]", "apple", "banana", "river", "lake", "[SEP]"]
    short = tokenize_passages(tok, ["apple banana"], ["river lake ocean stream"], 5, "pair")
    assert len(short["input_ids"][0]) == 5
