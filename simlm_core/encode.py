"""Dense encoding of the corpus (sharded) and of queries with a trained retriever.

Corpus shard ``i`` of ``n`` is the contiguous row range ``[i*N//n, (i+1)*N//n)`` of the corpus
Parquet. It is read row group by row group (groups outside the range are never decoded) and
encoded chunk by chunk: only one chunk's text (``chunk_rows`` passages) is held at a time; a
helper thread tokenises the next chunk (straight through the fast tokenizer's Rust backend,
:class:`simlm_core.tokenized.BackendTokenizer`) while the device encodes the current one (so at
most two chunks of token ids exist).
Within a chunk passages are sorted by token length (longest first) so each batch pads to
nearly its own length; embeddings are written back in corpus order. Embeddings are fp16 in a
memory-mapped ``.npy`` written at a temp path and renamed when complete; ids go to a Parquet
(``pid``) in the same order, likewise atomically.

GPU: a chunk's token ids go to the device in one copy and are batched there (:class:`DeviceTokens`);
a chunk's embeddings are collected on the device and copied to the host once per chunk (no
per-batch sync). With ``bf16`` (where the
GPU supports it) a corpus shard is encoded by a bf16 copy of the weights: autocast would re-cast
every weight and keep LayerNorm outputs in fp32 on each call, memory traffic that the measured
BERT-base forward at these sequence lengths is bound by (benchmarks/model_throughput.py).
``compile=True`` also runs the encoder through ``torch.compile`` (dynamic shapes; batch widths
padded to a multiple of 8 so few shapes occur). CPU: fp32, ``torch.inference_mode``.

A BERT (or ELECTRA) encoder encodes corpus shards padding-free by default (``packed``): each batch's tokens in
one row, our Triton attention kernel for short texts on a GPU, the last layer on [CLS] rows only
(:mod:`simlm_core.modeling.packed`); other encoders take the padded path.

Pooling, normalisation and passage formatting come from the model dir's
``biencoder_config.json`` (written by training) or are given explicitly for a raw HF model
(e.g. sentence-transformers MiniLM: ``pooling="mean", normalize=True, passage_format="concat"``).
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from simlm_core.collators import passage_inputs, tokenize_passages, tokenize_queries
from simlm_core.io import (
    CORPUS_SCHEMA,
    IDS_SCHEMA,
    InputError,
    ParquetStreamWriter,
    atomic_path,
    load_queries,
)
from simlm_core.modeling.biencoder import BiEncoder
from simlm_core.modeling.packed import PackedBatch, PackedBertEncoder, packed_support
from simlm_core.tokenized import BackendTokenizer, Tokenized, TokenizerProcess

PathLike = str | os.PathLike[str]

__all__ = [
    "resolve_device",
    "load_encoder",
    "encode_texts",
    "encode_queries",
    "encode_corpus_shard",
    "compile_encoder",
    "packed_encoder",
    "shard_range",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def shard_range(num_rows: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of shard ``shard_index``: contiguous, covering every row once."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} out of range for {num_shards} shards")
    return shard_index * num_rows // num_shards, (shard_index + 1) * num_rows // num_shards


def load_encoder(
    model_dir: PathLike,
    pooling: str | None = None,
    normalize: bool | None = None,
    passage_format: str | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
) -> BiEncoder:
    """A :class:`BiEncoder` in eval mode on ``device`` (with its tokenizer in ``.tokenizer``).

    ``dtype`` (e.g. ``torch.bfloat16``) casts the weights: for inference only.
    """
    model = BiEncoder.from_pretrained(model_dir, pooling, normalize, passage_format=passage_format)
    if model.tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer found beside the model")
    model = model.to(resolve_device(device))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _use_bf16(device: torch.device, bf16: bool) -> bool:
    return bool(bf16) and device.type == "cuda" and torch.cuda.is_bf16_supported()


def _precision_context(model: BiEncoder, device: torch.device, bf16: bool) -> Any:
    """bf16 autocast for fp32 weights on a bf16 GPU; nothing for weights already cast (or CPU)."""
    weights_fp32 = next(model.parameters()).dtype == torch.float32
    if weights_fp32 and _use_bf16(device, bf16):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_encoder(model: BiEncoder) -> BiEncoder:
    """Run ``model``'s transformer through ``torch.compile`` (dynamic shapes: batch widths vary)."""
    model.encoder = torch.compile(model.encoder, dynamic=True)
    return model


def packed_encoder(model: BiEncoder, compile: bool = False, gelu_epilogue: bool = False) -> PackedBertEncoder:
    """A padding-free copy of ``model``'s encoder (:mod:`simlm_core.modeling.packed`).

    Raises ``ValueError`` naming the reason when the encoder cannot be packed (BERT and ELECTRA can).
    """
    packed = PackedBertEncoder(model.encoder, pooling=model.pooling, gelu_epilogue=gelu_epilogue)
    if compile:
        packed.compile(dynamic=True)  # in place, so packed.encode() runs the compiled forward
    return packed


def _tokenize_items(
    tokenizer: Any,
    texts: Sequence[str] | Sequence[tuple[str | None, str]],
    max_len: int,
    passage_format: str,
    backend: BackendTokenizer | None = None,
) -> Tokenized:
    """Queries (``str`` items) or passages (``(title, text)`` items) -> :class:`Tokenized`.

    A fast tokenizer goes through its Rust backend (``backend``, made here when not given);
    a slow one through its ordinary call.
    """
    passages = bool(len(texts)) and isinstance(texts[0], tuple)
    if passages:
        inputs = passage_inputs([t for t, _ in texts], [x for _, x in texts], passage_format)
    else:
        inputs = list(texts)
    backend = backend or BackendTokenizer.of(tokenizer, max_len)
    if backend is not None:
        return backend(inputs)
    if passages:
        enc = tokenize_passages(tokenizer, [t for t, _ in texts], [x for _, x in texts], max_len, passage_format,
                                return_attention_mask=False)
    else:
        enc = tokenize_queries(tokenizer, inputs, max_len, return_attention_mask=False)
    return Tokenized.from_lists(enc["input_ids"], enc.get("token_type_ids"))


def _tokenize(
    model: BiEncoder,
    tokenizer: Any,
    texts: Sequence[str] | Sequence[tuple[str | None, str]],
    max_len: int,
    passage_format: str | None,
) -> Tokenized:
    return _tokenize_items(tokenizer, texts, max_len, passage_format or model.bi_config.passage_format)


class DeviceTokens:
    """A :class:`Tokenized` chunk copied to the device once, padded into batches there.

    One copy per chunk instead of three pinned copies per batch: on an H200, pinning took 2.4 ms a
    call, a quarter of a shard's wall time (benchmarks/results/shard_profile-cuda-h200.log).
    """

    def __init__(self, tokenized: Tokenized, device: torch.device, max_width: int) -> None:
        def up(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=torch.long)

        self.ids = up(tokenized.ids)
        self.type_ids = None if tokenized.type_ids is None else up(tokenized.type_ids)
        self.starts = up(tokenized.offsets[:-1])
        self.lengths = up(tokenized.lengths)
        self.columns = torch.arange(max_width, device=device)

    def batch(self, rows: torch.Tensor, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None]:
        """``(input_ids, attention_mask (bool), token_type_ids)`` of ``rows``, each ``[len(rows), width]``."""
        cols = self.columns[:width]
        valid = cols[None, :] < self.lengths[rows][:, None]
        pos = (self.starts[rows][:, None] + cols[None, :]).clamp_(max=max(self.ids.numel() - 1, 0))
        ids = torch.where(valid, self.ids[pos], pad_id)
        tts = None if self.type_ids is None else torch.where(valid, self.type_ids[pos], 0)
        return ids, valid, tts

    def packed(self, rows: torch.Tensor, total_tokens: int, max_len: int) -> PackedBatch:
        """``rows`` as one :class:`PackedBatch` (no padding); ``total_tokens`` and ``max_len`` from the host."""
        return PackedBatch.from_flat(self.ids, self.type_ids, self.starts[rows], self.lengths[rows], total_tokens,
                                     max_len)


def _encode_tokenized(
    model: BiEncoder,
    tokenized: Tokenized,
    pad_id: int,
    batch_size: int,
    bf16: bool,
    out_dtype: torch.dtype,
    progress: Any,
    width_multiple: int = 1,
    packed: PackedBertEncoder | None = None,
) -> torch.Tensor:
    """``tokenized`` -> ``[N, D]`` on the model's device, in input order.

    ``packed``: encode through this padding-free copy of ``model``'s encoder instead (each batch's
    tokens packed into one row; see :mod:`simlm_core.modeling.packed`).
    """
    device = next(model.parameters()).device
    n = len(tokenized)
    out = torch.empty((n, model.hidden_size), dtype=out_dtype, device=device)
    if n == 0:
        return out
    lengths = tokenized.lengths
    order = np.argsort(-lengths, kind="stable")  # longest first: a too-large batch fails at once

    def rounded(width: int) -> int:
        return -(-width // width_multiple) * width_multiple

    # Nothing in the loop waits for the device: batch widths come from host-side lengths, and the
    # ids, the padding and the attention mask are built on the device.
    tokens = DeviceTokens(tokenized, device, rounded(int(lengths.max())))
    order_dev = torch.from_numpy(order).to(device)
    with torch.inference_mode(), _precision_context(model, device, bf16):
        for s in range(0, n, batch_size):
            rows = order_dev[s : s + batch_size]
            if packed is None:
                ids, mask, tts = tokens.batch(rows, rounded(int(lengths[order[s]])), pad_id)
                emb = model.encode(ids, mask, tts, num_tokens=int(lengths[order[s : s + batch_size]].sum()))
            else:
                batch = tokens.packed(rows, int(lengths[order[s : s + batch_size]].sum()),
                                      rounded(int(lengths[order[s]])))
                emb = model.normalized(packed.encode(batch))
            out[rows] = emb.to(out_dtype)
            if progress is not None:
                progress.update(len(rows))
    return out


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_texts(
    model: BiEncoder,
    tokenizer: Any,
    texts: Sequence[str] | Sequence[tuple[str | None, str]],
    *,
    max_len: int,
    batch_size: int = 256,
    bf16: bool = True,
    passage_format: str | None = None,
    out_dtype: torch.dtype = torch.float16,
    progress: Any = None,
    packed: PackedBertEncoder | None = None,
) -> torch.Tensor:
    """Encode queries (``str`` items) or passages (``(title, text)`` items) -> ``[N, D]``.

    The result stays on the model's device, in input order. Items are tokenised once, sorted by
    length (longest first) and batched; ``progress`` (a tqdm) is advanced per batch. ``packed``
    (from :func:`packed_encoder`): encode padding-free through it.
    """
    tokenized = _tokenize(model, tokenizer, texts, max_len, passage_format)
    return _encode_tokenized(model, tokenized, _pad_id(tokenizer), batch_size, bf16, out_dtype, progress,
                             packed=packed)


def encode_queries(
    model_dir: PathLike,
    queries_path: PathLike,
    batch_size: int = 256,
    max_len: int | None = None,
    device: str | torch.device = "auto",
    bf16: bool = True,
    pooling: str | None = None,
    normalize: bool | None = None,
    model: BiEncoder | None = None,
) -> tuple[list[str], np.ndarray]:
    """(qids in file order, float32 embeddings ``[Q, D]``). ``max_len`` None: the model's q_max_len (32)."""
    model = model or load_encoder(model_dir, pooling, normalize, device=device)
    queries = load_queries(queries_path)
    qids = list(queries)
    emb = encode_texts(
        model,
        model.tokenizer,
        [queries[q] for q in qids],
        max_len=max_len or model.bi_config.q_max_len,
        batch_size=batch_size,
        bf16=bf16,
        out_dtype=torch.float32,
    )
    return qids, emb.cpu().numpy()


def _iter_shard_batches(pf: pq.ParquetFile, start: int, end: int, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches covering rows ``[start, end)``; row groups outside are not read."""
    pos = 0
    columns = [f.name for f in CORPUS_SCHEMA]
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if pos + n <= start:
            pos += n
            continue
        if pos >= end:
            break
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=columns):
            lo, hi = max(start, pos), min(end, pos + batch.num_rows)
            if lo < hi:
                yield batch.slice(lo - pos, hi - lo)
            pos += batch.num_rows


def _iter_chunks(batches: Iterator[pa.RecordBatch], chunk_rows: int) -> Iterator[pa.Table]:
    buf: list[pa.RecordBatch] = []
    size = 0
    for b in batches:
        while b.num_rows:
            take = min(chunk_rows - size, b.num_rows)
            buf.append(b.slice(0, take))
            size += take
            b = b.slice(take)
            if size == chunk_rows:
                yield pa.Table.from_batches(buf)
                buf, size = [], 0
    if size:
        yield pa.Table.from_batches(buf)


def encode_corpus_shard(
    model_dir: PathLike,
    corpus_path: PathLike,
    shard_index: int,
    num_shards: int,
    out_embeddings: PathLike,
    out_ids: PathLike,
    batch_size: int = 256,
    max_len: int | None = None,
    device: str | torch.device = "auto",
    bf16: bool = True,
    chunk_rows: int = 50_000,
    pooling: str | None = None,
    normalize: bool | None = None,
    passage_format: str | None = None,
    show_progress: bool = True,
    compile: bool = False,
    tokenize_process: bool | None = None,
    packed: bool | None = None,
    gelu_epilogue: bool | None = None,
) -> dict[str, Any]:
    """Encode one shard of the corpus to ``out_embeddings`` (fp16 ``.npy``) + ``out_ids`` (Parquet).

    ``max_len`` None: the model's p_max_len (144). ``bf16`` on a GPU that has it: the weights are
    cast to bf16. ``compile``: ``torch.compile`` the encoder (pays off on large shards; the first
    batches wait for compilation). ``tokenize_process``: tokenise in a child process (None: on a
    GPU with a fast tokenizer, where it beat a helper thread). ``packed``: encode padding-free
    (:func:`packed_encoder`; BERT and ELECTRA encoders; None: wherever the encoder allows it, which
    measured 1.14x on a CPU and 1.15x on an H200, same vectors to 1e-7 in fp32).
    ``gelu_epilogue`` (packed only): the feed-forward GELU in the GEMM epilogue, tanh form
    (1.14x more on an H200). None: wherever the packed encoder runs in bf16 on a GPU, where the
    two forms differ by at most 1/33 of a bf16 step and the vectors' cosine to the exact erf
    form's moved by 1e-5 (0.99994 against 0.99995, both to the padded bf16 loop); never in fp32.
    Returns a summary (rows, dim, seconds, passages/s, device).
    """
    t0 = time.time()
    pf = pq.ParquetFile(corpus_path)
    missing = [f.name for f in CORPUS_SCHEMA if f.name not in pf.schema_arrow.names]
    if missing:
        raise InputError(corpus_path, f"missing column(s) {missing}; has {pf.schema_arrow.names}")
    start, end = shard_range(pf.metadata.num_rows, shard_index, num_shards)
    n = end - start
    dev = resolve_device(device)
    use_bf16 = _use_bf16(dev, bf16)
    model = load_encoder(model_dir, pooling, normalize, passage_format, dev,
                         dtype=torch.bfloat16 if use_bf16 else None)
    width_multiple = 1
    if packed is None:
        packed = packed_support(model.encoder) is None
    if gelu_epilogue and not packed:
        raise ValueError("gelu_epilogue needs packed encoding (packed=True)")
    if gelu_epilogue is None:
        gelu_epilogue = bool(packed) and use_bf16
    packed_model = packed_encoder(model, compile=compile, gelu_epilogue=gelu_epilogue) if packed else None
    if compile:
        if packed_model is None:
            compile_encoder(model)
        width_multiple = 8
    dim = model.hidden_size
    max_len = max_len or model.bi_config.p_max_len
    Path(out_embeddings).parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=n, unit="psg", unit_scale=True, desc=f"encode shard {shard_index}/{num_shards}",
        disable=not show_progress, smoothing=0.1,
    )
    written = 0
    in_process = False
    with ParquetStreamWriter(out_ids, IDS_SCHEMA) as ids_writer, atomic_path(out_embeddings) as tmp:
        if n == 0:
            with open(tmp, "wb") as f:
                np.save(f, np.zeros((0, dim), dtype=np.float16))
        else:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
            batches = _iter_shard_batches(pf, start, end, batch_rows=min(chunk_rows, 65_536))

            fmt = passage_format or model.bi_config.passage_format
            backend = BackendTokenizer.of(model.tokenizer, max_len)

            in_process = backend is not None and (
                tokenize_process if tokenize_process is not None else dev.type == "cuda")

            def tokenize_chunk(chunk: pa.Table) -> Tokenized:
                items = list(zip(chunk.column("title").to_pylist(), chunk.column("text").to_pylist()))
                return _tokenize_items(model.tokenizer, items, max_len, fmt, backend)

            pad_id = _pad_id(model.tokenizer)
            with contextlib.ExitStack() as stack:
                # Chunk k+1 is tokenised while the device encodes chunk k; its text is dropped once
                # tokenised. A child process does it on a GPU (see TokenizerProcess), a thread on
                # a CPU, where the forward pass needs the cores anyway.
                if in_process:
                    proc = stack.enter_context(TokenizerProcess(backend))

                    def submit_chunk(chunk: pa.Table) -> tuple[pa.Array, Future]:
                        titles, texts = chunk.column("title").to_pylist(), chunk.column("text").to_pylist()
                        return chunk.column("pid"), proc.submit(passage_inputs(titles, texts, fmt))
                else:
                    pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))

                    def submit_chunk(chunk: pa.Table) -> tuple[pa.Array, Future]:
                        return chunk.column("pid"), pool.submit(tokenize_chunk, chunk)

                chunks = _iter_chunks(batches, chunk_rows)
                first = next(chunks, None)
                pending = submit_chunk(first) if first is not None else None
                while pending is not None:
                    pids, future = pending
                    tokenized = future.result()
                    nxt = next(chunks, None)
                    pending = submit_chunk(nxt) if nxt is not None else None
                    emb = _encode_tokenized(model, tokenized, pad_id, batch_size, bf16, torch.float16, bar,
                                            width_multiple, packed_model)
                    mm[written : written + len(tokenized)] = emb.cpu().numpy()
                    ids_writer.write({"pid": pids})
                    written += len(tokenized)
                    del tokenized, emb
            mm.flush()
            del mm
        if written != n:
            raise RuntimeError(f"shard {shard_index}: encoded {written} rows, expected {n}")
    bar.close()
    seconds = time.time() - t0
    return {
        "shard_index": shard_index,
        "num_shards": num_shards,
        "start": start,
        "end": end,
        "num_passages": n,
        "dim": dim,
        "seconds": round(seconds, 3),
        "passages_per_s": round(n / seconds, 1) if seconds > 0 else None,
        "device": str(dev),
        "bf16": use_bf16,
        "compiled": bool(compile),
        "packed": packed_model is not None,
        "gelu_epilogue": bool(gelu_epilogue),
        "tokenized_in_process": in_process,
        "out_embeddings": str(out_embeddings),
        "out_ids": str(out_ids),
    }
