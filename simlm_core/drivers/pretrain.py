"""SimLM pre-training (replaced language modelling through the [CLS] bottleneck).

``python -m simlm_core.drivers.pretrain --args-json '{"corpus_path": ..., "output_dir": ..., "work_dir": ..., ...}'``
or, data-parallel, ``torchrun --nproc_per_node N -m simlm_core.drivers.pretrain --args-json ...``.
Keys: the fields of :class:`simlm_core.pretraining.PretrainArgs` (unknown keys are an error).
A killed run restarts from the last checkpoint in ``work_dir``.
"""
from __future__ import annotations

import json
import logging
import sys

from simlm_core.cli import parse_dataclass_cli
from simlm_core.pretraining import PretrainArgs, pretrain


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_dataclass_cli(PretrainArgs, argv)
    metrics = pretrain(args)
    print(json.dumps(metrics, default=str))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
