"""Re-rank the top-k of a first-stage run with a trained cross-encoder.

    python -m simlm_core.drivers.rerank --args-json '{"model_dir": ..., "corpus_path": ..., "queries_path": ...,
        "run_path": ..., "out_run_path": ..., "top_k": 200}'

Keys: the fields of simlm_core.rerank.RerankArgs. Prints the result (counts, pairs/s) as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Sequence

from simlm_core.cli import parse_dataclass_cli
from simlm_core.rerank import RerankArgs, rerank_run


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_dataclass_cli(RerankArgs, argv, description=__doc__)
    result = rerank_run(**dataclasses.asdict(args))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
