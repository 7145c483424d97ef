"""FAISS inner-product index over sharded passage embeddings, and batched search.

Inputs are the encode stage's shards (DESIGN.md §3): ``shard-{i}.npy`` holds an ``N_i x D``
fp16 matrix and a Parquet file beside it holds the ``pid`` of every row, in the same order.
``build_index`` adds the shards in order, so FAISS row ``j`` of the index is row ``j`` of the
concatenated ids Parquet it writes next to the index.

Memory stays bounded while building: shards are memory-mapped and converted to float32 one
chunk at a time (FAISS's flat/HNSW/IVF-flat storage itself is float32; ``flat_fp16`` stores fp16
codes, which is lossless for fp16 embeddings and halves the index: 8.8M x 768 is 13.5 GB instead
of 27 GB).

Index types:
- ``flat``: ``IndexFlatIP``, exact.
- ``flat_fp16``: ``IndexScalarQuantizer(QT_fp16, IP)``, exact for fp16 inputs, half the memory,
  CPU only (searched on CPU even when a GPU is present).
- ``hnsw``: ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` (approximate, CPU only in FAISS).
- ``ivf``: ``IndexIVFFlat`` over a flat IP coarse quantizer (approximate); ``nlist`` defaults to
  ``4 * sqrt(N)``, trained on a seeded uniform sample of the stored vectors.

For approximate types ``build_index`` measures the recall loss: a sample of stored vectors is
searched both exactly (brute force, chunk by chunk) and with the new index, and
``approximate_recall`` of the two runs is reported in the returned dict.

Search runs in query batches; with ``use_gpu="auto"`` a flat or IVF index is cloned to every
visible GPU (fp16 storage, sharded across several GPUs) when the installed ``faiss`` is a GPU
build; a flat index is searched with torch on the GPU (:class:`TorchFlatIndex`) when ``faiss``
has no GPU support but torch sees CUDA; otherwise search stays on CPU. Results never contain
FAISS's ``-1`` padding: a query for which fewer than ``top_k`` hits exist (``top_k > ntotal``, or
an IVF probe that visits too few vectors) gets fewer rows.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from simlm_core.io import IDS_SCHEMA, RUN_SCHEMA, InputError, PathLike, atomic_path

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "flat_fp16", "hnsw", "ivf")
# FAISS GPU k-selection limit (GPU_MAX_SELECTION_K); larger k or nprobe searches on CPU.
GPU_MAX_K = 2048


def _faiss():
    import faiss  # imported lazily: the module is large and only index stages need it

    return faiss


def gpu_available() -> bool:
    """True when the installed ``faiss`` is a GPU build and sees at least one GPU."""
    faiss = _faiss()
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # a GPU build without a working driver
        return False


# ---------------------------------------------------------------------------------------------
# Shards
def read_ids(path: PathLike) -> pa.Array:
    """The ``pid`` column of an ids Parquet as one Arrow string array (no Python objects)."""
    try:
        table = pq.read_table(path, columns=["pid"])
    except (KeyError, pa.ArrowInvalid) as exc:
        raise InputError(path, f"cannot read a 'pid' column: {exc}") from exc
    col = table.column("pid").combine_chunks()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    if col.null_count:
        raise InputError(path, f"{col.null_count} null pid(s)")
    return col


def _open_embeddings(path: PathLike) -> np.ndarray:
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot memory-map as a .npy matrix: {exc}") from exc
    if emb.ndim != 2:
        raise InputError(path, f"expected a 2-D (N x D) matrix, got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise InputError(path, f"expected floating-point embeddings, got dtype {emb.dtype}")
    return emb


def check_shards(embedding_paths: Sequence[PathLike], ids_paths: Sequence[PathLike]) -> dict:
    """Validate the shard pairs; returns ``{"dim", "shard_sizes", "ids"}`` (ids concatenated).

    Errors name the offending file: a count mismatch between a shard's matrix and its ids, a
    dimension differing from the first shard's, or a pid appearing twice (within or across shards).
    """
    if len(embedding_paths) == 0:
        raise ValueError("no embedding shards given")
    if len(embedding_paths) != len(ids_paths):
        raise ValueError(
            f"{len(embedding_paths)} embedding shard(s) but {len(ids_paths)} ids file(s); "
            "they must pair up one to one, in the same order"
        )
    dim = None
    sizes: list[int] = []
    id_arrays: list[pa.Array] = []
    for emb_path, ids_path in zip(embedding_paths, ids_paths):
        emb = _open_embeddings(emb_path)
        ids = read_ids(ids_path)
        if emb.shape[0] != len(ids):
            raise InputError(
                emb_path, f"has {emb.shape[0]} rows but its ids file {ids_path} has {len(ids)} pids"
            )
        if dim is None:
            dim = int(emb.shape[1])
        elif emb.shape[1] != dim:
            raise InputError(
                emb_path, f"has dimension {emb.shape[1]}, the first shard {embedding_paths[0]} has {dim}"
            )
        sizes.append(int(emb.shape[0]))
        id_arrays.append(ids)
        del emb
    all_ids = pa.chunked_array(id_arrays, type=pa.string()).combine_chunks()
    if sum(sizes) == 0:
        raise InputError(embedding_paths[0], "all shards are empty: nothing to index")
    # Duplicate check on Arrow hashing (no Python strings); only duplicates become Python objects.
    encoded = all_ids.dictionary_encode()
    if len(encoded.dictionary) != len(all_ids):
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        dup_rows = np.flatnonzero(pd.Series(codes).duplicated().to_numpy())
        bounds = np.cumsum(sizes)
        examples = []
        for row in dup_rows[:5]:
            shard = int(np.searchsorted(bounds, row, side="right"))
            first = int(np.flatnonzero(codes == codes[row])[0])
            first_shard = int(np.searchsorted(bounds, first, side="right"))
            examples.append(
                f"pid {all_ids[row].as_py()!r} in {ids_paths[shard]} (also in {ids_paths[first_shard]})"
            )
        raise InputError(
            ids_paths[int(np.searchsorted(bounds, dup_rows[0], side="right"))],
            f"{len(dup_rows)} duplicate pid(s) across the shards, e.g. " + "; ".join(examples),
        )
    return {"dim": dim, "shard_sizes": sizes, "ids": all_ids}


def iter_embedding_chunks(
    embedding_paths: Sequence[PathLike], chunk_size: int = 65536
) -> Iterator[np.ndarray]:
    """Float32 chunks of the shards, in order; only one chunk is ever converted at a time."""
    for path in embedding_paths:
        emb = _open_embeddings(path)
        for start in range(0, emb.shape[0], chunk_size):
            yield np.ascontiguousarray(emb[start : start + chunk_size], dtype=np.float32)
        del emb


def _gather_rows(embedding_paths: Sequence[PathLike], sizes: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """Float32 copies of the given global (sorted) row numbers, read from the memory-mapped shards."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for i, path in enumerate(embedding_paths):
        lo, hi = np.searchsorted(rows, [bounds[i], bounds[i + 1]])
        if hi > lo:
            emb = _open_embeddings(path)
            parts.append(np.asarray(emb[rows[lo:hi] - bounds[i]], dtype=np.float32))
            del emb
    return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, 0), np.float32)


def default_nlist(n: int) -> int:
    """IVF list count: ``4 * sqrt(N)``, at least 1, at most N."""
    return int(max(1, min(n, round(4 * math.sqrt(n)))))


# ---------------------------------------------------------------------------------------------
# Exact search by brute force (for recall measurements), bounded memory
def exact_search(
    embedding_paths: Sequence[PathLike], queries: np.ndarray, k: int, chunk_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` over the shards, one chunk at a time.

    Returns ``(scores, rows)`` like ``Index.search``: ``nq x k`` arrays, best first, ``-1`` rows
    where fewer than ``k`` vectors exist.
    """
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(queries.shape[0], k, keep_max=True)
    offset = 0
    for chunk in iter_embedding_chunks(embedding_paths, chunk_size):
        kk = min(k, chunk.shape[0])
        scores, rows = faiss.knn(queries, chunk, kk, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, rows + offset, -1))
        offset += chunk.shape[0]
    heap.finalize()
    return heap.D, heap.I


# ---------------------------------------------------------------------------------------------
# Build
def _make_index(index_type: str, dim: int, n: int, hnsw_m: int, hnsw_ef_construction: int, nlist: int):
    faiss = _faiss()
    if index_type == "flat":
        return faiss.IndexFlatIP(dim)
    if index_type == "flat_fp16":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = hnsw_ef_construction
        return index
    if index_type == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        return index
    raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")


def build_index(
    embedding_paths: Sequence[PathLike],
    ids_paths: Sequence[PathLike],
    index_path: PathLike,
    ids_out_path: PathLike,
    index_type: str = "flat",
    hnsw_m: int = 32,
    hnsw_ef_construction: int = 200,
    hnsw_ef_search: int = 256,
    ivf_nlist: int | None = None,
    ivf_nprobe: int = 64,
    train_sample: int | None = None,
    recall_sample: int = 1000,
    recall_k: int = 100,
    chunk_size: int = 65536,
    seed: int = 42,
    use_gpu="auto",
) -> dict:
    """Build an inner-product index over the shards and write it plus the ids Parquet atomically.

    - ``train_sample``: vectors sampled (seeded, uniform over all shards) to train IVF centroids;
      default ``min(N, 64 * nlist)`` (FAISS wants at least 39 per centroid).
    - ``hnsw_ef_search`` / ``ivf_nprobe`` are stored in the index and used by ``search`` unless
      it is given others.
    - ``recall_sample`` stored vectors (0 turns it off) are used as queries to measure the
      approximate index's overlap with the exact top-``recall_k`` (``recall_at_k`` in the result).
    - ``use_gpu``: IVF k-means runs its assignment step on the GPU(s) when ``"auto"``/``True`` and
      a GPU build of faiss sees one (the stored index is a CPU index either way).

    Returns a dict of statistics: ``index_type, ntotal, dim, shard_sizes, build_seconds``, the
    approximate index's parameters and, for hnsw/ivf, ``recall_at_k`` and ``recall_k``.
    """
    faiss = _faiss()
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
    t0 = time.perf_counter()
    info = check_shards(embedding_paths, ids_paths)
    dim, sizes, ids = info["dim"], info["shard_sizes"], info["ids"]
    n = sum(sizes)
    rng = np.random.default_rng(seed)
    stats: dict = {"index_type": index_type, "ntotal": n, "dim": dim, "num_shards": len(sizes),
                   "shard_sizes": sizes}

    nlist = 0
    if index_type == "ivf":
        nlist = int(ivf_nlist) if ivf_nlist else default_nlist(n)
        if nlist > n:
            raise ValueError(f"ivf_nlist={nlist} exceeds the number of vectors ({n})")
        n_train = min(n, int(train_sample) if train_sample else 64 * nlist)
        n_train = max(n_train, nlist)
        stats.update(nlist=nlist, nprobe=int(ivf_nprobe), train_size=n_train)
    elif index_type == "hnsw":
        stats.update(hnsw_m=hnsw_m, ef_construction=hnsw_ef_construction, ef_search=hnsw_ef_search)

    index = _make_index(index_type, dim, n, hnsw_m, hnsw_ef_construction, nlist)
    if index_type == "ivf":
        rows = np.sort(rng.choice(n, size=n_train, replace=False))
        t_train = time.perf_counter()
        sample = _gather_rows(embedding_paths, sizes, rows)
        index.cp.seed = seed
        gpu_assign = None  # a Python reference keeps the GPU index alive while FAISS uses it
        if _parse_use_gpu(use_gpu) != "no" and gpu_available():
            try:
                gpu_assign = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
                index.clustering_index = gpu_assign
                stats["train_on_gpu"] = True
            except Exception as exc:  # pragma: no cover - depends on the GPU
                warnings.warn(f"IVF training on CPU: {exc}", RuntimeWarning, stacklevel=2)
        index.train(sample)
        index.clustering_index = None
        del gpu_assign
        del sample
        index.nprobe = int(min(ivf_nprobe, nlist))
        stats["train_seconds"] = round(time.perf_counter() - t_train, 3)
    elif index_type == "flat_fp16" and not index.is_trained:
        index.train(np.zeros((1, dim), np.float32))  # fp16 codes need no statistics
    elif index_type == "hnsw":
        index.hnsw.efSearch = int(hnsw_ef_search)

    t_add = time.perf_counter()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=n, desc=f"add ({index_type})", unit="vec", disable=None) if tqdm else None
    for chunk in iter_embedding_chunks(embedding_paths, chunk_size):
        index.add(chunk)
        if bar:
            bar.update(chunk.shape[0])
    if bar:
        bar.close()
    assert index.ntotal == n, (index.ntotal, n)
    stats["add_seconds"] = round(time.perf_counter() - t_add, 3)

    if index_type in ("hnsw", "ivf") and recall_sample > 0:
        t_rec = time.perf_counter()
        rows = np.sort(rng.choice(n, size=min(recall_sample, n), replace=False))
        queries = _gather_rows(embedding_paths, sizes, rows)
        k = min(recall_k, n)
        exact_d, exact_i = exact_search(embedding_paths, queries, k, chunk_size)
        approx_d, approx_i = index.search(queries, k)
        stats["recall_at_k"] = _recall_from_rows(exact_i, approx_i, k)
        stats["recall_k"] = k
        stats["recall_queries"] = int(len(rows))
        stats["recall_seconds"] = round(time.perf_counter() - t_rec, 3)
        log.info("%s recall@%d vs exact on %d stored vectors: %.4f", index_type, k, len(rows),
                 stats["recall_at_k"])

    index_path, ids_out_path = Path(index_path), Path(ids_out_path)
    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(ids_out_path) as tmp:
        pq.write_table(pa.table({"pid": ids}, schema=IDS_SCHEMA), tmp)
    stats["index_bytes"] = index_path.stat().st_size
    stats["build_seconds"] = round(time.perf_counter() - t0, 3)
    return stats


def _recall_from_rows(exact: np.ndarray, approx: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k| on row-number arrays."""
    total, hits = 0, 0
    for e, a in zip(exact[:, :k], approx[:, :k]):
        e = e[e >= 0]
        if len(e) == 0:
            continue
        hits += len(np.intersect1d(e, a[a >= 0])) / len(e)
        total += 1
    return float(hits / total) if total else float("nan")


def approximate_recall(exact_run: pd.DataFrame, approx_run: pd.DataFrame, k: int) -> float:
    """Overlap of an approximate run's top-k with the exact run's top-k, averaged over queries.

    For each query of ``exact_run`` (with any result): ``|approx@k ∩ exact@k| / |exact@k|``
    (``exact@k`` has fewer than k pids only when the collection is smaller). A query missing
    from ``approx_run`` counts 0. 1.0 means the approximate index loses nothing at depth k;
    ``1 - recall`` is the recall loss. Ranks are 1-based as in every run (``rank <= k``).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    ex = exact_run.loc[exact_run["rank"] <= k, ["qid", "pid"]].drop_duplicates()
    ap = approx_run.loc[approx_run["rank"] <= k, ["qid", "pid"]].drop_duplicates()
    if ex.empty:
        return float("nan")
    denom = ex.groupby("qid", sort=False).size()
    common = ex.merge(ap, on=["qid", "pid"], how="inner").groupby("qid", sort=False).size()
    common = common.reindex(denom.index, fill_value=0)
    return float((common / denom).mean())


# ---------------------------------------------------------------------------------------------
# Search
def _parse_use_gpu(use_gpu) -> str:
    if isinstance(use_gpu, str):
        v = use_gpu.strip().lower()
        if v == "auto":
            return "auto"
        if v in ("true", "yes", "1", "gpu"):
            return "yes"
        if v in ("false", "no", "0", "cpu"):
            return "no"
        raise ValueError(f"use_gpu must be 'auto', true or false, got {use_gpu!r}")
    return "yes" if use_gpu else "no"


def torch_topk(vectors, queries, k: int, chunk_rows: int = 1 << 20):
    """Exact top-k of ``queries @ vectors^T`` with torch, a chunk of rows at a time (values, rows).

    A running top-k merges each chunk's, so the score matrix never exceeds queries x chunk_rows.
    """
    import torch

    best_v = best_i = None
    for s in range(0, vectors.shape[0], chunk_rows):
        scores = queries @ vectors[s : s + chunk_rows].T
        v, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        i = i + s
        if best_v is not None:
            v, j = torch.topk(torch.cat([best_v, v], dim=1), min(k, best_v.shape[1] + v.shape[1]), dim=1)
            i = torch.gather(torch.cat([best_i, i], dim=1), 1, j)
        best_v, best_i = v, i
    return best_v, best_i


class TorchFlatIndex:
    """An exact inner-product index held on torch device(s), searched like a FAISS index.

    What :func:`load_index` gives for a flat index on a GPU when the installed ``faiss`` has no GPU
    support (PyPI's faiss-gpu wheels are built for CUDA 12). The vectors are copied to the
    device(s) once (fp16 by default: 12.6 GiB for 8.8M x 768); ``search`` runs :func:`torch_topk`.
    With several devices the rows are split evenly across them (as FAISS's ``shard=True``): each
    searches its part and the per-shard top-k are merged. Measured on an H200: 10,908 queries/s
    over 8.8M vectors, top 1000 (benchmarks/faiss_search.py).
    """

    def __init__(self, index, device: str | Sequence[str], fp16: bool = True, chunk_rows: int = 1 << 20) -> None:
        import torch

        devices = [device] if isinstance(device, str) else list(device)
        if not devices:
            raise ValueError("TorchFlatIndex needs at least one device")
        self.d, self.ntotal = int(index.d), int(index.ntotal)
        self.devices = [torch.device(d) for d in devices]
        self.dtype = torch.float16 if fp16 else torch.float32
        self.chunk_rows = chunk_rows
        self.shards: list[tuple[int, Any]] = []  # (first row, vectors on one device)
        cuts = np.linspace(0, self.ntotal, len(self.devices) + 1).round().astype(np.int64)
        step = 1 << 18  # rows decoded on the host at a time (0.75 GiB of fp32 at 768 dims)
        for dev, lo, hi in zip(self.devices, cuts[:-1], cuts[1:]):
            vectors = torch.empty((int(hi - lo), self.d), dtype=self.dtype, device=dev)
            for s in range(int(lo), int(hi), step):
                block = index.reconstruct_n(s, min(step, int(hi) - s))
                vectors[s - lo : s - lo + len(block)] = torch.from_numpy(block).to(dev, self.dtype)
            self.shards.append((int(lo), vectors))

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        queries = np.ascontiguousarray(xq, dtype=np.float32)
        with torch.inference_mode():
            parts = []
            for lo, vectors in self.shards:
                if len(vectors) == 0:
                    continue
                q = torch.from_numpy(queries).to(vectors.device, self.dtype)
                v, i = torch_topk(vectors, q, k, self.chunk_rows)
                parts.append((v.to(self.devices[0]), (i + lo).to(self.devices[0])))
            v, i = parts[0]
            if len(parts) > 1:
                v, j = torch.topk(torch.cat([p[0] for p in parts], dim=1), min(k, self.ntotal), dim=1)
                i = torch.gather(torch.cat([p[1] for p in parts], dim=1), 1, j)
            return v.float().cpu().numpy(), i.cpu().numpy().astype(np.int64)


def _torch_gpu() -> list[str] | None:
    """The torch devices a flat index may be searched on when faiss has no GPU: every CUDA
    device (the index is sharded across them), or None."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def load_index(
    index_path: PathLike,
    use_gpu="auto",
    fp16_gpu: bool = True,
    top_k: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    mmap: bool = False,
):
    """Read an index, set search-time parameters, move it to the GPU(s) when asked and possible.

    Returns ``(index, on_gpu)``. ``use_gpu``: ``"auto"`` (GPU when the ``faiss`` build and a GPU
    allow it), ``True`` (error if impossible) or ``False``. ``mmap=True`` memory-maps a flat
    index's vectors from disk instead of reading them into RAM (CPU only).
    """
    faiss = _faiss()
    mode = _parse_use_gpu(use_gpu)
    path = Path(index_path)
    if not path.exists():
        raise InputError(path, "index file does not exist")
    flags = faiss.IO_FLAG_MMAP_IFC if (mmap and mode != "yes") else 0
    try:
        index = faiss.read_index(str(path), flags) if flags else faiss.read_index(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"not a readable FAISS index: {exc}") from exc

    if top_k is not None:
        top_k = int(min(top_k, index.ntotal))  # the k FAISS will actually be asked for
    ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
    if ivf is not None and nprobe is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        ef = int(ef_search) if ef_search is not None else int(hnsw.efSearch)
        hnsw.efSearch = max(ef, int(top_k or 0))  # HNSW cannot return more than efSearch hits

    torch_device = _torch_gpu() if mode != "no" and not gpu_available() else None
    flat = (isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexScalarQuantizer))
            and index.metric_type == faiss.METRIC_INNER_PRODUCT)
    if torch_device is not None and flat:
        try:
            gpu_index = TorchFlatIndex(index, torch_device, fp16=fp16_gpu)
            log.info("searching with torch on %s (faiss has no GPU support)", ", ".join(map(str, torch_device)))
            return gpu_index, True
        except Exception as exc:  # e.g. out of GPU memory
            if mode == "yes":
                raise RuntimeError(f"use_gpu=True but cannot search {path} on GPU with torch: {exc}") from exc
            warnings.warn(f"searching {path} on CPU: torch on {torch_device} failed: {exc}", RuntimeWarning,
                          stacklevel=2)
            return index, False
    want_gpu = mode == "yes" or (mode == "auto" and gpu_available())
    if not want_gpu:
        return index, False
    reasons = []
    if not gpu_available():
        reasons.append("the installed faiss has no GPU support or sees no GPU")
    if hnsw is not None or isinstance(faiss.downcast_index(index), faiss.IndexScalarQuantizer):
        reasons.append(f"{type(faiss.downcast_index(index)).__name__} has no FAISS GPU implementation")
    if top_k is not None and top_k > GPU_MAX_K:
        reasons.append(f"top_k={top_k} exceeds the GPU limit {GPU_MAX_K}")
    if ivf is not None and ivf.nprobe > GPU_MAX_K:
        reasons.append(f"nprobe={ivf.nprobe} exceeds the GPU limit {GPU_MAX_K}")
    if not reasons:
        try:
            ngpu = faiss.get_num_gpus()
            co = faiss.GpuMultipleClonerOptions()
            co.useFloat16 = bool(fp16_gpu)
            co.shard = ngpu > 1
            gpu_index = faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu)
            if ivf is not None:
                faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", int(ivf.nprobe))
            log.info("searching on %d GPU(s) (fp16=%s, sharded=%s)", ngpu, co.useFloat16, co.shard)
            return gpu_index, True
        except Exception as exc:  # e.g. out of GPU memory
            reasons.append(f"cloning to GPU failed: {exc}")
    if mode == "yes":
        raise RuntimeError(f"use_gpu=True but cannot search {path} on GPU: " + "; ".join(reasons))
    warnings.warn(f"searching {path} on CPU: " + "; ".join(reasons), RuntimeWarning, stacklevel=2)
    return index, False


def search_batches(
    index,
    ids: pa.Array,
    queries: np.ndarray,
    qids: Sequence[str],
    top_k: int = 1000,
    batch_size: int = 1024,
    progress: bool = True,
) -> Iterator[pa.Table]:
    """Search a loaded index batch by batch; yields run tables (``RUN_SCHEMA``) per query batch.

    Rows come per query in rank order (1-based); FAISS's ``-1`` padding is dropped, so a query
    gets ``min(top_k, hits found)`` rows.
    """
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    queries = np.asarray(queries)
    if queries.ndim != 2:
        raise ValueError(f"queries must be a 2-D matrix, got shape {queries.shape}")
    if queries.shape[1] != index.d:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the index has {index.d}")
    if len(qids) != queries.shape[0]:
        raise ValueError(f"{len(qids)} qids for {queries.shape[0]} query vectors")
    if isinstance(qids, (pa.Array, pa.ChunkedArray)):
        qid_arr = pa.chunked_array([qids]).combine_chunks() if isinstance(qids, pa.Array) else qids.combine_chunks()
        qid_arr = qid_arr.cast(pa.string())
    else:
        qid_arr = pa.array([q if isinstance(q, str) else str(q) for q in qids], type=pa.string())
    if len(qid_arr.unique()) != len(qid_arr):
        raise ValueError("duplicate qids among the queries")
    if len(ids) != index.ntotal:
        raise ValueError(f"the ids file has {len(ids)} pids but the index holds {index.ntotal} vectors")
    k = int(min(top_k, index.ntotal))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    nq = queries.shape[0]
    bar = tqdm(total=nq, desc="search", unit="q", disable=None if progress else True) if tqdm else None
    for start in range(0, nq, batch_size):
        xq = np.ascontiguousarray(queries[start : start + batch_size], dtype=np.float32)
        scores, rows = index.search(xq, k)
        valid = rows >= 0
        rank = np.cumsum(valid, axis=1, dtype=np.int32)  # -1s are trailing; robust either way
        qi, _ = np.nonzero(valid)
        yield pa.table(
            {
                "qid": qid_arr.take(pa.array(qi + start)),
                "pid": ids.take(pa.array(rows[valid])),
                "rank": pa.array(rank[valid], pa.int32()),
                "score": pa.array(scores[valid].astype(np.float32), pa.float32()),
            },
            schema=RUN_SCHEMA,
        )
        if bar:
            bar.update(xq.shape[0])
    if bar:
        bar.close()


def search(
    index_path: PathLike,
    ids_path: PathLike,
    queries: np.ndarray,
    qids: Sequence[str],
    top_k: int = 1000,
    batch_size: int = 1024,
    use_gpu="auto",
    fp16_gpu: bool = True,
    nprobe: int | None = None,
    ef_search: int | None = None,
    mmap: bool = False,
) -> pd.DataFrame:
    """Top-k inner-product search of ``queries`` (rows aligned with ``qids``): a run DataFrame.

    Columns ``qid, pid, rank (1..k, int32), score (float32)``, queries in input order, each in
    rank order. ``nprobe`` (IVF) / ``ef_search`` (HNSW) override the values stored at build time.
    """
    index, _ = load_index(index_path, use_gpu, fp16_gpu, top_k, nprobe, ef_search, mmap)
    ids = read_ids(ids_path)
    if len(ids) != index.ntotal:
        raise InputError(ids_path, f"has {len(ids)} pids but {index_path} holds {index.ntotal} vectors")
    tables = list(search_batches(index, ids, queries, qids, top_k, batch_size))
    table = pa.concat_tables(tables) if tables else RUN_SCHEMA.empty_table()
    return table.to_pandas()


__all__ = [
    "INDEX_TYPES",
    "TorchFlatIndex",
    "approximate_recall",
    "build_index",
    "check_shards",
    "default_nlist",
    "exact_search",
    "gpu_available",
    "load_index",
    "read_ids",
    "search",
    "search_batches",
    "torch_topk",
]
