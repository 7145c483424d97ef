"""Mine hard negatives from a run: top-k minus labelled positives, per query with a positive.

``python -m simlm_core.drivers.mine_negatives --args-json '{"run_path": ..., "qrels_path": ...,
"out_path": ...}'``
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from simlm_core.cli import parse_dataclass_cli
from simlm_core.io import InputError, write_json
from simlm_core.mining import mine_negatives, mine_negatives_parquet, write_negatives


@dataclasses.dataclass
class MineNegativesArgs:
    """Hard negatives = a run's top_k per query minus its labelled positives (DESIGN.md §4)."""

    run_path: str
    qrels_path: str
    out_path: str
    stats_path: str | None = None  # optional JSON of the mining statistics
    queries_path: str | None = None  # optional Parquet with a qid column: mine only for these
    top_k: int = 200
    window_start: int = 0  # 0-based positions over the top_k list, before positives are removed
    window_end: int | None = None
    num_negatives: int | None = None
    min_relevance: int = 1
    seed: int = 42
    # Read the run in parts of about this many rows (each query's rows kept together): bounded
    # memory, same result. null: read the whole run at once (any row order accepted).
    part_rows: int | None = 20_000_000


def _read_columns(path: str, columns: list[str]) -> pa.Table:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(path, f"cannot read as Parquet: {exc}") from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; has {schema.names}")
    return pq.read_table(path, columns=columns)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return mine_files(parse_dataclass_cli(MineNegativesArgs, argv))


def mine_files(args: MineNegativesArgs) -> dict:
    """Mine ``args.run_path`` into ``args.out_path`` (+ ``stats_path``); returns the statistics.
    The workflow's BM25 and dense mining rules call this too, so they stream as the CLI does."""
    # Arrow tables straight into the miner: no pandas string objects for a 100M-row run.
    qrels = _read_columns(args.qrels_path, ["qid", "pid", "relevance"])
    queries = None
    if args.queries_path:
        queries = _read_columns(args.queries_path, ["qid"]).column("qid").to_pylist()
    kwargs = dict(
        top_k=args.top_k,
        window_start=args.window_start,
        window_end=args.window_end,
        num_negatives=args.num_negatives,
        min_relevance=args.min_relevance,
        seed=args.seed,
        queries=queries,
    )
    if args.part_rows:
        _read_columns(args.run_path, [])  # a readable Parquet file, or an error naming it
        table, stats = mine_negatives_parquet(args.run_path, qrels, part_rows=args.part_rows, **kwargs)
    else:
        table, stats = mine_negatives(_read_columns(args.run_path, ["qid", "pid", "rank"]), qrels, **kwargs)
    stats["inputs"] = {"run_path": args.run_path, "qrels_path": args.qrels_path}
    write_negatives(table, args.out_path)
    if args.stats_path:
        write_json(stats, args.stats_path)
    print(json.dumps(stats, indent=2), file=sys.stderr)
    if stats["queries_missing_from_run"] or stats["queries_without_negatives"]:
        logging.warning(
            "%d labelled queries missing from the run, %d without any negative left (dropped, counted)",
            stats["queries_missing_from_run"], stats["queries_without_negatives"],
        )
    return stats


if __name__ == "__main__":
    main()
