# Stage 2: Lucene BM25 (Anserini, the field's reference implementation) and round-1 negatives.


rule bm25_index:
    input:
        corpus=out("data", "corpus.parquet"),
        code=core("bm25.py"),
    output:
        directory(out("bm25", "index")),
    params:
        heap=lambda wc, threads: config["bm25"]["heap"],  # (a function of threads: not a rerun trigger)
    threads: config["bm25"]["threads"]
    resources:
        mem_mb=bm25_mem_mb(),
        runtime=360,
    log:
        log_path("bm25_index"),
    benchmark:
        bench_path("bm25_index")
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/bm25_index.py"


rule bm25_search:
    input:
        index=out("bm25", "index"),
        queries=out("data", "queries", "{split}.parquet"),
        code=core("bm25.py"),
    output:
        run=out("bm25", "runs", "{split}.parquet"),
    params:
        k1=config["bm25"]["k1"],
        b=config["bm25"]["b"],
        # The training split is searched only for negatives: no deeper than mining needs.
        hits=lambda wc: run_depth(wc.split, config["bm25"]["hits"], config["bm25"]["negatives"]["top_k"]),
        heap=lambda wc, threads: config["bm25"]["heap"],  # (a function of threads: not a rerun trigger)
        remove_query=config["bm25"]["remove_query"],
    threads: config["bm25"]["threads"]
    resources:
        mem_mb=bm25_mem_mb(),
        runtime=360,
    log:
        log_path("bm25_search_{split}"),
    benchmark:
        bench_path("bm25_search_{split}")
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/bm25_search.py"


rule bm25_negatives:
    input:
        run=out("bm25", "runs", f"{TRAIN_SPLIT}.parquet"),
        qrels=out("data", "qrels", f"{TRAIN_SPLIT}.parquet"),
        code=core("drivers/mine_negatives.py"),
    output:
        negatives=out("negatives", "bm25.parquet"),
        stats=out("negatives", "bm25.stats.json"),
    params:
        mining=config["bm25"]["negatives"],
        seed=SEED,
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    log:
        log_path("bm25_negatives"),
    benchmark:
        bench_path("bm25_negatives")
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/mine_negatives.py"
