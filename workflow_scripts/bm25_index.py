"""Adapter: corpus Parquet -> Anserini Lucene index."""
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.bm25 import build_index  # noqa: E402

stats = build_index(snakemake.input.corpus, snakemake.output[0], threads=snakemake.threads,  # noqa: F821
                    heap=snakemake.params.heap)  # noqa: F821
print(stats)
