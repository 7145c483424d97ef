"""SimLM pre-training (replaced language modelling through the [CLS] bottleneck).

``python -m simlm_core.drivers.pretrain --args-json '{"corpus_path": ..., "output_dir": ..., "work_dir": ..., ...}'``
or, data-parallel, ``torchrun --nproc_per_node N -m simlm_core.drivers.pretrain --args-json ...``.
Keys: the fields of :class:`simlm_core.pretraining.PretrainArgs` (unknown keys are an error).
A killed run restarts from the last checkpoint in ``work_dir``.
"""
from __future__ import annotations

import sys

from simlm_core.cli import run_training_cli
from simlm_core.pretraining import PretrainArgs, pretrain


def main(argv: list[str] | None = None) -> dict:
    return run_training_cli(PretrainArgs, pretrain, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
