# Stage 3: offline initial models (demo) and SimLM pre-training (replaced language modelling).


rule init_model:
    """A small random BERT (+ WordPiece vocabulary learned on the corpus) for offline runs."""
    input:
        corpus=corpus_path(),
        code=core("drivers/init_model.py"),
    output:
        directory(scratch_model_dir()),
    params:
        args=lambda wc: as_json(
            {
                **config["models"]["scratch"],
                "corpus_path": corpus_path(),
                "out_dir": scratch_model_dir(),
                "seed": SEED,
            }
        ),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        log_path("init_model"),
    benchmark:
        bench_path("init_model")
    conda:
        "../envs/cpu.yaml"
    shell:
        "python -m simlm_core.drivers.init_model --args-json {params.args:q} > {log} 2>&1"


rule train_generator:
    """The frozen RLM generator trained here when no hub MLM is reachable (offline stand-in for
    google/electra-base-generator)."""
    input:
        corpus=corpus_path(),
        tokenizer=local_model_inputs(base_encoder()),
        code=core("drivers/train_generator.py"),
    output:
        directory(generator_dir()),
    params:
        runtime=runtime_args(config["pretrain"]["generator_train"]),
        gpus=gpu_claim,
        args=lambda wc: as_json(
            train_args(
                "train_generator",
                config["pretrain"]["generator_train"],
                corpus_path=corpus_path(),
                tokenizer_path=base_encoder(),
                output_dir=generator_dir(),
            )
        ),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["train_runtime_min"],
        gpu=config["resources"]["train_gpus"],
    log:
        log_path("train_generator"),
    benchmark:
        bench_path("train_generator")
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.gpus}python -m simlm_core.drivers.train_generator --args-json {params.args:q} --runtime-json {params.runtime:q} > {log} 2>&1"


rule pretrain:
    """SimLM: encoder + 2-layer decoder reading only the [CLS] bottleneck, RLM loss."""
    input:
        corpus=corpus_path(),
        encoder=local_model_inputs(base_encoder()),
        generator=local_model_inputs(generator_value()),
        code=core("drivers/pretrain.py"),
    output:
        directory(pretrain_checkpoint()),
    params:
        runtime=runtime_args(config["pretrain"]["train"]),
        launcher=launcher,
        args=lambda wc: as_json(
            train_args(
                "pretrain",
                config["pretrain"]["train"],
                gpus=stage_gpus("pretrain"),
                model_name_or_path=base_encoder(),
                generator=generator_value(),
                corpus_path=corpus_path(),
                output_dir=pretrain_checkpoint(),
            )
        ),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["train_runtime_min"],
        gpu=stage_gpus("pretrain"),
    log:
        log_path("pretrain"),
    benchmark:
        bench_path("pretrain")
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.launcher} -m simlm_core.drivers.pretrain --args-json {params.args:q} --runtime-json {params.runtime:q} > {log} 2>&1"
