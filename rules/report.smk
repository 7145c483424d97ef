# The report: one table over all systems and splits (like the paper's Table 6), recall curves,
# and each stage's cost from Snakemake's benchmark files.


rule report:
    input:
        metrics=metric_files(),
        runs=expand(out("{system}", "runs", "{split}.parquet"), system=enabled_systems(), split=EVAL_SPLITS),
        qrels=expand(out("data", "qrels", "{split}.parquet"), split=EVAL_SPLITS),
        code=core("report.py"),
    output:
        html=report(out("report", "report.html"), caption="../report/report.rst", category="Report"),
        md=out("report", "report.md"),
        csv=out("report", "metrics.csv"),
    params:
        systems=enabled_systems(),
        splits=EVAL_SPLITS,
        title=config["report"]["title"],
        reference=config["report"]["reference"],
        benchmarks_dir=out("benchmarks"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        log_path("report"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/report.py"
