# Stages 4-5 and 7: biencoder training (round 1, optional round 2, distilled), sharded corpus
# encoding, FAISS index and dense search. One generic encode/index/search path serves every
# dense system.


rule export_zeroshot:
    """System `zeroshot`: the initial encoder as it is (no fine-tuning), as a baseline row."""
    input:
        init=local_model_inputs(base_encoder()),
        code=core("modeling/biencoder.py"),
    output:
        directory(checkpoint_dir("zeroshot")),
    params:
        # a hub id or a folder (then also the `init` input); wildcards only, so reruns compare it
        encoder=lambda wc: base_encoder(),
        pooling=config["retriever"]["pooling"],
        normalize=config["retriever"]["normalize"],
        temperature=config["retriever"]["temperature"],
        passage_format=config["retriever"]["train"].get("passage_format", "pair"),
        q_max_len=config["encode"]["q_max_len"],
        p_max_len=config["encode"]["p_max_len"],
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        log_path("export_zeroshot"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/export_zeroshot.py"


ruleorder: export_zeroshot > train_dense


rule train_dense:
    """Contrastive (in-batch + hard negatives) or distillation training of a biencoder."""
    wildcard_constraints:
        system="|".join(s for s in DENSE_SYSTEMS if s != "zeroshot"),
    input:
        unpack(train_dense_inputs),
    output:
        directory(checkpoint_dir("{system}")),
    params:
        runtime=runtime_args(dense_train_section),
        launcher=launcher,
        args=train_dense_args,
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["train_runtime_min"],
        gpu=dense_system_gpus,
    log:
        log_path("train_{system}"),
    benchmark:
        bench_path("train_{system}")
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.launcher} -m simlm_core.drivers.train_biencoder --args-json {params.args:q} --runtime-json {params.runtime:q} > {log} 2>&1"


rule encode_shard:
    """One of `encode.shards` independent corpus-encoding jobs (scatter)."""
    input:
        model=checkpoint_dir("{system}"),
        corpus=corpus_path(),
        code=core("drivers/encode_corpus.py"),
    output:
        embeddings=embedding_shard_path("{system}", "{shard}", ".npy"),
        ids=embedding_shard_path("{system}", "{shard}", ".ids.parquet"),
    params:
        gpus=gpu_claim,
        args=lambda wc: as_json(
            {
                "model_dir": checkpoint_dir(wc.system),
                "corpus_path": corpus_path(),
                "shard_index": int(wc.shard),
                "num_shards": config["encode"]["shards"],
                "out_embeddings": embedding_shard_path(wc.system, wc.shard, ".npy"),
                "out_ids": embedding_shard_path(wc.system, wc.shard, ".ids.parquet"),
                "batch_size": config["encode"]["batch_size"],
                "max_len": config["encode"]["p_max_len"],
                "compile": config["encode"]["compile"],
                "packed": None if config["encode"]["packed"] == "auto" else config["encode"]["packed"],
                "gelu_epilogue": None if config["encode"]["gelu_epilogue"] == "auto" else config["encode"]["gelu_epilogue"],
            }
        ),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=240,
        gpu=config["resources"]["encode_gpus"],
    log:
        log_path("encode_{system}_shard-{shard}"),
    benchmark:
        bench_path("encode_{system}_shard-{shard}")
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.gpus}python -m simlm_core.drivers.encode_corpus --args-json {params.args:q} > {log} 2>&1"


rule build_index:
    """Gather the shards into one FAISS inner-product index."""
    input:
        embeddings=embedding_shards("{system}", ".npy"),
        ids=embedding_shards("{system}", ".ids.parquet"),
        code=core("index.py", "drivers/build_index.py"),
    output:
        index=index_path("{system}", ".faiss"),
        ids=index_path("{system}", ".ids.parquet"),
    params:
        args=lambda wc: as_json(
            {
                "embedding_paths": embedding_shards(wc.system, ".npy"),
                "ids_paths": embedding_shards(wc.system, ".ids.parquet"),
                "index_path": index_path(wc.system, ".faiss"),
                "ids_out_path": index_path(wc.system, ".ids.parquet"),
                "index_type": config["index"]["type"],
            }
        ),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=240,
    log:
        log_path("build_index_{system}"),
    benchmark:
        bench_path("build_index_{system}")
    conda:
        "../envs/cpu.yaml"
    shell:
        "python -m simlm_core.drivers.build_index --args-json {params.args:q} > {log} 2>&1"


rule dense_search:
    """Encode a split's queries and search the index: a run Parquet like BM25's."""
    input:
        model=checkpoint_dir("{system}"),
        index=index_path("{system}", ".faiss"),
        ids=index_path("{system}", ".ids.parquet"),
        queries=queries_path("{split}"),
        code=core("encode.py", "index.py", "gpu_slots.py"),  # what workflow_scripts/dense_search.py imports
    output:
        run=run_path("{system}", "{split}"),
    params:
        top_k=lambda wc: run_depth(wc.split, config["index"]["top_k"], config["mining"]["top_k"]),
        q_max_len=config["encode"]["q_max_len"],
        batch_size=config["encode"]["batch_size"],
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=120,
        gpu=config["resources"]["encode_gpus"],
    log:
        log_path("dense_search_{system}_{split}"),
    benchmark:
        bench_path("dense_search_{system}_{split}")
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/dense_search.py"
