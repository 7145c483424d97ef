"""Token ids of many texts in flat arrays, produced straight by a fast tokenizer's Rust backend."""
from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["Tokenized", "BackendTokenizer", "TokenizerProcess"]


class Tokenized:
    """Token ids of N texts, unpadded, as flat int32 arrays with per-text lengths (CSR layout).

    Flat numpy arrays instead of lists of lists: a chunk goes to the device in one copy and its
    batches are padded there by a gather (``simlm_core.encode.DeviceTokens``).
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

    def __len__(self) -> int:
        return len(self.lengths)


class BackendTokenizer:
    """Token ids straight from the Rust backend of a fast HF tokenizer, as :class:`Tokenized`.

    ``tokenizer(texts, max_length=max_len, truncation=True)`` builds Python lists for every field
    of every text (ids, type ids, attention mask) and holds the GIL while doing it; on an H200's
    host it tokenised 17.6k BERT passages/s, slower than the GPU encodes them (29.6k/s in bf16).
    The backend's own batch call ran at 63k/s there and reading ``.ids`` off its results at 155k/s,
    so this path takes only what encoding needs. It works on a private copy of the backend, set
    to truncate like transformers' ``truncation=True`` (longest first), so the ids are the same
    (tests/test_tokenized.py checks them against transformers).
    """

    def __init__(self, tokenizer: Any, max_len: int) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tokenizer).__name__} has no Rust backend (not a fast tokenizer)")
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(backend.to_str())
        self._tok.enable_truncation(max_len, strategy="longest_first")
        self._tok.no_padding()

    @classmethod
    def from_json(cls, backend_json: str) -> "BackendTokenizer":
        """Rebuild from :meth:`to_json` (truncation settings included)."""
        from tokenizers import Tokenizer

        obj = cls.__new__(cls)
        obj._tok = Tokenizer.from_str(backend_json)
        return obj

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def of(cls, tokenizer: Any, max_len: int) -> "BackendTokenizer | None":
        """A :class:`BackendTokenizer` for a fast tokenizer; None for a slow one."""
        return cls(tokenizer, max_len) if getattr(tokenizer, "backend_tokenizer", None) is not None else None

    def __call__(self, inputs: Sequence[str] | Sequence[tuple[str, str]]) -> Tokenized:
        """``inputs``: strings, or ``(text, text_pair)`` tuples; ids in input order."""
        encodings = self._tok.encode_batch(list(inputs), add_special_tokens=True)
        return Tokenized.from_lists([e.ids for e in encodings], [e.type_ids for e in encodings])


# ---------------------------------------------------------------------------------------------
# Tokenising in a child process
class TokenizerProcess:
    """A :class:`BackendTokenizer` running in a child process, to overlap with a device loop.

    In a helper *thread*, the Rust batch call itself releases the GIL, but reading every
    encoding's ids and type ids into Python lists holds it (0.24 s per 20k passages on one core)
    while the thread that launches the GPU kernels waits. On an H200 a child process encoded a
    65,536-passage shard at 15.4-16.2k passages/s against 14.1-14.7k with a thread.

    The child is a plain ``python -c`` subprocess fed pickles over its stdin and stdout, not a
    ``multiprocessing`` worker, which would re-import the caller's main script (a Snakemake
    ``script:`` or a notebook has no ``__main__`` guard). ``submit`` returns a future; requests
    are served one at a time, in order; only the inputs and the flat id arrays cross the process
    boundary.
    """

    def __init__(self, backend: BackendTokenizer, threads: int | None = None) -> None:
        threads = threads or max(1, (os.cpu_count() or 2) - 1)  # leave a core to the device loop
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from simlm_core.tokenized import _serve_child; _serve_child()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer-process")
        self._io.submit(self._send, backend.to_json())

    def _send(self, obj: Any) -> None:
        assert self._proc.stdin is not None
        pickle.dump(obj, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self._proc.stdin.flush()

    def _roundtrip(self, inputs: list) -> Tokenized:
        assert self._proc.stdout is not None
        try:
            self._send(inputs)
            result = pickle.load(self._proc.stdout)
        except (EOFError, BrokenPipeError) as exc:
            raise RuntimeError(f"tokenizer process exited (code {self._proc.poll()}); see its stderr") from exc
        if isinstance(result, str):  # the child's error message
            raise RuntimeError(f"tokenizer process: {result}")
        return result

    def submit(self, inputs: Sequence[str] | Sequence[tuple[str, str]]) -> "Future[Tokenized]":
        return self._io.submit(self._roundtrip, list(inputs))

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        if self._proc.stdin is not None:
            self._proc.stdin.close()  # EOF: the child returns
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> "TokenizerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _serve_child() -> None:
    """The child's loop: a backend JSON first, then token-id requests until stdin closes."""
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, not into the result stream
    requests = sys.stdin.buffer
    tokenizer = BackendTokenizer.from_json(pickle.load(requests))
    while True:
        try:
            inputs = pickle.load(requests)
        except EOFError:
            return
        try:
            result: Any = tokenizer(inputs)
        except Exception as exc:  # reported to the parent, which raises it
            result = f"{type(exc).__name__}: {exc}"
        pickle.dump(result, results, protocol=pickle.HIGHEST_PROTOCOL)
        results.flush()
