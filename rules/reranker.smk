# Stage 6: cross-encoder re-ranker on mined negatives; re-ranking as a system; teacher scores for
# distillation (sharded like encoding).

RERANKER_CODE = core("drivers/train_reranker.py")


rule train_reranker:
    input:
        corpus=corpus_path(),
        queries=queries_path(TRAIN_SPLIT),
        negatives=negatives_path("retriever1"),
        init=local_model_inputs(reranker_init()),
        code=RERANKER_CODE,
    output:
        directory(checkpoint_dir("reranker")),
    params:
        runtime=runtime_args(config["reranker"]["train"]),
        launcher=launcher,
        args=lambda wc: as_json(
            train_args(
                "train_reranker",
                config["reranker"]["train"],
                gpus=stage_gpus("reranker"),
                model_name_or_path=reranker_init(),
                corpus_path=corpus_path(),
                queries_path=queries_path(TRAIN_SPLIT),
                negatives_path=negatives_path("retriever1"),
                output_dir=checkpoint_dir("reranker"),
            )
        ),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["train_runtime_min"],
        gpu=stage_gpus("reranker"),
    log:
        log_path("train_reranker"),
    benchmark:
        bench_path("train_reranker")
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.launcher} -m simlm_core.drivers.train_reranker --args-json {params.args:q} --runtime-json {params.runtime:q} > {log} 2>&1"


rule rerank:
    """System `reranker`: the cross-encoder re-scores retriever1's top-k."""
    input:
        model=checkpoint_dir("reranker"),
        corpus=corpus_path(),
        queries=queries_path("{split}"),
        run=run_path("retriever1", "{split}"),
        code=core("drivers/rerank.py"),
    output:
        run=run_path("reranker", "{split}"),
    params:
        gpus=gpu_claim,
        args=lambda wc: as_json(
            {
                "model_dir": checkpoint_dir("reranker"),
                "corpus_path": corpus_path(),
                "queries_path": queries_path(wc.split),
                "run_path": run_path("retriever1", wc.split),
                "out_run_path": run_path("reranker", wc.split),
                "top_k": config["reranker"]["rerank_top_k"],
                "batch_size": config["reranker"]["batch_size"],
                "max_len": config["reranker"]["max_len"],
                "packed": None if config["reranker"]["packed"] == "auto" else config["reranker"]["packed"],
            }
        ),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=240,
        gpu=config["resources"]["encode_gpus"],
    log:
        log_path("rerank_{split}"),
    benchmark:
        bench_path("rerank_{split}")
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.gpus}python -m simlm_core.drivers.rerank --args-json {params.args:q} > {log} 2>&1"


rule score_teacher_shard:
    """Re-ranker scores of each training query's candidates (positives + mined negatives)."""
    input:
        model=checkpoint_dir("reranker"),
        corpus=corpus_path(),
        queries=queries_path(TRAIN_SPLIT),
        negatives=negatives_path("retriever1"),
        code=core("drivers/score_teacher.py"),
    output:
        scores=teacher_shard_path("{shard}"),
    params:
        gpus=gpu_claim,
        args=lambda wc: as_json(
            {
                "model_dir": checkpoint_dir("reranker"),
                "corpus_path": corpus_path(),
                "queries_path": queries_path(TRAIN_SPLIT),
                "negatives_path": negatives_path("retriever1"),
                "out_path": teacher_shard_path(wc.shard),
                "num_negatives": config["reranker"]["teacher_negatives"],
                "shard_index": int(wc.shard),
                "num_shards": config["reranker"]["teacher_shards"],
                "batch_size": config["reranker"]["batch_size"],
                "max_len": config["reranker"]["max_len"],
                "packed": None if config["reranker"]["packed"] == "auto" else config["reranker"]["packed"],
            }
        ),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=240,
        gpu=config["resources"]["encode_gpus"],
    log:
        log_path("score_teacher_shard-{shard}"),
    benchmark:
        bench_path("score_teacher_shard-{shard}")
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.gpus}python -m simlm_core.drivers.score_teacher --args-json {params.args:q} > {log} 2>&1"


rule merge_teacher_scores:
    input:
        shards=[teacher_shard_path(s) for s in range(config["reranker"]["teacher_shards"])],
        code=core("rerank.py"),
    output:
        scores=teacher_scores_path(),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        log_path("merge_teacher_scores"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/merge_teacher_scores.py"
