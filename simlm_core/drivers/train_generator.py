"""Train the small MLM generator used (frozen) by SimLM pre-training when no hub generator is
reachable: the offline stand-in for ``google/electra-base-generator``.

``python -m simlm_core.drivers.train_generator --args-json '{"corpus_path": ..., "tokenizer_path": ..., "output_dir": ..., "work_dir": ...}'``
Keys: the fields of :class:`simlm_core.pretraining.GeneratorArgs`.
"""
from __future__ import annotations

import sys

from simlm_core.cli import run_training_cli
from simlm_core.pretraining import GeneratorArgs, train_generator


def main(argv: list[str] | None = None) -> dict:
    return run_training_cli(GeneratorArgs, train_generator, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
