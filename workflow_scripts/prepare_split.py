"""Adapter: one split of the dataset -> simlm_core.data.prepare_split -> queries/qrels/answers Parquet."""
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.data import prepare_split  # noqa: E402
from simlm_core.io import write_json  # noqa: E402

out_dir = Path(snakemake.output.queries).parent.parent  # noqa: F821
summary = prepare_split(snakemake.params.dataset, snakemake.wildcards.split,  # noqa: F821
                        snakemake.input.corpus, out_dir)  # noqa: F821
write_json(summary, snakemake.output.summary)  # noqa: F821
