"""Where ``encode_corpus_shard``'s wall time goes: tokeniser in a thread vs in a child process,
and the padding-free (packed) encoder, then a cProfile of the main thread (top functions by
cumulative time).

    python benchmarks/shard_profile.py --device cuda [--passages 65536] [--batch 512]

Synthetic BERT-base retriever (random weights, 30,522-entry WordPiece vocabulary) and MS MARCO-like
passages, as in ``model_throughput.py``; the bare bf16 forward loop over the same passages is timed
for reference. CPU: use ``--model-size tiny``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repo root on sys.path)
import model_throughput as M  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model-size", default="base", choices=list(M.SIZES))
    ap.add_argument("--passages", type=int, default=65_536)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--chunk-rows", type=int, default=16_384)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    device = M.resolve(args.device)

    from transformers import BertConfig, BertModel

    from simlm_core.encode import encode_corpus_shard
    from simlm_core.modeling.biencoder import BiEncoder

    C.SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=C.SCRATCH_DIR, prefix="shard-profile-") as tmp:
        work = Path(tmp)
        tok, words = M.make_tokenizer(work / "tok")
        texts = M.make_passages(words, args.passages, seed=1)
        n = len(texts)
        corpus = work / "corpus.parquet"
        pq.write_table(pa.table({"pid": [str(i) for i in range(n)], "title": [""] * n, "text": texts}), corpus)
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=M.VOCAB, max_position_embeddings=512, **M.SIZES[args.model_size]["enc"])
        model_dir = work / "encoder"
        BiEncoder(BertModel(cfg, add_pooling_layer=True), tokenizer=tok).save_pretrained(model_dir)

        def shard(in_process: bool, packed: bool = False) -> float:
            t0 = time.perf_counter()
            encode_corpus_shard(model_dir, corpus, 0, 1, work / "e.npy", work / "i.parquet", batch_size=args.batch,
                                device=device, chunk_rows=args.chunk_rows, show_progress=False,
                                tokenize_process=in_process, packed=packed)
            return time.perf_counter() - t0

        shard(False)  # warm-up: kernels, allocator, page cache
        shard(True, packed=True)
        for in_process, packed in [(False, False), (True, False), (True, True)] * 2:
            sec = shard(in_process, packed)
            print(f"encode_corpus_shard, tokeniser in a {'child process' if in_process else 'thread'}"
                  f"{', packed' if packed else ''}: {sec:.2f} s wall incl. model load, {n / sec:,.0f} psg/s",
                  flush=True)
        for in_process in (True, False):
            prof = cProfile.Profile()
            prof.enable()
            shard(in_process)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(args.top)
            print(f"\n== cProfile, tokeniser in a {'child process' if in_process else 'thread'} (main thread):")
            print("\n".join(line[:160] for line in buf.getvalue().splitlines()[:args.top + 12]))


if __name__ == "__main__":
    main()
