"""Adapter: a training-split run + qrels -> negatives table (BM25 or dense mining), streamed in
parts of the run (bounded memory: MS MARCO's 100M-row train run would take ~12 GB at once)."""
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.drivers.mine_negatives import MineNegativesArgs, mine_files  # noqa: E402

m = snakemake.params.mining  # noqa: F821
mine_files(MineNegativesArgs(
    run_path=snakemake.input.run,  # noqa: F821
    qrels_path=snakemake.input.qrels,  # noqa: F821
    out_path=snakemake.output.negatives,  # noqa: F821
    stats_path=snakemake.output.stats,  # noqa: F821
    top_k=m["top_k"],
    window_start=m.get("window_start", 0),
    window_end=m.get("window_end"),
    num_negatives=m.get("num_negatives"),
    min_relevance=m.get("min_relevance", 1),
    seed=snakemake.params.seed,  # noqa: F821
))
