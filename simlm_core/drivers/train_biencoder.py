"""Train the dense retriever.

    python -m simlm_core.drivers.train_biencoder --args-json '{"model_name_or_path": ..., ...}'
    torchrun --nproc_per_node 8 -m simlm_core.drivers.train_biencoder --args-file args.json

Keys: the fields of :class:`simlm_core.biencoder_training.BiencoderTrainArgs` (TrainConfig's
shared optimisation fields included). Prints the result as one JSON line on rank 0.
"""
from __future__ import annotations

import json
import sys

from simlm_core.biencoder_training import BiencoderTrainArgs, train_biencoder
from simlm_core.cli import parse_dataclass_cli
from simlm_core.training import is_main_process


def main(argv: list[str] | None = None) -> int:
    args = parse_dataclass_cli(BiencoderTrainArgs, argv, description=__doc__)
    result = train_biencoder(args)
    if is_main_process():
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
