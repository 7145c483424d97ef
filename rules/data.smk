# Stage 1: raw data (demo / BEIR / MS MARCO / NQ) -> canonical Parquet artifacts.
#
# A read dataset is prepared by one job for the corpus and one per split: adding an evaluation
# split, or editing one split's topics or qrels, rewrites only that split, not the corpus that
# every model downstream was trained on. The generated demo is written whole by one job.

if DATASET_FORMAT == "demo":

    rule prepare_data:
        input:
            code=core("data.py", "demo.py"),
        output:
            corpus=corpus_path(),
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

else:

    rule prepare_corpus:
        input:
            raw=corpus_source_inputs,
            code=core("data.py"),
        output:
            corpus=corpus_path(),
            summary=out("data", "corpus.summary.json"),
        params:
            dataset=corpus_source_spec(),
        threads: 1
        resources:
            mem_mb=4000,
            runtime=240,
        log:
            log_path("prepare_corpus"),
        benchmark:
            bench_path("prepare_corpus")
        conda:
            "../envs/cpu.yaml"
        script:
            "../workflow_scripts/prepare_corpus.py"

    rule prepare_split:
        input:
            raw=split_source_inputs,
            corpus=corpus_path(),
            code=core("data.py"),
        output:
            queries=out("data", "queries", "{split}.parquet"),
            qrels=out("data", "qrels", "{split}.parquet"),
            answers=out("data", "answers", "{split}.parquet"),
            summary=out("data", "{split}.summary.json"),
        params:
            dataset=lambda wc: split_source_spec(wc.split),
        threads: 1
        resources:
            mem_mb=4000,
            runtime=60,
        log:
            log_path("prepare_split_{split}"),
        benchmark:
            bench_path("prepare_split_{split}")
        conda:
            "../envs/cpu.yaml"
        script:
            "../workflow_scripts/prepare_split.py"
