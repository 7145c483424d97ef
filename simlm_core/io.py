"""Artifact formats and safe writing.

Every artifact of the pipeline is written through this module: Parquet schemas are fixed here,
and every writer goes to a temporary sibling first and is renamed into place only when complete,
so a killed job never leaves a half-written file that a rerun would trust.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PathLike = str | os.PathLike[str]


class InputError(ValueError):
    """Bad user input, reported with the file and (where it applies) the line."""

    def __init__(self, path: PathLike, problem: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


# ---------------------------------------------------------------------------------------------
# Canonical Parquet schemas (DESIGN.md §3)
CORPUS_SCHEMA = pa.schema([("pid", pa.string()), ("title", pa.string()), ("text", pa.string())])
QUERIES_SCHEMA = pa.schema([("qid", pa.string()), ("text", pa.string())])
QRELS_SCHEMA = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("relevance", pa.int32())])
ANSWERS_SCHEMA = pa.schema([("qid", pa.string()), ("answers", pa.list_(pa.string()))])
RUN_SCHEMA = pa.schema(
    [("qid", pa.string()), ("pid", pa.string()), ("rank", pa.int32()), ("score", pa.float32())]
)
NEGATIVES_SCHEMA = pa.schema(
    [("qid", pa.string()), ("positives", pa.list_(pa.string())), ("negatives", pa.list_(pa.string()))]
)
SCORES_SCHEMA = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("score", pa.float32())])
IDS_SCHEMA = pa.schema([("pid", pa.string())])


# ---------------------------------------------------------------------------------------------
# Atomic writers
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; artifacts get the usual permissions (shared cluster filesystems).
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it onto ``path`` on success only."""
    final = Path(path)
    tmp = _tmp_sibling(final, final.suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; it replaces ``path`` on success only."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_table(table: pa.Table | pd.DataFrame, path: PathLike, schema: pa.Schema) -> None:
    """Write a whole table atomically, cast to ``schema`` (columns in schema order)."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table[[f.name for f in schema]], preserve_index=False)
    table = table.select([f.name for f in schema]).cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class ParquetStreamWriter:
    """Write a Parquet file row group by row group (bounded memory), atomically.

    Use as a context manager; the file appears at ``path`` only if the block exits cleanly.
    """

    def __init__(self, path: PathLike, schema: pa.Schema) -> None:
        self.path = Path(path)
        self.schema = schema
        self._ctx = atomic_path(self.path)
        self._writer: pq.ParquetWriter | None = None
        self.rows_written = 0

    def __enter__(self) -> "ParquetStreamWriter":
        tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema)
        return self

    def write(self, columns: dict[str, Sequence[Any]] | pa.Table | pd.DataFrame) -> None:
        assert self._writer is not None, "use ParquetStreamWriter as a context manager"
        if isinstance(columns, pd.DataFrame):
            table = pa.Table.from_pandas(columns[[f.name for f in self.schema]], preserve_index=False)
        elif isinstance(columns, pa.Table):
            table = columns.select([f.name for f in self.schema])
        else:
            table = pa.table({f.name: columns[f.name] for f in self.schema})
        table = table.cast(self.schema)
        if table.num_rows:
            self._writer.write_table(table)
            self.rows_written += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._writer is not None
        self._writer.close()
        if exc_type is None:
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(exc_type, exc, tb)
        return False


def write_json(obj: Any, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(text: str, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npy(array: np.ndarray, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


# ---------------------------------------------------------------------------------------------
# Readers
def read_table(path: PathLike, schema: pa.Schema) -> pd.DataFrame:
    """Read a whole (small) artifact as pandas, checking it has the schema's columns."""
    table = pq.read_table(path)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; has {table.column_names}")
    return table.select([f.name for f in schema]).cast(schema).to_pandas()


def read_run(path: PathLike) -> pd.DataFrame:
    return read_table(path, RUN_SCHEMA)


def write_run(run: pd.DataFrame, path: PathLike) -> None:
    """Write a run sorted by qid, then rank."""
    run = run.sort_values(["qid", "rank"], kind="stable")
    write_table(run, path, RUN_SCHEMA)


def run_to_trec(run: pd.DataFrame, path: PathLike, tag: str) -> None:
    """Write a run as TREC run text (``qid Q0 pid rank score tag``)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in run.itertuples(index=False):
            f.write(f"{row.qid} Q0 {row.pid} {row.rank} {row.score:.6f} {tag}\n")


def iter_corpus_batches(path: PathLike, batch_size: int = 10_000) -> Iterator[pa.RecordBatch]:
    """Stream the corpus Parquet in record batches (never the whole corpus in memory)."""
    # pre_buffer=False: pyarrow otherwise buffers whole row-group ranges (measured: 2.97 GiB peak
    # on a 2.9 GB corpus, against 0.25 GiB without).
    pf = pq.ParquetFile(path, pre_buffer=False)
    yield from pf.iter_batches(batch_size=batch_size, columns=[f.name for f in CORPUS_SCHEMA])


def corpus_size(path: PathLike) -> int:
    return pq.ParquetFile(path).metadata.num_rows


class PassageStore:
    """Random access to passages by pid.

    The corpus stays an Arrow table (memory-mapped where the filesystem allows it), and pids are
    looked up with Arrow's hash kernel: no Python object per passage (8.8M pids as Python strings
    would cost about 1 GB per process).
    """

    def __init__(self, corpus_path: PathLike) -> None:
        self.path = Path(corpus_path)
        self.table = pq.read_table(corpus_path, memory_map=True)
        self._pids = self.table.column("pid").combine_chunks()
        if pc.count_distinct(self._pids).as_py() != len(self._pids):
            raise InputError(corpus_path, "duplicate pids in corpus")

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, pids: Sequence[str]) -> np.ndarray:
        idx = pc.index_in(pa.array(list(pids), type=pa.string()), value_set=self._pids)
        if idx.null_count:
            missing = [p for p, i in zip(pids, idx.to_pylist()) if i is None][:5]
            raise KeyError(f"pids not in corpus {self.path}: {missing}")
        return idx.to_numpy(zero_copy_only=False).astype(np.int64)

    def get(self, pids: Sequence[str]) -> list[tuple[str, str]]:
        """(title, text) for each pid, in order."""
        rows = self.rows(pids)
        titles = take_rows(self.table.column("title"), rows)
        texts = take_rows(self.table.column("text"), rows)
        return list(zip(titles, texts))


def take_rows(column: pa.ChunkedArray, rows: np.ndarray) -> list[Any]:
    """Values at ``rows`` (in that order), taken chunk by chunk.

    A take across the chunks of a large corpus joins them first and overflows Arrow's 32-bit
    string offsets past 2 GiB (seen at 8.8M passages).
    """
    out: list[Any] = [None] * len(rows)
    bounds = np.cumsum([0] + [len(c) for c in column.chunks])
    chunk_of = np.searchsorted(bounds, rows, side="right") - 1
    for chunk in np.unique(chunk_of):
        where = np.flatnonzero(chunk_of == chunk)
        values = column.chunk(int(chunk)).take(pa.array(rows[where] - bounds[chunk])).to_pylist()
        for position, value in zip(where, values):
            out[position] = value
    return out


def load_queries(path: PathLike) -> dict[str, str]:
    df = read_table(path, QUERIES_SCHEMA)
    return dict(zip(df.qid, df.text))


def passage_text(title: str | None, text: str, sep: str = " ") -> str:
    """How a passage is shown to lexical and neural models alike: title, separator, text."""
    return f"{title}{sep}{text}" if title else text
