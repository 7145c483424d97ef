"""Re-ranker (teacher) scores for distillation, one contiguous shard of training queries per job.

    python -m simlm_core.drivers.score_teacher --args-json '{"model_dir": ..., "corpus_path": ...,
        "queries_path": ..., "negatives_path": ..., "out_path": "scores/shard-0.parquet",
        "num_negatives": 23, "shard_index": 0, "num_shards": 4}'
    python -m simlm_core.drivers.score_teacher merge --out scores/train.parquet scores/shard-*.parquet

Keys: the fields of simlm_core.rerank.ScoreTeacherArgs. `merge` concatenates shards in the order
given (pass them in shard order). Prints the result as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from simlm_core.cli import parse_dataclass_cli
from simlm_core.rerank import ScoreTeacherArgs, merge_score_shards, score_teacher


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        parser = argparse.ArgumentParser(prog="score_teacher merge", description="merge teacher-score shards")
        parser.add_argument("--out", required=True, help="merged Parquet file")
        parser.add_argument("shards", nargs="+", help="shard Parquet files, in shard order")
        ns = parser.parse_args(argv[1:])
        result = merge_score_shards(ns.shards, ns.out)
    else:
        args = parse_dataclass_cli(ScoreTeacherArgs, argv, description=__doc__)
        result = score_teacher(**dataclasses.asdict(args))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
