"""Reading the line-based text files of IR datasets (TSV collections and topics, TREC/BEIR qrels),
with errors that name the file and line. Shared by data preparation and by the metrics' loaders of
external TREC files, so both apply the same checks.

Lines are read as bytes and decoded one at a time (a bad byte names its line); gzip is read
transparently; a UTF-8 byte-order mark on the first line is dropped.
"""
from __future__ import annotations

import codecs
import gzip
import re
from typing import IO, Callable, Iterator

from simlm_core.io import InputError, PathLike

__all__ = ["RELEVANCE_RANGE", "check_id", "decode_line", "iter_lines", "open_binary", "read_qrels",
           "relevance_label", "tsv_fields"]


def open_binary(path: PathLike) -> IO[bytes]:
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def decode_line(path: PathLike, raw: bytes, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        raise InputError(path, f"not valid UTF-8 (byte {e.start + 1} of the line, {bad!r})", lineno) from None


def iter_lines(path: PathLike, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for each non-blank line, line ending removed. A line of
    tabs is not blank: it is a record of empty fields, which the parsers reject by name.

    ``on_bytes`` is told how many bytes were read (for a progress bar over big files).
    """
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if on_bytes is not None:
                on_bytes(len(raw))
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            text = decode_line(path, raw, lineno).rstrip("\r\n")
            if text.strip() or "\t" in text:
                yield lineno, text


def tsv_fields(path: PathLike, lineno: int, text: str, expected: int, what: str) -> list[str]:
    parts = text.split("\t")
    if len(parts) != expected:
        raise InputError(
            path, f"expected {expected} tab-separated columns ({what}), found {len(parts)}", lineno
        )
    return parts


RELEVANCE_RANGE = (-(2**31), 2**31 - 1)
"""Relevance labels are stored as int32."""


def relevance_label(path: PathLike, lineno: int, value: str) -> int:
    try:
        rel = int(value)
    except ValueError:
        raise InputError(path, f"relevance {value!r} is not an integer", lineno) from None
    if not RELEVANCE_RANGE[0] <= rel <= RELEVANCE_RANGE[1]:
        raise InputError(path, f"relevance {value!r} is outside the int32 range of a relevance label", lineno)
    return rel


_WHITESPACE = re.compile(r"\s")


def check_id(path: PathLike, lineno: int, value: str, what: str) -> None:
    """An id must be non-empty and free of whitespace: ids travel through whitespace-separated TREC
    files (Anserini's runs, trec_eval's qrels), and one with a space, tab or newline in it could not
    come back the same."""
    if not value.strip():
        raise InputError(path, f"empty {what} id", lineno)
    if _WHITESPACE.search(value):
        raise InputError(path, f"{what} id {value!r} contains whitespace, which TREC run and qrels files "
                               f"cannot carry", lineno)


def read_qrels(path: PathLike) -> list[tuple[str, str, int, int]]:
    """Read qrels -> ``[(qid, pid, relevance, line)]``; the first line fixes the layout.

    4 fields: MS MARCO ``qid 0 pid 1`` (tabs) or TREC ``qid Q0 pid rel`` (spaces); 3 fields:
    BEIR ``query-id corpus-id score`` (a header line is skipped). Graded labels, 0 included,
    are kept because metrics need them (TREC DL 0-3). A line with another column count than the
    first is an error: in a 4-column file, a line that lost its last field would otherwise read as
    ``qid pid rel`` and judge the wrong passage.
    """
    out = []
    columns = 0
    for lineno, text in iter_lines(path):
        parts = text.split("\t")
        if len(parts) not in (3, 4):
            parts = text.split()  # TREC files separate with spaces
        if len(parts) not in (3, 4):
            raise InputError(
                path, f"expected 'qid Q0 pid rel' (4 columns) or 'qid pid rel' (3), found {len(parts)} columns", lineno
            )
        if columns == 0:
            columns = len(parts)
            if columns == 3 and (parts[0], parts[1]) == ("query-id", "corpus-id"):
                continue
        elif len(parts) != columns:
            raise InputError(path, f"{len(parts)} columns where the file's first line has {columns}", lineno)
        if columns == 4:
            qid, _, pid, rel = parts
        else:
            qid, pid, rel = parts
        check_id(path, lineno, qid, "query")
        check_id(path, lineno, pid, "passage")
        out.append((qid, pid, relevance_label(path, lineno, rel.strip()), lineno))
    return out
