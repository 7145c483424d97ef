"""Encode one corpus shard with a trained retriever.

    python -m simlm_core.drivers.encode_corpus --args-json '{"model_dir": "results/demo/retriever1/checkpoint",
        "corpus_path": "results/demo/data/corpus.parquet", "shard_index": 0, "num_shards": 4,
        "out_embeddings": ".../shard-0.npy", "out_ids": ".../shard-0.parquet"}'

Keys: the fields of :class:`EncodeCorpusArgs` (the parameters of
:func:`simlm_core.encode.encode_corpus_shard`). Prints the shard summary as one JSON line.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

from simlm_core.cli import parse_dataclass_cli
from simlm_core.encode import encode_corpus_shard


@dataclass
class EncodeCorpusArgs:
    model_dir: str
    corpus_path: str
    shard_index: int
    num_shards: int
    out_embeddings: str
    out_ids: str
    batch_size: int = 256
    max_len: int | None = None
    """None: the model's p_max_len from biencoder_config.json (144)."""
    device: str = "auto"
    bf16: bool = True
    chunk_rows: int = 50_000
    pooling: str | None = None
    """None: from biencoder_config.json; give it (with normalize) for a raw HF model."""
    normalize: bool | None = None
    passage_format: str | None = None
    show_progress: bool = True
    compile: bool = False
    """torch.compile the encoder (GPU; widths padded to x8)."""
    packed: bool | None = None
    """Encode padding-free (each batch's tokens in one row; BERT and ELECTRA encoders). None: where possible."""
    gelu_epilogue: bool | None = None
    """Packed only: the feed-forward GELU (tanh form) in the GEMM epilogue (GPU speed; not bit-exact).
    None: where the packed encoder runs in bf16 on a GPU (the forms differ below bf16's resolution)."""


def main(argv: list[str] | None = None) -> int:
    args = parse_dataclass_cli(EncodeCorpusArgs, argv, description=__doc__)
    summary = encode_corpus_shard(**dataclasses.asdict(args))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
