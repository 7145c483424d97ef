"""Artifact I/O: random passage access across Parquet row groups, atomic writes."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simlm_core.io import PassageStore, atomic_path


def test_passage_store_reads_across_row_groups_in_request_order(tmp_path):
    n = 1000
    table = pa.table({"pid": [f"p{i}" for i in range(n)], "title": [f"t{i}" for i in range(n)],
                      "text": [f"x{i}" for i in range(n)]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=100)
    store = PassageStore(tmp_path / "c.parquet")
    assert store.table.column("text").num_chunks == 10
    pids = ["p999", "p0", "p150", "p150", "p501"]
    assert store.get(pids) == [(f"t{p[1:]}", f"x{p[1:]}") for p in pids]
    with pytest.raises(KeyError, match="nope"):
        store.get(["p1", "nope"])


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
