# Stage 1: raw data (demo / BEIR / MS MARCO / NQ) -> canonical Parquet artifacts.


rule prepare_data:
    input:
        raw=dataset_inputs,
        code=core("data.py", "demo.py"),
    output:
        corpus=out("data", "corpus.parquet"),
        queries=expand(out("data", "queries", "{split}.parquet"), split=ALL_SPLITS),
        qrels=expand(out("data", "qrels", "{split}.parquet"), split=ALL_SPLITS),
        answers=expand(out("data", "answers", "{split}.parquet"), split=ALL_SPLITS),
        summary=out("data", "summary.json"),
    params:
        dataset=config["dataset"],
        splits=ALL_SPLITS,
        seed=SEED,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    log:
        log_path("prepare_data"),
    benchmark:
        bench_path("prepare_data")
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/prepare_data.py"
