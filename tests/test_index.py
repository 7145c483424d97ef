"""simlm_core.index: sharded build, exact/approximate search, recall, input checks."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("faiss")

from simlm_core.index import approximate_recall, build_index, check_shards, search  # noqa: E402
from simlm_core.io import InputError, read_table, IDS_SCHEMA  # noqa: E402

DIM = 24


def write_shards(tmp_path, sizes, dim=DIM, seed=0, prefix="p"):
    rng = np.random.default_rng(seed)
    emb_paths, ids_paths, mats, ids = [], [], [], []
    start = 0
    for i, n in enumerate(sizes):
        m = rng.standard_normal((n, dim)).astype(np.float16)
        pids = [f"{prefix}{start + j}" for j in range(n)]
        start += n
        e, d = tmp_path / f"shard-{i}.npy", tmp_path / f"shard-{i}.ids.parquet"
        np.save(e, m)
        pq.write_table(pa.table({"pid": pids}), d)
        emb_paths.append(str(e)), ids_paths.append(str(d)), mats.append(m), ids.extend(pids)
    return emb_paths, ids_paths, np.concatenate(mats), np.array(ids, dtype=object)


def brute_force(corpus16, queries, k):
    scores = queries.astype(np.float32) @ corpus16.astype(np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.fixture()
def shards(tmp_path):
    return write_shards(tmp_path, [70, 45, 85])


def test_flat_equals_brute_force_over_three_shards(tmp_path, shards):
    emb_paths, ids_paths, corpus, ids = shards
    stats = build_index(emb_paths, ids_paths, tmp_path / "index.faiss", tmp_path / "ids.parquet",
                        chunk_size=32)
    assert stats["ntotal"] == 200 and stats["dim"] == DIM and stats["shard_sizes"] == [70, 45, 85]
    # the ids Parquet is the shards' ids concatenated in shard order
    assert read_table(tmp_path / "ids.parquet", IDS_SCHEMA).pid.tolist() == ids.tolist()

    rng = np.random.default_rng(1)
    queries = rng.standard_normal((13, DIM)).astype(np.float32)
    qids = [f"q{i}" for i in range(13)]
    k = 10
    run = search(tmp_path / "index.faiss", tmp_path / "ids.parquet", queries, qids, top_k=k,
                 batch_size=4, use_gpu=False)
    assert list(run.columns) == ["qid", "pid", "rank", "score"]
    assert run["rank"].dtype == np.int32 and run["score"].dtype == np.float32
    order, scores = brute_force(corpus, queries, k)
    for i, qid in enumerate(qids):
        got = run[run.qid == qid]
        assert got["rank"].tolist() == list(range(1, k + 1))
        np.testing.assert_allclose(got.score.to_numpy(), scores[i], rtol=1e-4, atol=1e-4)
        # ids equal up to ties: compare positions whose score is not tied with a neighbour
        exp = ids[order[i]]
        untied = np.r_[True, np.diff(scores[i]) < -1e-3] & np.r_[np.diff(scores[i]) < -1e-3, True]
        assert (got.pid.to_numpy()[untied] == exp[untied]).all()
    assert run.qid.drop_duplicates().tolist() == qids  # queries in input order
    mapped = search(tmp_path / "index.faiss", tmp_path / "ids.parquet", queries, qids, top_k=k,
                    use_gpu=False, mmap=True)  # vectors memory-mapped from the file
    pd.testing.assert_frame_equal(run, mapped)


def test_k_larger_than_collection(tmp_path):
    emb_paths, ids_paths, corpus, ids = write_shards(tmp_path, [3, 4])
    build_index(emb_paths, ids_paths, tmp_path / "i.faiss", tmp_path / "i.parquet")
    q = np.random.default_rng(2).standard_normal((5, DIM)).astype(np.float32)
    run = search(tmp_path / "i.faiss", tmp_path / "i.parquet", q, [f"q{i}" for i in range(5)],
                 top_k=50, use_gpu="auto")
    assert len(run) == 5 * 7
    assert (run.groupby("qid").size() == 7).all()
    assert set(run.pid) == set(ids) and "-1" not in set(run.pid)
    assert run.groupby("qid")["rank"].apply(lambda r: r.tolist() == list(range(1, 8))).all()


@pytest.mark.parametrize("index_type", ["hnsw", "ivf", "flat_fp16"])
def test_approximate_index_recall(tmp_path, index_type):
    emb_paths, ids_paths, corpus, ids = write_shards(tmp_path, [400, 300, 300], dim=16, seed=3)
    stats = build_index(emb_paths, ids_paths, tmp_path / "a.faiss", tmp_path / "a.parquet",
                        index_type=index_type, hnsw_m=16, ivf_nlist=16, ivf_nprobe=16,
                        recall_sample=50, recall_k=10)
    build_index(emb_paths, ids_paths, tmp_path / "f.faiss", tmp_path / "f.parquet")
    q = np.random.default_rng(4).standard_normal((40, 16)).astype(np.float32)
    qids = [f"q{i}" for i in range(40)]
    exact = search(tmp_path / "f.faiss", tmp_path / "f.parquet", q, qids, top_k=20, use_gpu=False)
    approx = search(tmp_path / "a.faiss", tmp_path / "a.parquet", q, qids, top_k=20, use_gpu=False)
    recall = approximate_recall(exact, approx, 20)
    assert approximate_recall(exact, exact, 20) == 1.0
    if index_type == "flat_fp16":
        assert recall == pytest.approx(1.0, abs=0.01)  # exact up to float rounding and ties
        assert "recall_at_k" not in stats
    else:
        # hnsw with ef >= k, and ivf probing every list, are (near) exact on small data
        assert recall >= 0.95
        assert stats["recall_at_k"] >= 0.95 and stats["recall_k"] == 10


def test_ivf_partial_probe_reports_recall_loss(tmp_path):
    emb_paths, ids_paths, _, _ = write_shards(tmp_path, [600, 400], dim=16, seed=5)
    stats = build_index(emb_paths, ids_paths, tmp_path / "a.faiss", tmp_path / "a.parquet",
                        index_type="ivf", ivf_nlist=32, ivf_nprobe=1, recall_sample=100, recall_k=20)
    assert stats["nlist"] == 32 and stats["nprobe"] == 1
    assert 0.0 < stats["recall_at_k"] < 1.0
    # search-time nprobe override: probing every list is exact; -1 padding never leaks
    q = np.random.default_rng(6).standard_normal((10, 16)).astype(np.float32)
    qids = [f"q{i}" for i in range(10)]
    run1 = search(tmp_path / "a.faiss", tmp_path / "a.parquet", q, qids, top_k=200, use_gpu=False)
    assert run1.pid.str.startswith("p").all()
    assert (run1.groupby("qid")["rank"].max() == run1.groupby("qid").size()).all()
    full = search(tmp_path / "a.faiss", tmp_path / "a.parquet", q, qids, top_k=20, nprobe=32,
                  use_gpu=False)
    build_index(emb_paths, ids_paths, tmp_path / "f.faiss", tmp_path / "f.parquet")
    exact = search(tmp_path / "f.faiss", tmp_path / "f.parquet", q, qids, top_k=20, use_gpu=False)
    assert approximate_recall(exact, full, 20) == pytest.approx(1.0)


def test_approximate_recall_counts_missing_queries():
    exact = pd.DataFrame({"qid": ["a", "a", "b", "b"], "pid": ["1", "2", "3", "4"], "rank": [1, 2, 1, 2]})
    approx = pd.DataFrame({"qid": ["a", "a"], "pid": ["2", "9"], "rank": [1, 2]})
    assert approximate_recall(exact, approx, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert approximate_recall(exact, approx, 1) == pytest.approx(0.0)


def test_shard_count_mismatch_names_file(tmp_path):
    emb_paths, ids_paths, _, _ = write_shards(tmp_path, [5, 6])
    pq.write_table(pa.table({"pid": ["x1", "x2"]}), ids_paths[1])
    with pytest.raises(InputError) as err:
        build_index(emb_paths, ids_paths, tmp_path / "i.faiss", tmp_path / "i.parquet")
    assert "shard-1.npy" in str(err.value) and "6 rows" in str(err.value)
    assert not (tmp_path / "i.faiss").exists() and not (tmp_path / "i.parquet").exists()


def test_dim_mismatch_and_duplicates_name_file(tmp_path):
    emb_paths, ids_paths, _, _ = write_shards(tmp_path, [5, 6])
    np.save(emb_paths[1], np.zeros((6, DIM + 1), np.float16))
    with pytest.raises(InputError, match="shard-1.npy.*dimension"):
        check_shards(emb_paths, ids_paths)
    emb_paths, ids_paths, _, _ = write_shards(tmp_path, [5, 6])
    pq.write_table(pa.table({"pid": ["p0"] + [f"z{i}" for i in range(5)]}), ids_paths[1])
    with pytest.raises(InputError, match="shard-1.ids.parquet.*duplicate.*'p0'"):
        check_shards(emb_paths, ids_paths)
    with pytest.raises(ValueError, match="2 embedding shard"):
        check_shards(emb_paths, ids_paths[:1])


def test_search_rejects_bad_queries(tmp_path):
    from simlm_core.index import gpu_available, load_index

    emb_paths, ids_paths, _, _ = write_shards(tmp_path, [5])
    build_index(emb_paths, ids_paths, tmp_path / "i.faiss", tmp_path / "i.parquet")
    if not gpu_available():
        with pytest.raises(RuntimeError, match="no GPU support"):
            load_index(tmp_path / "i.faiss", use_gpu=True)
    with pytest.raises(InputError, match="does not exist"):
        load_index(tmp_path / "missing.faiss")
    pq.write_table(pa.table({"pid": ["a", "b"]}), tmp_path / "short.parquet")
    with pytest.raises(InputError, match="short.parquet.*2 pids"):
        search(tmp_path / "i.faiss", tmp_path / "short.parquet", np.zeros((1, DIM)), ["a"], use_gpu=False)
    with pytest.raises(ValueError, match="dimension"):
        search(tmp_path / "i.faiss", tmp_path / "i.parquet", np.zeros((2, DIM + 1)), ["a", "b"], use_gpu=False)
    with pytest.raises(ValueError, match="duplicate qids"):
        search(tmp_path / "i.faiss", tmp_path / "i.parquet", np.zeros((2, DIM)), ["a", "a"], use_gpu=False)


def test_build_index_driver(tmp_path):
    from simlm_core.drivers.build_index import main

    emb_paths, ids_paths, _, _ = write_shards(tmp_path, [8, 9])
    args = {"embedding_paths": emb_paths, "ids_paths": ids_paths, "index_path": str(tmp_path / "x.faiss"),
            "ids_out_path": str(tmp_path / "x.ids.parquet"), "stats_path": str(tmp_path / "s.json")}
    main(["--args-json", json.dumps(args)])
    assert json.loads((tmp_path / "s.json").read_text())["ntotal"] == 17
    with pytest.raises(ValueError, match="unknown key"):
        main(["--args-json", json.dumps({**args, "bogus": 1})])


class FakeGpuFaiss:
    """The real (CPU) faiss plus the GPU entry points, recording how search uses them."""

    class StandardGpuResources:
        pass

    class GpuMultipleClonerOptions:
        useFloat16 = False
        shard = False

    def __init__(self, real, fail: bool = False):
        self._real, self.fail, self.clones, self.params = real, fail, [], []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_num_gpus(self):
        return 2

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        if self.fail:
            raise RuntimeError("cudaMalloc: out of memory")
        co = co or self.GpuMultipleClonerOptions()
        self.clones.append({"useFloat16": co.useFloat16, "shard": co.shard, "ngpu": ngpu})
        return index  # stands in for the GPU index

    def GpuParameterSpace(self):
        outer = self

        class Space:
            def set_index_parameter(self, index, name, value):
                outer.params.append((name, value))
                outer._real.ParameterSpace().set_index_parameter(index, name, value)

        return Space()


@pytest.fixture()
def fake_gpu(monkeypatch):
    import faiss

    import simlm_core.index as index_mod

    def install(fail=False):
        fake = FakeGpuFaiss(faiss, fail)
        monkeypatch.setattr(index_mod, "_faiss", lambda: fake)
        return fake

    return install


def test_gpu_path_clones_with_fp16_and_shards(tmp_path, fake_gpu):
    from simlm_core.index import gpu_available, load_index

    emb_paths, ids_paths, _, _ = write_shards(tmp_path, [60, 40])
    build_index(emb_paths, ids_paths, tmp_path / "f.faiss", tmp_path / "f.parquet")
    build_index(emb_paths, ids_paths, tmp_path / "v.faiss", tmp_path / "v.parquet", index_type="ivf",
                ivf_nlist=4, ivf_nprobe=2, recall_sample=0)
    q = np.random.default_rng(8).standard_normal((6, DIM)).astype(np.float32)
    qids = [f"q{i}" for i in range(6)]
    cpu = search(tmp_path / "f.faiss", tmp_path / "f.parquet", q, qids, top_k=10, use_gpu=False)
    fake = fake_gpu()
    assert gpu_available()
    _, on_gpu = load_index(tmp_path / "f.faiss", use_gpu="auto", top_k=10)
    assert on_gpu and fake.clones == [{"useFloat16": True, "shard": True, "ngpu": 2}]
    gpu = search(tmp_path / "f.faiss", tmp_path / "f.parquet", q, qids, top_k=10, fp16_gpu=False)
    assert fake.clones[-1]["useFloat16"] is False
    pd.testing.assert_frame_equal(cpu, gpu)
    search(tmp_path / "v.faiss", tmp_path / "v.parquet", q, qids, top_k=10, nprobe=3)
    assert fake.params[-1] == ("nprobe", 3)  # search-time nprobe reaches the GPU index
    stats = build_index(emb_paths, ids_paths, tmp_path / "g.faiss", tmp_path / "g.parquet", index_type="ivf",
                        ivf_nlist=4, recall_sample=10, recall_k=5)
    assert stats["train_on_gpu"] and stats["recall_at_k"] > 0.5  # k-means assignment on "GPU"


def test_gpu_fallbacks(tmp_path, fake_gpu):
    from simlm_core.index import load_index

    emb_paths, ids_paths, _, _ = write_shards(tmp_path, [1500, 1600], dim=4)
    build_index(emb_paths, ids_paths, tmp_path / "f.faiss", tmp_path / "f.parquet")
    build_index(emb_paths, ids_paths, tmp_path / "h.faiss", tmp_path / "h.parquet", index_type="hnsw",
                hnsw_m=8, recall_sample=0)
    fake = fake_gpu()
    with pytest.warns(RuntimeWarning, match="IndexHNSWFlat has no FAISS GPU"):
        assert load_index(tmp_path / "h.faiss", use_gpu="auto")[1] is False
    with pytest.raises(RuntimeError, match="use_gpu=True"):
        load_index(tmp_path / "h.faiss", use_gpu=True)
    with pytest.warns(RuntimeWarning, match="exceeds the GPU limit"):
        assert load_index(tmp_path / "f.faiss", use_gpu="auto", top_k=2500)[1] is False
    assert load_index(tmp_path / "f.faiss", use_gpu="auto", top_k=2048)[1] is True
    assert load_index(tmp_path / "f.faiss", use_gpu="no")[1] is False and len(fake.clones) == 1
    fake_gpu(fail=True)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        assert load_index(tmp_path / "f.faiss", use_gpu="auto")[1] is False
    with pytest.raises(RuntimeError, match="out of memory"):
        load_index(tmp_path / "f.faiss", use_gpu=True)
    with pytest.raises(ValueError, match="use_gpu"):
        load_index(tmp_path / "f.faiss", use_gpu="maybe")


@pytest.mark.gpu
def test_gpu_search_matches_cpu(tmp_path):
    from simlm_core.index import gpu_available

    if not gpu_available():
        pytest.skip("no GPU faiss build or no GPU")
    emb_paths, ids_paths, corpus, ids = write_shards(tmp_path, [500, 500], dim=64)
    build_index(emb_paths, ids_paths, tmp_path / "i.faiss", tmp_path / "i.parquet")
    q = np.random.default_rng(7).standard_normal((30, 64)).astype(np.float32)
    qids = [f"q{i}" for i in range(30)]
    cpu = search(tmp_path / "i.faiss", tmp_path / "i.parquet", q, qids, top_k=50, use_gpu=False)
    gpu = search(tmp_path / "i.faiss", tmp_path / "i.parquet", q, qids, top_k=50, use_gpu=True)
    assert approximate_recall(cpu, gpu, 50) > 0.99
    big = search(tmp_path / "i.faiss", tmp_path / "i.parquet", q, qids, top_k=5000, use_gpu="auto")
    assert len(big) == 30 * 1000 and big.pid.str.startswith("p").all()  # k > ntotal: no -1 rows
    huge = search(tmp_path / "i.faiss", tmp_path / "i.parquet", q, qids, top_k=3000, use_gpu=False)
    assert len(huge) == 30 * 1000


@pytest.mark.parametrize("index_type", ["flat", "flat_fp16"])
def test_torch_search_when_faiss_has_no_gpu(tmp_path, monkeypatch, index_type):
    """faiss without GPU support + torch seeing a GPU: a flat index is searched with torch.
    The test stands the CPU in for the GPU; the code path is the same."""
    import simlm_core.index as index_mod

    emb_paths, ids_paths, _, _ = write_shards(tmp_path, [300, 250], dim=32)
    build_index(emb_paths, ids_paths, tmp_path / "i.faiss", tmp_path / "i.parquet", index_type=index_type)
    build_index(emb_paths, ids_paths, tmp_path / "h.faiss", tmp_path / "h.parquet", index_type="hnsw",
                hnsw_m=8, recall_sample=0)
    q = np.random.default_rng(3).standard_normal((21, 32)).astype(np.float32)
    qids = [f"q{i}" for i in range(21)]
    cpu = search(tmp_path / "i.faiss", tmp_path / "i.parquet", q, qids, top_k=40, use_gpu=False)
    monkeypatch.setattr(index_mod, "_torch_gpu", lambda: "cpu")
    assert not index_mod.gpu_available()
    index, on_gpu = index_mod.load_index(tmp_path / "i.faiss", use_gpu="auto", fp16_gpu=False)
    assert on_gpu and isinstance(index, index_mod.TorchFlatIndex)
    index.chunk_rows = 128  # several chunks: the running top-k merge is exercised
    got = pa.concat_tables(index_mod.search_batches(index, index_mod.read_ids(tmp_path / "i.parquet"), q, qids,
                                                    top_k=40, batch_size=8, progress=False)).to_pandas()
    assert got.qid.tolist() == cpu.qid.tolist() and got["rank"].tolist() == cpu["rank"].tolist()
    np.testing.assert_allclose(got.score.to_numpy(), cpu.score.to_numpy(), rtol=1e-5, atol=1e-4)
    assert (got.pid == cpu.pid).mean() > 0.99  # equal up to the order of tied scores
    # fp16 on the device (the default) ranks the same passages up to fp16 rounding
    fp16 = search(tmp_path / "i.faiss", tmp_path / "i.parquet", q, qids, top_k=40, use_gpu="auto")
    assert (fp16.pid == cpu.pid).mean() > 0.9
    np.testing.assert_allclose(fp16.score.to_numpy(), cpu.score.to_numpy(), rtol=1e-2, atol=2e-2)
    # several devices: the rows are split across them and the per-shard top-k merged
    monkeypatch.setattr(index_mod, "_torch_gpu", lambda: ["cpu", "cpu", "cpu"])
    sharded, on_gpu = index_mod.load_index(tmp_path / "i.faiss", use_gpu="auto", fp16_gpu=False)
    assert on_gpu and [len(v) for _, v in sharded.shards] == [183, 184, 183]
    got3 = pa.concat_tables(index_mod.search_batches(sharded, index_mod.read_ids(tmp_path / "i.parquet"), q, qids,
                                                     top_k=40, batch_size=8, progress=False)).to_pandas()
    assert got3["rank"].tolist() == cpu["rank"].tolist() and (got3.pid == cpu.pid).mean() > 0.99
    np.testing.assert_allclose(got3.score.to_numpy(), cpu.score.to_numpy(), rtol=1e-5, atol=1e-4)
    # no torch path for an approximate index, nor when the GPU is declined
    assert not isinstance(index_mod.load_index(tmp_path / "h.faiss", use_gpu="auto")[0], index_mod.TorchFlatIndex)
    assert index_mod.load_index(tmp_path / "i.faiss", use_gpu=False)[1] is False
