"""Train the cross-encoder re-ranker.

    python -m simlm_core.drivers.train_reranker --args-json '{"model_name_or_path": ..., "corpus_path": ...,
        "queries_path": ..., "negatives_path": ..., "output_dir": ..., "work_dir": ...}'
    torchrun --nproc_per_node 8 -m simlm_core.drivers.train_reranker --args-file reranker.json

Keys: the fields of simlm_core.reranker_training.RerankerTrainArgs (TrainConfig fields included).
A rerun after a kill resumes from the last checkpoint in work_dir. Prints the result as JSON.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from simlm_core.cli import parse_dataclass_cli
from simlm_core.reranker_training import RerankerTrainArgs, train_reranker
from simlm_core.training import is_main_process


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_dataclass_cli(RerankerTrainArgs, argv, description=__doc__)
    result = train_reranker(args)
    if is_main_process():
        print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
