"""Train the small MLM generator used (frozen) by SimLM pre-training when no hub generator is
reachable: the offline stand-in for ``google/electra-base-generator``.

``python -m simlm_core.drivers.train_generator --args-json '{"corpus_path": ..., "tokenizer_path": ..., "output_dir": ..., "work_dir": ...}'``
Keys: the fields of :class:`simlm_core.pretraining.GeneratorArgs`.
"""
from __future__ import annotations

import json
import logging
import sys

from simlm_core.cli import parse_dataclass_cli
from simlm_core.pretraining import GeneratorArgs, train_generator


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_dataclass_cli(GeneratorArgs, argv)
    metrics = train_generator(args)
    print(json.dumps(metrics, default=str))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
