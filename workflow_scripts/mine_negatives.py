"""Adapter: a training-split run + qrels -> negatives table (BM25 or dense mining)."""
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.io import QRELS_SCHEMA, read_run, read_table, write_json  # noqa: E402
from simlm_core.mining import mine_negatives, write_negatives  # noqa: E402

m = snakemake.params.mining  # noqa: F821
negatives, stats = mine_negatives(
    read_run(snakemake.input.run),  # noqa: F821
    read_table(snakemake.input.qrels, QRELS_SCHEMA),  # noqa: F821
    top_k=m["top_k"],
    window_start=m.get("window_start", 0),
    window_end=m.get("window_end"),
    num_negatives=m.get("num_negatives"),
    seed=snakemake.params.seed,  # noqa: F821
)
write_negatives(negatives, snakemake.output.negatives)  # noqa: F821
write_json(stats, snakemake.output.stats)  # noqa: F821
print(stats)
