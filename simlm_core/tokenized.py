"""Token ids of many texts in flat arrays, and a process pool that produces them in parallel.

A GPU encodes BERT-base passages faster (~30k/s on an H200) than one Python process can turn
them into token ids (~20k/s: the Rust tokenizer is fast, building Python lists of ids is not, and
it holds the GIL). :class:`TokenizePool` spreads that work over processes that load only the
``tokenizers`` backend (no torch, no transformers: they start in well under a second) from the
parent's own tokenizer, so the ids are exactly those the parent would produce.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Sequence

import numpy as np

__all__ = ["Tokenized", "TokenizePool"]


class Tokenized:
    """Token ids of N texts, unpadded, as flat int32 arrays with per-text lengths (CSR layout).

    Flat numpy arrays instead of lists of lists: they cross a process boundary in one pickle,
    and a batch is padded by one vectorised gather instead of a Python loop over its rows.
    """

    __slots__ = ("ids", "type_ids", "lengths", "offsets")

    def __init__(self, ids: np.ndarray, type_ids: np.ndarray | None, lengths: np.ndarray) -> None:
        self.ids = ids
        self.type_ids = type_ids
        self.lengths = lengths.astype(np.int64, copy=False)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None) -> "Tokenized":
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total)
        flat_types = (
            None if type_ids is None
            else np.fromiter(itertools.chain.from_iterable(type_ids), dtype=np.int32, count=total)
        )
        return cls(flat, flat_types, lengths)

    @classmethod
    def concat(cls, parts: Sequence["Tokenized"]) -> "Tokenized":
        types = None if any(p.type_ids is None for p in parts) else np.concatenate([p.type_ids for p in parts])
        return cls(np.concatenate([p.ids for p in parts]), types, np.concatenate([p.lengths for p in parts]))

    def __len__(self) -> int:
        return len(self.lengths)

    def padded(self, rows: np.ndarray, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(input_ids, attention_mask, token_type_ids)`` of ``rows``, each ``[len(rows), width]``."""
        lens = self.lengths[rows]
        b = len(rows)
        ids = np.full((b, width), pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        tts = np.zeros((b, width), dtype=np.int64) if self.type_ids is not None else None
        row_of = np.repeat(np.arange(b), lens)
        col = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        src = np.repeat(self.offsets[rows], lens) + col
        ids[row_of, col] = self.ids[src]
        mask[row_of, col] = 1
        if tts is not None:
            tts[row_of, col] = self.type_ids[src]
        return ids, mask, tts


# The backend tokenizer of a pool worker (set by its initializer).
_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_json: str, max_len: int) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker: the pool is the parallelism
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    # What transformers sets for `tokenizer(..., max_length=max_len, truncation=True)`.
    tok.enable_truncation(max_len, strategy="longest_first")
    tok.no_padding()
    _WORKER_TOKENIZER = tok


def _encode_slice(inputs: list) -> Tokenized:
    encodings = _WORKER_TOKENIZER.encode_batch(inputs, add_special_tokens=True)
    return Tokenized.from_lists([e.ids for e in encodings], [e.type_ids for e in encodings])


class TokenizePool:
    """``workers`` processes that tokenise with the backend of ``tokenizer`` (a fast HF tokenizer).

    ``pool.tokenize(inputs)``: ``inputs`` are strings or ``(text, text_pair)`` tuples, as a fast
    tokenizer's backend takes them; returns :class:`Tokenized` in input order. A context manager.
    """

    def __init__(self, tokenizer: Any, max_len: int, workers: int) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("tokenising in worker processes needs a fast (Rust) tokenizer")
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(backend.to_str(), max_len),
        )

    def tokenize(self, inputs: list) -> Tokenized:
        if not inputs:
            return Tokenized(np.zeros(0, np.int32), None, np.zeros(0, np.int64))
        step = -(-len(inputs) // (4 * self.workers))  # 4 slices per worker: balances uneven lengths
        slices = [inputs[i : i + step] for i in range(0, len(inputs), step)]
        return Tokenized.concat(list(self._pool.map(_encode_slice, slices)))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "TokenizePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
