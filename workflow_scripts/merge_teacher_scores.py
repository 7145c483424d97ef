"""Adapter: gather the teacher-score shards into one Parquet."""
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.rerank import merge_score_shards  # noqa: E402

print(merge_score_shards(list(snakemake.input.shards), snakemake.output.scores))  # noqa: F821
