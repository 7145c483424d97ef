# Stage 8: metrics per system and split (ir-measures; DPR answer matching where answers exist).


rule evaluate:
    input:
        run=system_run,
        qrels=out("data", "qrels", "{split}.parquet"),
        answers=out("data", "answers", "{split}.parquet"),
        corpus=out("data", "corpus.parquet"),
        code=core("metrics.py"),
    output:
        metrics=out("metrics", "{any_system}", "{split}.json"),
    params:
        dataset_format=config["dataset"]["format"],
        measures=config["evaluate"]["measures"],
        answer_ks=config["evaluate"]["answer_ks"],
    wildcard_constraints:
        any_system="bm25|reranker|" + "|".join(DENSE_SYSTEMS),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        log_path("evaluate_{any_system}_{split}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/evaluate.py"
