"""Build the offline starting encoder: a WordPiece vocabulary learned on the corpus (or an existing
tokenizer) and a randomly initialised BERT with an MLM head, saved as a plain HF folder.

``python -m simlm_core.drivers.init_model --args-json '{"corpus_path": "...", "out_dir": "..."}'``
"""
from __future__ import annotations

import dataclasses
import json
import sys

from simlm_core.cli import parse_dataclass_cli


@dataclasses.dataclass
class InitModelArgs:
    """A small random BERT (+ tokenizer) for offline runs."""

    out_dir: str
    corpus_path: str | None = None
    tokenizer: str = "train"
    """"train" learns a WordPiece vocabulary on the corpus; otherwise a tokenizer folder or hub id."""
    vocab_size: int = 8000
    lowercase: bool = True
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    dropout: float = 0.1
    """BERT's hidden and attention dropout in the saved config (inherited by every later stage)."""
    seed: int = 0


def main(argv: list[str] | None = None) -> str:
    from simlm_core.modeling.scratch import init_model

    args = parse_dataclass_cli(InitModelArgs, argv)
    path = init_model(**dataclasses.asdict(args))
    print(json.dumps({"out_dir": str(path)}))
    return str(path)


if __name__ == "__main__":
    main(sys.argv[1:])
