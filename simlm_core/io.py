"""Artifact formats and safe writing.

Every artifact of the pipeline is written through this module: Parquet schemas are fixed here,
and every writer goes to a temporary sibling first and is renamed into place only when complete,
so a killed job never leaves a half-written file that a rerun would trust.
"""
from __future__ import annotations

import contextlib
import hashlib
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
import pyarrow.ipc as ipc
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


# ---------------------------------------------------------------------------------------------
# Memory-mapped corpus cache and random passage access
_CACHE_FORMAT = 2  # bump when the cache file's layout changes (old files are then ignored)
_CACHE_BATCH_ROWS = 65_536  # rows per Arrow record batch in the cache (never across row groups)


def _parquet_footer_digest(path: Path) -> str:
    """sha1 of the Parquet footer (schema, row-group sizes, offsets, statistics): a cheap content key."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 12:
            return "short"
        f.seek(size - 8)
        tail = f.read(8)
        footer_len = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or footer_len > size - 12:
            return "not-parquet"
        f.seek(size - 8 - footer_len)
        return hashlib.sha1(f.read(footer_len)).hexdigest()


def _corpus_fingerprint(src: Path) -> tuple[Any, ...]:
    st = src.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino, _parquet_footer_digest(src))


def _corpus_cache_dirs(src: Path) -> list[Path]:
    """Where a cache for ``src`` may live: a folder beside the corpus, else the user's cache."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simlm_core"
    return [src.parent / f".{src.name}.arrow-cache", user]


def _cache_is_complete(path: Path, num_rows: int) -> bool:
    """True for a readable Arrow IPC file with the corpus schema and ``num_rows`` rows.

    A file cut short has no IPC footer and fails to open; files only ever appear under their final
    name by an atomic rename, so this is a guard against outside damage, not the locking scheme.
    """
    try:
        with pa.memory_map(str(path), "r") as source:
            reader = ipc.open_file(source)
            if not reader.schema.equals(CORPUS_SCHEMA):
                return False
            # Batch by batch, zero-copy on the map (RecordBatchFileReader.count_rows is missing
            # from older pyarrow releases, which our pyarrow>=14 pin admits).
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            return rows == num_rows
    except (OSError, pa.ArrowException):
        return False


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Best-effort exclusive lock so concurrent jobs build a cache once (correctness never needs it)."""
    try:
        import fcntl

        f = open(path.parent / f".{path.name}.lock", "a")
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        f.close()  # releases the lock


def _write_corpus_arrow(src: Path, dest: Path) -> None:
    """Stream ``src`` into an uncompressed Arrow IPC file at ``dest`` (atomically)."""
    names = [f.name for f in CORPUS_SCHEMA]
    pf = pq.ParquetFile(src, pre_buffer=False)  # pre_buffer=False: see iter_corpus_batches
    missing = [n for n in names if n not in pf.schema_arrow.names]
    if missing:
        raise InputError(src, f"missing column(s) {missing}; has {pf.schema_arrow.names}")
    with atomic_path(dest) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, CORPUS_SCHEMA) as writer:
            # one row group at a time, so that record batches (the table's chunks) follow row groups
            for group in range(pf.num_row_groups):
                for batch in pf.iter_batches(batch_size=_CACHE_BATCH_ROWS, row_groups=[group], columns=names):
                    writer.write_batch(batch.select(names).cast(CORPUS_SCHEMA))


def corpus_arrow_cache(corpus_path: PathLike, cache_dir: PathLike | None = None) -> Path:
    """An uncompressed Arrow IPC copy of the corpus (pid, title, text), built once by streaming.

    Memory-mapping it gives random access with no decoding and no copy in process memory (pages
    are shared between processes: data-loader workers, DDP ranks, concurrent jobs).

    The file is named by a key of the corpus's resolved path, size, modification time, inode and
    Parquet footer, so a changed corpus gets a new cache. It is written to a temporary sibling and
    renamed into place when complete; a temporary file left by a killed job is never read. An
    existing file is checked (IPC footer, schema, row count) before it is trusted, else rebuilt.

    ``cache_dir``: where to keep it; by default a hidden folder beside the corpus
    (``.<corpus name>.arrow-cache``), or ``$XDG_CACHE_HOME/simlm_core`` (``~/.cache/simlm_core``)
    where that folder cannot be written.
    """
    src = Path(corpus_path).resolve()
    for _attempt in range(3):
        fingerprint = _corpus_fingerprint(src)
        key = hashlib.sha1(f"v{_CACHE_FORMAT}|{src}|{fingerprint}".encode()).hexdigest()[:16]
        name = f"corpus-{key}.arrow"
        num_rows = corpus_size(src)
        dirs = [Path(cache_dir)] if cache_dir is not None else _corpus_cache_dirs(src)
        for folder in dirs:
            if _cache_is_complete(folder / name, num_rows):
                return folder / name
        for i, folder in enumerate(dirs):
            dest = folder / name
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with _build_lock(dest):
                    if _cache_is_complete(dest, num_rows):  # another job built it while we waited
                        return dest
                    _write_corpus_arrow(src, dest)
                break
            except OSError:  # e.g. a read-only corpus folder: try the next place
                if i == len(dirs) - 1:
                    raise
        if _corpus_fingerprint(src) == fingerprint and _cache_is_complete(dest, num_rows):
            return dest
        # the corpus was replaced while we copied it: that copy is under a stale key; redo
        dest.unlink(missing_ok=True)
    raise InputError(src, "corpus keeps changing while its Arrow cache is built")


def _open_arrow(path: PathLike) -> pa.Table:
    """The whole IPC file as a table of zero-copy views into a read-only memory map."""
    return ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _fill_keys(strings: pa.Array, out: np.ndarray) -> np.ndarray:
    """Write each string's UTF-8 bytes, then a 0x01 end marker, into the rows of ``out``.

    ``out``: zeroed uint8 of shape (len(strings), width). The end marker makes the (NUL-padded)
    fixed-width key unique for every string, including strings that end in NUL bytes. Returns
    the mask of rows written: non-null strings shorter than ``width`` (the others stay all-zero,
    which no written key equals).
    """
    m, width = out.shape
    if m == 0:
        return np.zeros(0, dtype=bool)
    if not (pa.types.is_string(strings.type) or pa.types.is_binary(strings.type)
            or pa.types.is_large_string(strings.type) or pa.types.is_large_binary(strings.type)):
        raise TypeError(f"pids must be strings, got {strings.type}")
    large = pa.types.is_large_string(strings.type) or pa.types.is_large_binary(strings.type)
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64 if large else np.int32)
    offsets = offsets[strings.offset:strings.offset + m + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    ok = lengths < width
    if strings.null_count:
        ok &= ~strings.is_null().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(ok)
    lengths = lengths[rows]
    total = int(lengths.sum())
    if total:  # one scatter: byte i of string r goes to out[r, i]
        assert out.flags.c_contiguous
        before = np.cumsum(lengths) - lengths  # bytes of the kept strings ahead of each one
        within = np.arange(total) - np.repeat(before, lengths)
        source = np.repeat(starts[rows], lengths) + within
        out.reshape(-1)[np.repeat(rows * width, lengths) + within] = data[source]
    out[rows, lengths] = 1
    return ok


def _key_dtype(max_len: int) -> np.dtype:
    """uint64 for keys of up to 8 bytes (MS MARCO: 7 digits + end marker), else bytes of 8k."""
    return np.dtype(np.uint64) if max_len + 1 <= 8 else np.dtype(f"S{-(-(max_len + 1) // 8) * 8}")


def _as_bytes(keys: np.ndarray) -> np.ndarray:
    return keys.view(np.uint8).reshape(len(keys), keys.dtype.itemsize)


def _sort_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys)``; byte keys are sorted as big-endian 64-bit words (lexsort), which is
    their byte order too and several times faster than numpy's string sort."""
    if keys.dtype == np.uint64 or not len(keys):
        return np.argsort(keys)
    words = keys.view(">u8").reshape(len(keys), -1)
    return np.lexsort([words[:, j].astype(np.uint64) for j in reversed(range(words.shape[1]))])


class PassageStore:
    """Random access to passages by pid, in bounded memory.

    The corpus is read from an Arrow IPC copy (:func:`corpus_arrow_cache`, built once per corpus
    version) through a memory map: rows come zero-copy from the page cache, so resident memory
    stays small and is shared between processes. pids are looked up in a sorted array of
    fixed-width keys (pid bytes + end marker, NUL-padded to 8 bytes or a multiple; with the row
    numbers, 12 bytes per passage for pids of up to 7 bytes; no Python object per passage) with a
    vectorised binary search.

    ``cache_dir``: where the Arrow copy lives (see :func:`corpus_arrow_cache`).
    """

    def __init__(self, corpus_path: PathLike, *, cache_dir: PathLike | None = None) -> None:
        self.path = Path(corpus_path)
        self.arrow_path = corpus_arrow_cache(corpus_path, cache_dir)
        self.table = _open_arrow(self.arrow_path)
        self._build_index()

    def _build_index(self) -> None:
        pids = self.table.column("pid")
        n = len(pids)
        if pids.null_count:
            raise InputError(self.path, f"{pids.null_count} null pid(s) in corpus")
        # chunk by chunk: a length array for the whole column would stay in Arrow's memory pool
        max_len = max((pc.max(pc.binary_length(c)).as_py() or 0 for c in pids.chunks), default=0)
        keys = np.zeros(n, dtype=_key_dtype(max_len))
        out, base = _as_bytes(keys), 0
        for chunk in pids.chunks:
            _fill_keys(chunk, out[base:base + len(chunk)])
            base += len(chunk)
        order = _sort_order(keys)
        keys = keys[order]
        dup = np.flatnonzero(keys[1:] == keys[:-1])
        if dup.size:
            examples = take_rows(pids, order[dup[:5]].astype(np.int64))
            raise InputError(self.path, f"duplicate pids in corpus, e.g. {examples}")
        self._keys = keys
        self._order = order.astype(np.int32 if n < 2**31 else np.int64)
        self._bounds = np.cumsum([0] + [len(c) for c in pids.chunks])

    def __getstate__(self) -> dict[str, Any]:  # pickled (spawned workers): reopen the map there
        state = self.__dict__.copy()
        state["table"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.table = _open_arrow(self.arrow_path)

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, pids: Sequence[str]) -> np.ndarray:
        """Row numbers (in the corpus file's order) of ``pids``; KeyError names unknown ones."""
        pids = list(pids)
        wanted = np.zeros(len(pids), dtype=self._keys.dtype)
        fits = _fill_keys(pa.array(pids, type=pa.string()), _as_bytes(wanted))
        if len(self._keys):
            at = np.minimum(np.searchsorted(self._keys, wanted), len(self._keys) - 1)
            found = fits & (self._keys[at] == wanted)
        else:
            at, found = np.zeros(len(pids), dtype=np.int64), np.zeros(len(pids), dtype=bool)
        if not found.all():
            missing = [p for p, f in zip(pids, found) if not f][:5]
            raise KeyError(f"pids not in corpus {self.path}: {missing}")
        return self._order[at].astype(np.int64)

    def get(self, pids: Sequence[str]) -> list[tuple[str, str]]:
        """(title, text) for each pid, in order."""
        rows = self.rows(pids)
        titles = _take_rows(self.table.column("title"), rows, self._bounds)
        texts = _take_rows(self.table.column("text"), rows, self._bounds)
        return list(zip(titles, texts))


def take_rows(column: pa.ChunkedArray, rows: np.ndarray) -> list[Any]:
    """Values at ``rows`` (in that order), taken chunk by chunk.

    A take across the chunks of a large corpus joins them first and overflows Arrow's 32-bit
    string offsets past 2 GiB (seen at 8.8M passages).
    """
    return _take_rows(column, rows, np.cumsum([0] + [len(c) for c in column.chunks]))


def _take_rows(column: pa.ChunkedArray, rows: np.ndarray, bounds: np.ndarray) -> list[Any]:
    out: list[Any] = [None] * len(rows)
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
