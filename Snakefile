# simlm-pipeline: SimLM pre-training and its full dense-retrieval recipe as one DAG.
# Stages (rules/): data -> bm25 -> pretrain -> retriever (round 1) -> negatives (mining)
#                  -> reranker -> distillation -> evaluate -> report
import os

from snakemake.utils import min_version, validate

min_version("8.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


from simlm_core.config_check import check_config

# One-line error naming the bad key first; then Snakemake's validation (fills schema defaults).
check_config(config, workflow.source_path("schemas/config.schema.yaml"))
validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/bm25.smk"
include: "rules/pretrain.smk"
include: "rules/retriever.smk"
include: "rules/negatives.smk"
include: "rules/reranker.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        report_outputs(),
    default_target: True
