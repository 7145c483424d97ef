"""Adapter: config dataset section -> simlm_core.data.prepare_dataset -> canonical Parquet."""
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.data import dataset_spec, prepare_dataset  # noqa: E402
from simlm_core.io import write_json  # noqa: E402

spec = dataset_spec(snakemake.params.dataset, snakemake.params.splits, snakemake.params.seed)  # noqa: F821
summary = prepare_dataset(spec, Path(snakemake.output.corpus).parent)  # noqa: F821
write_json(summary, snakemake.output.summary)  # noqa: F821
