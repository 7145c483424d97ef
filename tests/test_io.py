"""Artifact I/O: random passage access across Parquet row groups, atomic writes."""
import numpy as np
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


# ---------------------------------------------------------------------------------------------
# PassageStore: memory-mapped Arrow cache + sorted fixed-width pid keys
import os  # noqa: E402
import random  # noqa: E402

from simlm_core import io as sio  # noqa: E402
from simlm_core.io import CORPUS_SCHEMA, InputError, corpus_arrow_cache, write_table  # noqa: E402


def _reference_get(table: pa.Table, pids):
    """The old PassageStore.get: a dict over the whole corpus (fine for a test corpus)."""
    rows = {p: (t, x) for p, t, x in zip(*(table.column(c).to_pylist() for c in ("pid", "title", "text")))}
    missing = [p for p in pids if p not in rows][:5]
    if missing:
        raise KeyError(missing)
    return [rows[p] for p in pids]


def _write_corpus(path, pids, seed=0, row_group_size=None):
    rng = random.Random(seed)
    table = pa.table({"pid": pids,
                      "title": [None if i % 7 == 0 else f"title {i} é" for i in range(len(pids))],
                      "text": [" ".join(rng.choice(["a", "bb", "ccc", "ü"]) for _ in range(rng.randrange(12)))
                               for _ in pids]}, schema=CORPUS_SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size)
    return table


def _cache_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".arrow"))


@pytest.mark.parametrize("pid_style", ["short", "long"])  # uint64 keys (<= 7 bytes) and bytes keys
def test_passage_store_matches_reference_lookups(tmp_path, pid_style):
    rng = random.Random(1)
    n = 3000
    if pid_style == "short":
        pids = [str(i) for i in rng.sample(range(10**7), n)]
    else:  # mixed lengths, prefixes of each other, non-ASCII, embedded/trailing NUL bytes, empty pid
        pids = [f"doc-{i}" * (1 + i % 3) for i in range(n - 6)] + ["doc", "", "p\x00", "p", "p\x00\x00", "ü€"]
    rng.shuffle(pids)
    table = _write_corpus(tmp_path / "c.parquet", pids, row_group_size=700)
    store = PassageStore(tmp_path / "c.parquet")
    assert len(store) == n
    assert store._keys.dtype == np.uint64 if pid_style == "short" else store._keys.dtype == np.dtype("S32")
    assert (store._keys[:-1] < store._keys[1:]).all()  # strictly sorted: binary search is valid
    for _ in range(20):
        request = rng.choices(pids, k=rng.randrange(1, 200))
        request += request[: len(request) // 3]  # duplicates in the request
        rng.shuffle(request)
        assert store.get(request) == _reference_get(table, request)
        assert table.column("pid").take(pa.array(store.rows(request))).to_pylist() == request
    assert store.get([]) == []
    unknown = "0" * 30 if pid_style == "short" else "p\x00\x00\x00"
    for bad in (unknown, "nope", pids[0] + "x", pids[0][:-1] + "\x00" if pids[0] else "x"):
        if bad in pids:
            continue
        with pytest.raises(KeyError, match="pids not in corpus"):
            store.get([pids[1], bad, pids[2]])
    with pytest.raises(KeyError, match="pids not in corpus"):
        store.get([None])


def test_passage_store_rejects_duplicate_and_null_pids(tmp_path):
    _write_corpus(tmp_path / "d.parquet", ["a", "b", "a"])
    with pytest.raises(InputError, match="duplicate pids in corpus.*'a'"):
        PassageStore(tmp_path / "d.parquet")
    _write_corpus(tmp_path / "n.parquet", ["a", None])
    with pytest.raises(InputError, match="null pid"):
        PassageStore(tmp_path / "n.parquet")


def test_passage_store_empty_corpus(tmp_path):
    _write_corpus(tmp_path / "e.parquet", [])
    store = PassageStore(tmp_path / "e.parquet")
    assert len(store) == 0 and store.get([]) == []
    with pytest.raises(KeyError, match="pids not in corpus"):
        store.get(["x"])


def test_passage_store_cache_is_rebuilt_when_the_corpus_changes(tmp_path):
    corpus, cache = tmp_path / "c.parquet", tmp_path / "cache"
    write_table(pa.table({"pid": ["p1", "p2"], "title": ["t", "t"], "text": ["old 1", "old 2"]}), corpus, CORPUS_SCHEMA)
    first = PassageStore(corpus, cache_dir=cache)
    assert first.get(["p2"]) == [("t", "old 2")] and first.arrow_path.parent == cache
    assert PassageStore(corpus, cache_dir=cache).arrow_path == first.arrow_path  # reused, not rebuilt
    # same size, written in place with the same mtime: the Parquet footer (statistics) still differs
    stat = corpus.stat()
    table = pa.table({"pid": ["p1", "p2"], "title": ["t", "t"], "text": ["new 1", "new 2"]}, schema=CORPUS_SCHEMA)
    pq.write_table(table, corpus)
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = corpus.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    second = PassageStore(corpus, cache_dir=cache)
    assert second.arrow_path != first.arrow_path
    assert second.get(["p2", "p1"]) == [("t", "new 2"), ("t", "new 1")]
    # replaced atomically (new file, new mtime), more rows
    write_table(pa.table({"pid": ["p1", "p3"], "title": ["t", "u"], "text": ["x", "y"]}), corpus, CORPUS_SCHEMA)
    third = PassageStore(corpus, cache_dir=cache)
    assert third.get(["p3"]) == [("u", "y")] and len(third) == 2
    with pytest.raises(KeyError):
        third.get(["p2"])
    assert first.get(["p1"]) == [("t", "old 1")]  # an open store keeps reading its own version


def test_passage_store_default_cache_lives_beside_the_corpus(tmp_path):
    _write_corpus(tmp_path / "c.parquet", ["a", "b"])
    store = PassageStore(tmp_path / "c.parquet")
    assert store.arrow_path.parent == tmp_path / ".c.parquet.arrow-cache"
    assert _cache_files(store.arrow_path.parent) == [store.arrow_path.name]


def test_stale_or_damaged_cache_files_are_not_trusted(tmp_path, monkeypatch):
    corpus, cache = tmp_path / "c.parquet", tmp_path / "cache"
    table = _write_corpus(corpus, [f"p{i}" for i in range(500)], row_group_size=100)
    good = corpus_arrow_cache(corpus, cache)
    good_bytes = good.read_bytes()
    good.unlink()

    # a job killed while writing: the build fails, and nothing is left under the final name
    def dying(*args, **kwargs):
        real = pq.ParquetFile.iter_batches
        def gen(self, *a, **k):
            yield from real(self, *a, **k)
            raise RuntimeError("killed")
        return gen
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", dying())
    with pytest.raises(RuntimeError, match="killed"):
        PassageStore(corpus, cache_dir=cache)
    assert _cache_files(cache) == [] and not [p for p in cache.iterdir() if "tmp" in p.name]
    monkeypatch.undo()

    # a killed job's temporary file (as atomic_path names it) holding half the data is ignored
    stale = cache / f".{good.name}.abcd1234.tmp.arrow"
    stale.write_bytes(good_bytes[: len(good_bytes) // 2])
    store = PassageStore(corpus, cache_dir=cache)
    assert store.arrow_path == good and stale.exists()
    assert store.get(["p499", "p0"]) == _reference_get(table, ["p499", "p0"])

    # a final file damaged from outside (cut short, or wrong rows) is rebuilt, not trusted
    for damage in (good_bytes[: len(good_bytes) // 2], b"garbage"):
        good.write_bytes(damage)
        store = PassageStore(corpus, cache_dir=cache)
        assert store.get(["p250"]) == _reference_get(table, ["p250"])
        assert good.read_bytes() == good_bytes


def test_unwritable_cache_folder_falls_back_to_user_cache(tmp_path, monkeypatch):
    _write_corpus(tmp_path / "c.parquet", ["a", "b"])
    blocked = tmp_path / ".c.parquet.arrow-cache"
    blocked.write_text("a file where the folder would go")  # mkdir fails, as on a read-only folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = PassageStore(tmp_path / "c.parquet")
    assert store.arrow_path.parent == tmp_path / "xdg" / "simlm_core"
    assert store.get(["b"])[0][0] == "title 1 é"


def test_passage_store_pickles_without_its_data(tmp_path):
    import pickle

    table = _write_corpus(tmp_path / "c.parquet", [f"p{i}" for i in range(2000)])
    store = PassageStore(tmp_path / "c.parquet")
    blob = pickle.dumps(store)
    assert len(blob) < 100_000
    again = pickle.loads(blob)
    assert again.get(["p1999", "p3"]) == _reference_get(table, ["p1999", "p3"])


def test_fill_keys_handles_sliced_and_large_arrays():
    arr = pa.array(["xx", "abc", None, "abcdefgh", "", "q"], type=pa.large_string()).slice(1)
    out = np.zeros((5, 6), dtype=np.uint8)
    ok = sio._fill_keys(arr, out)
    assert ok.tolist() == [True, False, False, True, True]  # null, too long for the width
    assert bytes(out[0]) == b"abc\x01\x00\x00" and bytes(out[3]) == b"\x01" + bytes(5)
    assert not out[1].any() and not out[2].any()
