"""Build the FAISS index of one retriever from its encode shards.

``python -m simlm_core.drivers.build_index --args-json '{"embedding_paths": [...], ...}'``
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys

from simlm_core.cli import parse_dataclass_cli
from simlm_core.index import build_index
from simlm_core.io import write_json


@dataclasses.dataclass
class BuildIndexArgs:
    """Build a FAISS inner-product index over fp16 embedding shards (+ their ids Parquets)."""

    embedding_paths: list[str]
    ids_paths: list[str]
    index_path: str
    ids_out_path: str
    index_type: str = "flat"  # flat | flat_fp16 | hnsw | ivf
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 256
    ivf_nlist: int | None = None  # default 4 * sqrt(N)
    ivf_nprobe: int = 64
    train_sample: int | None = None  # IVF training vectors; default min(N, 64 * nlist)
    recall_sample: int = 1000  # stored vectors used as queries to measure approximate recall
    recall_k: int = 100
    chunk_size: int = 65536
    seed: int = 42
    use_gpu: str | bool = "auto"  # IVF k-means on GPU when a faiss GPU build sees one
    stats_path: str | None = None  # optional JSON of the build statistics


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_dataclass_cli(BuildIndexArgs, argv)
    kwargs = dataclasses.asdict(args)
    stats_path = kwargs.pop("stats_path")
    stats = build_index(**kwargs)
    print(json.dumps(stats, indent=2), file=sys.stderr)
    if stats_path:
        write_json(stats, stats_path)
    return stats


if __name__ == "__main__":
    main()
