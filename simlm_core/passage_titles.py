"""Passage titles kept apart from the collection (MS MARCO's RocketQA titles).

The MS MARCO passage collection has no titles. The SimLM authors trained on titles from RocketQA
(``para.title.txt``: ``pid<TAB>title`` per line, the same file coCondenser used; their README,
FAQ 2), fed as ``tokenizer(title, text_pair=text)`` to the retriever and ``"title: text"`` to the
re-ranker. :class:`TitleLookup` reads such a file once and attaches titles to the collection's
passages batch by batch while the corpus streams into Parquet.

Memory stays near the titles' own size (8.8M titles: about 0.5 GiB): the titles and their ids sit
in Arrow arrays, and lookups go through a sorted array of 64-bit id hashes (8 bytes per title),
each hit checked against the id itself. Passages the file does not list keep an empty title
(counted); titles of ids outside the collection are counted too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from simlm_core.io import InputError, PathLike
from simlm_core.text_input import iter_lines, tsv_fields

__all__ = ["TitleLookup", "id_hashes"]

CHUNK = 500_000


def id_hashes(ids: list[str]) -> np.ndarray:
    """64-bit hashes of string ids, stable within a process (Python's ``hash``)."""
    return np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))


def _report_second_title(path: PathLike, pid: str) -> None:
    """Raise the error for a pid listed twice, naming both lines (a second pass over the file:
    line numbers are not kept, 8.8M of them would cost ~300 MiB for an error that rarely happens)."""
    first = None
    for lineno, text in iter_lines(path):
        if text.split("\t", 1)[0] == pid:
            if first is not None:
                raise InputError(path, f"passage {pid!r} has a second title (first on line {first})", lineno)
            first = lineno


@dataclass
class TitleLookup:
    """``pid -> title`` for a big collection, looked up a batch of pids at a time."""

    path: str
    pids: pa.StringArray
    titles: pa.StringArray
    sorted_hashes: np.ndarray
    order: np.ndarray
    """``pids[order[i]]`` has hash ``sorted_hashes[i]``."""
    matched: int = 0
    missing: int = 0
    _used: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @classmethod
    def from_file(cls, path: PathLike) -> "TitleLookup":
        """Read ``pid<TAB>title`` lines (an empty title allowed); a line without exactly one tab,
        an empty pid or a pid listed twice is an error naming the file and line."""
        pid_chunks: list[pa.Array] = []
        title_chunks: list[pa.Array] = []
        hash_chunks: list[np.ndarray] = []
        pids: list[str] = []
        titles: list[str] = []

        def flush() -> None:
            if pids:
                pid_chunks.append(pa.array(pids, pa.string()))
                title_chunks.append(pa.array(titles, pa.string()))
                hash_chunks.append(id_hashes(pids))
                pids.clear()
                titles.clear()

        for lineno, text in iter_lines(path):
            parts = tsv_fields(path, lineno, text, 2, "pid, title")
            if not parts[0].strip():
                raise InputError(path, "empty passage id", lineno)
            pids.append(parts[0])
            titles.append(parts[1])
            if len(pids) >= CHUNK:
                flush()
        flush()
        all_pids = pa.chunked_array(pid_chunks, pa.string()).combine_chunks()
        all_titles = pa.chunked_array(title_chunks, pa.string()).combine_chunks()
        hashes = np.concatenate(hash_chunks) if hash_chunks else np.zeros(0, np.int64)
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        for i in np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]):
            # equal hashes: the same pid twice, or (improbably) two pids that collide
            a, b = (int(x) for x in order[i : i + 2])
            if all_pids[a].as_py() == all_pids[b].as_py():
                _report_second_title(path, all_pids[a].as_py())
        return cls(str(path), all_pids, all_titles, sorted_hashes, order, _used=np.zeros(len(all_pids), dtype=bool))

    def __len__(self) -> int:
        return len(self.pids)

    def lookup(self, pids: list[str]) -> list[str]:
        """Each pid's title ("" for a pid the file does not list), counting hits and misses."""
        hashes = id_hashes(pids)
        lo = np.searchsorted(self.sorted_hashes, hashes, side="left")
        hi = np.searchsorted(self.sorted_hashes, hashes, side="right")
        out = [""] * len(pids)
        hits = np.flatnonzero(hi > lo)
        rows = self.order[lo[hits]]
        same = pc.equal(self.pids.take(rows), pa.array([pids[i] for i in hits], pa.string()))
        titles = self.titles.take(rows).to_pylist()
        found = 0
        for k, (i, ok) in enumerate(zip(hits.tolist(), same.to_pylist())):
            row = int(rows[k]) if ok else self._colliding_row(pids[i], int(lo[i]) + 1, int(hi[i]))
            if row >= 0:
                out[i] = titles[k] if ok else self.titles[row].as_py()
                self._used[row] = True
                found += 1
        self.matched += found
        self.missing += len(pids) - found
        return out

    def _colliding_row(self, pid: str, start: int, stop: int) -> int:
        """The row of ``pid`` among other ids of the same hash (-1: not listed)."""
        for j in range(start, stop):
            row = int(self.order[j])
            if self.pids[row].as_py() == pid:
                return row
        return -1

    def unused(self) -> int:
        """Titles of ids no lookup asked for (ids outside the collection, once it has streamed)."""
        return int(len(self._used) - self._used.sum())
