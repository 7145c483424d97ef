# Stage 5b: hard negatives mined with the round-1 retriever (for the re-ranker, retriever2 and
# distillation).


rule mine_negatives:
    input:
        run=out("retriever1", "runs", f"{TRAIN_SPLIT}.parquet"),
        qrels=out("data", "qrels", f"{TRAIN_SPLIT}.parquet"),
        code=core("drivers/mine_negatives.py"),
    output:
        negatives=out("negatives", "retriever1.parquet"),
        stats=out("negatives", "retriever1.stats.json"),
    params:
        mining=config["mining"],
        seed=SEED,
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    log:
        log_path("mine_negatives"),
    benchmark:
        bench_path("mine_negatives")
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/mine_negatives.py"
