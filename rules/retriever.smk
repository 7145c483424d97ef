# Stages 4-5 and 7: biencoder training (round 1, optional round 2, distilled), sharded corpus
# encoding, FAISS index and dense search. One generic encode/index/search path serves every
# dense system.

BIENCODER_CODE = core(
    "modeling/biencoder.py",
    "losses.py",
    "collators.py",
    "biencoder_training.py",
    "training.py",
    "drivers/train_biencoder.py",
)


def biencoder_args(stage, section, init, negatives, output_dir, teacher_scores=None):
    r = config["retriever"]
    return train_args(
        stage,
        {
            "pooling": r["pooling"],
            "normalize": r["normalize"],
            "temperature": r["temperature"],
            **section,
        },
        model_name_or_path=init,
        corpus_path=out("data", "corpus.parquet"),
        queries_path=out("data", "queries", f"{TRAIN_SPLIT}.parquet"),
        negatives_path=negatives,
        teacher_scores_path=teacher_scores,
        output_dir=output_dir,
    )


# Per dense system: (initial model, negatives table, teacher scores, config section).
def dense_system_spec(system):
    specs = {
        "retriever1": (pretrained_encoder(), out("negatives", "bm25.parquet"), None, "retriever"),
        "retriever1_nopretrain": (base_encoder(), out("negatives", "bm25.parquet"), None, "retriever"),
        "retriever2": (pretrained_encoder(), out("negatives", "retriever1.parquet"), None, "retriever2"),
        "retriever_distill": (
            pretrained_encoder(),
            out("negatives", "retriever1.parquet"),
            out("reranker", "scores", f"{TRAIN_SPLIT}.parquet"),
            "distill",
        ),
    }
    return specs[system]


def train_dense_inputs(wildcards):
    init, negatives, teacher, _ = dense_system_spec(wildcards.system)
    inputs = {
        "corpus": out("data", "corpus.parquet"),
        "queries": out("data", "queries", f"{TRAIN_SPLIT}.parquet"),
        "negatives": negatives,
        "init": local_model_inputs(init),
        "code": BIENCODER_CODE,
    }
    if teacher:
        inputs["teacher"] = teacher
    return inputs


def train_dense_checkpoint(system):
    return out(system, "checkpoint")


def train_dense_args(wildcards):
    """The driver's arguments. Only wildcards in, no `input`/`output`: Snakemake compares such a
    params function on reruns, so a changed hyper-parameter reruns the training (see rerun_on)."""
    init, negatives, teacher, section = dense_system_spec(wildcards.system)
    return as_json(
        biencoder_args(
            f"train_{wildcards.system}",
            config[section]["train"],
            init,
            negatives,
            train_dense_checkpoint(wildcards.system),
            teacher,
        )
    )


rule export_zeroshot:
    """System `zeroshot`: the initial encoder as it is (no fine-tuning), as a baseline row."""
    input:
        init=local_model_inputs(base_encoder()),
        code=core("modeling/biencoder.py"),
    output:
        directory(out("zeroshot", "checkpoint")),
    params:
        encoder=base_encoder(),
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
        directory(train_dense_checkpoint("{system}")),
    params:
        launcher=launcher,
        args=train_dense_args,
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["train_runtime_min"],
        gpu=config["resources"]["train_gpus"],
    log:
        log_path("train_{system}"),
    benchmark:
        bench_path("train_{system}")
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.launcher} -m simlm_core.drivers.train_biencoder --args-json {params.args:q} > {log} 2>&1"


rule encode_shard:
    """One of `encode.shards` independent corpus-encoding jobs (scatter)."""
    input:
        model=out("{system}", "checkpoint"),
        corpus=out("data", "corpus.parquet"),
        code=core("encode.py", "collators.py", "modeling/biencoder.py", "drivers/encode_corpus.py"),
    output:
        embeddings=out("{system}", "embeddings", "shard-{shard}.npy"),
        ids=out("{system}", "embeddings", "shard-{shard}.ids.parquet"),
    params:
        settings=rerun_on("encode.shards", "encode.batch_size", "encode.p_max_len"),
        args=lambda wc, input, output: as_json(
            {
                "model_dir": input.model,
                "corpus_path": input.corpus,
                "shard_index": int(wc.shard),
                "num_shards": config["encode"]["shards"],
                "out_embeddings": output.embeddings,
                "out_ids": output.ids,
                "batch_size": config["encode"]["batch_size"],
                "max_len": config["encode"]["p_max_len"],
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
        "python -m simlm_core.drivers.encode_corpus --args-json {params.args:q} > {log} 2>&1"


def embedding_shards(suffix):
    return expand(
        out("{{system}}", "embeddings", "shard-{shard}" + suffix),
        shard=range(config["encode"]["shards"]),
    )


rule build_index:
    """Gather the shards into one FAISS inner-product index."""
    input:
        embeddings=embedding_shards(".npy"),
        ids=embedding_shards(".ids.parquet"),
        code=core("index.py", "drivers/build_index.py"),
    output:
        index=out("{system}", "index.faiss"),
        ids=out("{system}", "index.ids.parquet"),
    params:
        settings=rerun_on("index.type"),
        args=lambda wc, input, output: as_json(
            {
                "embedding_paths": list(input.embeddings),
                "ids_paths": list(input.ids),
                "index_path": output.index,
                "ids_out_path": output.ids,
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
        model=out("{system}", "checkpoint"),
        index=out("{system}", "index.faiss"),
        ids=out("{system}", "index.ids.parquet"),
        queries=out("data", "queries", "{split}.parquet"),
        code=core("encode.py", "collators.py", "index.py", "modeling/biencoder.py"),
    output:
        run=out("{system}", "runs", "{split}.parquet"),
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
