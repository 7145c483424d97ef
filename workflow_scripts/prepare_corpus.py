"""Adapter: the dataset's corpus -> simlm_core.data.prepare_corpus -> corpus.parquet."""
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.data import prepare_corpus  # noqa: E402
from simlm_core.io import write_json  # noqa: E402

summary = prepare_corpus(snakemake.params.dataset, snakemake.output.corpus)  # noqa: F821
write_json(summary, snakemake.output.summary)  # noqa: F821
