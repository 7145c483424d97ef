"""Exact (flat) inner-product search speed: FAISS through ``simlm_core.index`` and a torch matmul
top-k, on CPU and, where present, on CUDA; extrapolated to MS MARCO's 8.8M passages.

    python benchmarks/faiss_search.py                     # N = 1M x 768, 1,000 queries, top 1000
    python benchmarks/faiss_search.py --n 200000
    python benchmarks/faiss_search.py --device cuda       # GPU figures (faiss-gpu if installed, torch always)

What is measured
- ``faiss cpu``: random unit-norm fp16 embeddings written as ``.npy`` shards + ids Parquet (as the
  encode stage writes them), ``simlm_core.index.build_index`` (flat = ``IndexFlatIP``), then
  ``simlm_core.index.search`` end to end (read index, search, run DataFrame) with ``use_gpu=False``.
  queries/s = queries / (search() seconds - index load seconds), the load measured apart.
- ``faiss gpu``: the same ``search`` with ``use_gpu=True`` (index cloned to the GPU as fp16) when
  the installed faiss is a GPU build; the pure search on a loaded GPU index is timed too.
- ``torch``: the vectors as one fp16 matrix on the device (fp32 on CPU), queries @ chunk^T and
  ``torch.topk`` per chunk, merged: exact top-k with no FAISS at all (runs where faiss is absent,
  e.g. the GPU image). On CUDA it is measured at each ``--torch-n`` (default 1M and 8.8M when the
  GPU has the memory) with CUDA events after a warm-up.

Extrapolation to 8.8M: flat search time is linear in N (one pass over every vector per query
batch); memory: flat fp32 index N x D x 4 B (27 GB at 8.8M x 768), fp16 (GPU / flat_fp16) N x D x 2 B.
Results: ``benchmarks/results/faiss_search-{cpu,cuda}.json``.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import numpy as np  # noqa: E402

MSMARCO_PASSAGES = 8_841_823


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401

        return True
    except ImportError:
        return False


def write_shards(folder: Path, n: int, dim: int, shards: int, seed: int) -> tuple[list[Path], list[Path]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    emb, ids = [], []
    for i in range(shards):
        lo, hi = i * n // shards, (i + 1) * n // shards
        p = folder / f"shard-{i}.npy"
        mm = np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(hi - lo, dim))
        for s in range(0, hi - lo, 65536):
            x = rng.standard_normal((min(65536, hi - lo - s), dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            mm[s : s + len(x)] = x
        mm.flush()
        del mm
        q = folder / f"shard-{i}.ids.parquet"
        pq.write_table(pa.table({"pid": pa.array(np.arange(lo, hi)).cast(pa.string())}), q)
        emb.append(p)
        ids.append(q)
    return emb, ids


def make_queries(nq: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    q = rng.standard_normal((nq, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def row(method: str, device: str, n: int, nq: int, k: int, seconds: float, extra: dict | None = None) -> dict:
    return {"method": method, "device": device, "n": n, "queries": nq, "top_k": k, "seconds": seconds,
            "queries_per_s": nq / seconds if seconds else None,
            "seconds_per_query_per_million": seconds / nq / (n / 1e6), **(extra or {})}


# ---------------------------------------------------------------------------------------------
def faiss_cpu(index_path: Path, ids_path: Path, queries: np.ndarray, k: int, batch: int, n: int) -> list[dict]:
    from simlm_core import index

    qids = [f"q{i}" for i in range(len(queries))]
    t0 = time.perf_counter()
    idx, _ = index.load_index(index_path, use_gpu=False, top_k=k)
    load_s = time.perf_counter() - t0
    del idx
    t0 = time.perf_counter()
    run = index.search(index_path, ids_path, queries, qids, top_k=k, batch_size=batch, use_gpu=False)
    total = time.perf_counter() - t0
    net = max(1e-9, total - load_s)
    return [row("faiss IndexFlatIP via simlm_core.index.search", "cpu", n, len(queries), k, net,
                {"end_to_end_seconds": total, "index_load_seconds": load_s, "rows": len(run)})]


def faiss_gpu(index_path: Path, ids_path: Path, queries: np.ndarray, k: int, batch: int, n: int) -> list[dict]:
    import torch

    from simlm_core import index

    if not index.gpu_available():
        print("   faiss has no GPU support here: faiss gpu skipped")
        return []
    qids = [f"q{i}" for i in range(len(queries))]
    t0 = time.perf_counter()
    run = index.search(index_path, ids_path, queries, qids, top_k=k, batch_size=batch, use_gpu=True)
    total = time.perf_counter() - t0
    gidx, on_gpu = index.load_index(index_path, use_gpu=True, top_k=k)
    ids = index.read_ids(ids_path)
    list(index.search_batches(gidx, ids, queries[:16], qids[:16], k, batch, progress=False))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    list(index.search_batches(gidx, ids, queries, qids, k, batch, progress=False))
    torch.cuda.synchronize()
    pure = time.perf_counter() - t0
    return [row("faiss GpuIndexFlatIP fp16 via simlm_core.index", "cuda", n, len(queries), k, pure,
                {"end_to_end_seconds": total, "on_gpu": on_gpu, "rows": len(run)})]


def torch_search(n: int, dim: int, queries: np.ndarray, k: int, device: str, shards: list[Path] | None,
                 chunk: int, seed: int) -> dict:
    """``simlm_core.index.torch_topk`` (what ``TorchFlatIndex`` runs) over N x D on ``device``."""
    import torch

    from simlm_core.index import torch_topk

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    if shards:  # the same vectors as the faiss index
        parts = [torch.from_numpy(np.load(p, mmap_mode="r")[:].astype(np.float16 if dtype == torch.float16 else np.float32))
                 for p in shards]
        emb = torch.cat(parts).to(dev)
        del parts
    else:  # generated on the device: no host copy of N x D
        g = torch.Generator(device=dev).manual_seed(seed)
        emb = torch.empty((n, dim), dtype=dtype, device=dev)
        for s in range(0, n, 1 << 20):
            x = torch.randn((min(1 << 20, n - s), dim), generator=g, device=dev, dtype=torch.float32)
            emb[s : s + len(x)] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    load_s = time.perf_counter() - t0
    q = torch.from_numpy(queries).to(dev, dtype)
    torch_topk(emb, q[:8], k, chunk)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        v, i = torch_topk(emb, q, k, chunk)
        end.record()
        end.synchronize()
        sec = start.elapsed_time(end) / 1000
        mem = torch.cuda.max_memory_allocated(dev) / C.GIB
    else:
        t1 = time.perf_counter()
        v, i = torch_topk(emb, q, k, chunk)
        sec = time.perf_counter() - t1
        mem = None
    flops = 2.0 * len(queries) * n * dim
    out = row(f"torch matmul + topk ({str(dtype).replace('torch.', '')})", dev.type, n, len(queries), k, sec,
              {"load_seconds": load_s, "chunk_rows": chunk, "tflops_per_s": flops / sec / 1e12,
               "peak_gpu_mem_gib": mem})
    del emb, q, v, i
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    return out


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--top-k", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=1024, help="query batch of simlm_core.index.search")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--shards", type=int, default=None, help="embedding shards (default one per 250k)")
    ap.add_argument("--torch-n", default=None,
                    help="N values for the torch top-k (default: cuda '--n,8841823' when memory allows; cpu '--n')")
    ap.add_argument("--torch-cpu", choices=["auto", "yes", "no"], default="auto",
                    help="also time the torch top-k on CPU (auto: when N <= 2M)")
    ap.add_argument("--chunk", type=int, default=1 << 20, help="rows per matmul chunk in the torch top-k")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    cuda = torch is not None and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda but torch sees no CUDA device")
    use_cuda = cuda and args.device in ("auto", "cuda")
    dev_name = "cuda" if use_cuda else "cpu"
    faiss_ok = have_faiss()
    info = C.machine_info(dev_name)
    print(f"machine: {C.machine_line(info)}")
    print(f"N={args.n:,} x {args.dim}, {args.queries} queries, top {args.top_k}; faiss "
          f"{'present' if faiss_ok else 'absent (faiss parts skipped)'}; device {dev_name}")
    if faiss_ok:
        import faiss

        print(f"faiss {faiss.__version__}, OpenMP threads {faiss.omp_get_max_threads()}")
        info = C.machine_info(dev_name)

    rows: list[dict] = []
    errors: dict[str, str] = {}
    queries = make_queries(args.queries, args.dim, args.seed)
    work = C.SCRATCH_DIR / f"faiss-{args.n}-{os.getpid()}"
    shards = args.shards or max(1, math.ceil(args.n / 250_000))
    emb_paths: list[Path] = []
    build: dict = {}
    t_all = time.perf_counter()
    try:
        if faiss_ok:
            from simlm_core import index

            t0 = time.perf_counter()
            emb_paths, id_paths = write_shards(work / "emb", args.n, args.dim, shards, args.seed)
            print(f"-- wrote {shards} fp16 shard(s) in {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            build = index.build_index(emb_paths, id_paths, work / "index.faiss", work / "ids.parquet",
                                      index_type="flat", use_gpu=False)
            build.pop("shard_sizes", None)
            print(f"-- build_index flat: {time.perf_counter() - t0:.1f} s, {build['index_bytes'] / C.GIB:.2f} GiB")
            for name, fn in (("faiss cpu", faiss_cpu), ("faiss gpu", faiss_gpu)):
                if name == "faiss gpu" and not use_cuda:
                    continue
                print(f"-- {name} ...", flush=True)
                try:
                    new = fn(work / "index.faiss", work / "ids.parquet", queries, args.top_k, args.batch_size, args.n)
                    rows += new
                    for r in new:
                        print(f"   {r['method']}: {r['queries_per_s']:.1f} q/s", flush=True)
                except Exception as exc:
                    errors[name] = "".join(traceback.format_exception(exc))[-2000:]
                    print(f"   FAILED: {exc!r}")
        if torch is not None:
            torch_devices = []
            if use_cuda:
                torch_devices.append("cuda")
            if args.torch_cpu == "yes" or (args.torch_cpu == "auto" and args.n <= 2_000_000):
                torch_devices.append("cpu")
            for dev in torch_devices:
                if args.torch_n:
                    ns = [int(x) for x in args.torch_n.split(",")]
                elif dev == "cuda":
                    free = torch.cuda.mem_get_info()[0]
                    ns = [args.n] + ([MSMARCO_PASSAGES] if MSMARCO_PASSAGES * args.dim * 2 * 1.3 < free
                                     and args.n != MSMARCO_PASSAGES else [])
                else:
                    ns = [args.n]
                for n in ns:
                    print(f"-- torch top-k on {dev}, N={n:,} ...", flush=True)
                    try:
                        use_shards = emb_paths if (emb_paths and n == args.n) else None
                        r = torch_search(n, args.dim, queries, args.top_k, dev, use_shards, args.chunk, args.seed)
                        rows.append(r)
                        print(f"   {r['method']}: {r['queries_per_s']:.1f} q/s ({r['tflops_per_s']:.2f} TFLOP/s)", flush=True)
                    except Exception as exc:
                        errors[f"torch {dev} {n}"] = "".join(traceback.format_exception(exc))[-2000:]
                        print(f"   FAILED: {exc!r}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # Extrapolation to 8.8M (linear in N); memory of the flat index.
    for r in rows:
        r["extrapolated_8.8M_queries_per_s"] = r["queries_per_s"] * r["n"] / MSMARCO_PASSAGES
        r["extrapolated_8.8M_seconds_per_1000_queries"] = 1000 / r["extrapolated_8.8M_queries_per_s"]
    table_rows = [[r["method"], r["device"], r["n"], r["queries_per_s"], r["seconds"],
                   r["extrapolated_8.8M_queries_per_s"], r["extrapolated_8.8M_seconds_per_1000_queries"]] for r in rows]
    print(C.table(["method", "device", "N", "q/s", "s (1k q)", "q/s @8.8M (linear)", "s per 1k q @8.8M"], table_rows,
                  title=f"== exact inner-product top-{args.top_k} over N x {args.dim} "
                        f"({info.get('gpu_name') or info['cpu_model']}; load avg {C.loadavg()})"))
    mem = {"flat_fp32_bytes_8.8M": MSMARCO_PASSAGES * args.dim * 4, "fp16_bytes_8.8M": MSMARCO_PASSAGES * args.dim * 2}
    print(f"memory at 8.8M x {args.dim}: flat fp32 {mem['flat_fp32_bytes_8.8M'] / C.GIB:.1f} GiB "
          f"(IndexFlatIP, CPU), fp16 {mem['fp16_bytes_8.8M'] / C.GIB:.1f} GiB (GPU clone / flat_fp16 / torch)")
    for k, v in errors.items():
        print(f"\n{k} FAILED:\n{v}")
    payload = {"benchmark": "faiss_search", "date": C.now_iso(), "machine": info, "device": dev_name,
               "loadavg_end": C.loadavg(), "total_seconds": round(time.perf_counter() - t_all, 1),
               "settings": vars(args), "build": build, "results": rows, "memory_8.8M": mem, "errors": errors}
    path = C.write_results("faiss_search", dev_name, payload, Path(args.out) if args.out else None)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
