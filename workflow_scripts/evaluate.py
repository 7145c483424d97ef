"""Adapter: a system's run on a split -> metrics JSON."""
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.io import write_json  # noqa: E402
from simlm_core.metrics import evaluate_split  # noqa: E402

inp, p, wc = snakemake.input, snakemake.params, snakemake.wildcards  # noqa: F821
result = evaluate_split(
    inp.run,
    qrels_path=inp.qrels,
    answers_path=inp.answers,
    corpus_path=inp.corpus,
    measures=p.measures,  # null in the config: the dataset format's defaults
    answer_ks=tuple(p.answer_ks),
    dataset_format=p.dataset_format,
    split=wc.split,
)
write_json({"system": wc.any_system, "split": wc.split, **result}, snakemake.output.metrics)  # noqa: F821
print(result)
