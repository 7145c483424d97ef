"""The DAG itself: config validation, dry runs of every config, and an end-to-end run of a tiny
demo with its rerun behaviour (nothing to do twice; a changed parameter or core module reruns
that stage and its dependants only)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
E2E_CONFIG = REPO / "tests" / "e2e_config.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"


def snakemake(
    workdir: Path, *args: str, check: bool = True, snakefile: Path = REPO / "Snakefile"
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table ({} when nothing is to be done)."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    jobs: dict[str, int] = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) not in ("total", "all"):  # `all` is the target rule, not a stage
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    proc = snakemake(tmp_path, "-n", "--config", "bm25={k1: 0.9, kk: 1}", check=False)
    assert proc.returncode != 0
    line = next(l for l in (proc.stdout + proc.stderr).splitlines() if "config key" in l)
    assert "'bm25'" in line and "kk" in line


@pytest.mark.parametrize("configfile, options, problem", [
    ("msmarco", "{titels: para.title.txt}", "'titels' was unexpected"),
    ("nq", "{titles: t.txt}", "'titles' was unexpected"),
    (None, "{corpus: c.tsv}", "is expected to be empty"),
])
def test_dataset_options_are_checked_per_format(tmp_path, configfile, options, problem):
    """A misspelt file option fails before any job (not at data preparation, or silently for the demo)."""
    files = ["--configfile", str(REPO / "configs" / f"{configfile}.yaml")] if configfile else []
    proc = snakemake(tmp_path, "-n", *files, "--config", f"dataset={{options: {options}}}", check=False)
    assert proc.returncode != 0
    assert "config key 'dataset.options'" in proc.stdout + proc.stderr and problem in proc.stdout + proc.stderr


def test_wrong_type_names_the_key(tmp_path):
    proc = snakemake(tmp_path, "-n", "--config", "encode={shards: many}", check=False)
    assert proc.returncode != 0
    assert "config key 'encode.shards'" in proc.stdout + proc.stderr


def test_demo_dry_run_plans_every_stage(tmp_path):
    jobs = planned_jobs(snakemake(tmp_path, "-n"))
    for rule in [
        "prepare_data", "bm25_index", "bm25_search", "bm25_negatives", "init_model",
        "train_generator", "pretrain", "train_dense", "encode_shard", "build_index",
        "dense_search", "mine_negatives", "train_reranker", "rerank", "score_teacher_shard",
        "merge_teacher_scores", "evaluate", "report",
    ]:
        assert rule in jobs, f"{rule} missing from the demo DAG: {jobs}"
    # retriever1, retriever1_nopretrain and retriever_distill are trained; 2 shards each.
    assert jobs["train_dense"] == 3
    assert jobs["encode_shard"] == 6


def test_snakemake_lint_finds_nothing(tmp_path):
    """The catalog's conventions (log and conda per rule, functions apart from rules, params that
    name files taken from inputs): `snakemake --lint` passes clean."""
    proc = snakemake(tmp_path, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr, \
        (proc.stdout + proc.stderr)[-4000:]


def rule_scripts() -> dict[str, Path]:
    """Rule name -> its ``script:`` file, read from rules/*.smk."""
    scripts = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"^\s*rule ", smk.read_text(), flags=re.M)[1:]:
            found = re.search(r"^\s+script:\s*\n\s+\"([^\"]+)\"", block, flags=re.M)
            if found:
                scripts[block.split(":", 1)[0]] = (smk.parent / found.group(1)).resolve()
    return scripts


def test_every_job_has_the_core_modules_it_runs_as_inputs(tmp_path):
    """A job's inputs hold every simlm_core file its driver (``python -m simlm_core.drivers.X``)
    or workflow script imports, directly or not, lazy imports included: editing any of them
    reruns the stage. The demo plans every rule but a read dataset's preparation, which a BEIR
    folder plans."""
    from simlm_core.code_deps import core_module_closure

    text = (lambda p: p.stdout + p.stderr)(snakemake(tmp_path, "-n", "-p"))
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        (beir / name).write_text("")
    text += (lambda p: p.stdout + p.stderr)(snakemake(tmp_path / "w", "-n", "-p", "--configfile",
                                                      str(REPO / "configs" / "beir.yaml"),
                                                      "--config", f"dataset={{path: {beir}}}"))
    scripts = rule_scripts()
    checked = set()
    for job in text.split("\nrule ")[1:]:
        rule = job.split(":", 1)[0]
        inputs = {Path(f).resolve() for f in re.search(r"^\s+input: (.*)$", job, flags=re.M).group(1).split(", ")}
        driver = re.search(r"-m (simlm_core\.drivers\.\w+)", job.split("\n\n", 1)[0])
        if driver:
            entry = REPO / (driver.group(1).replace(".", "/") + ".py")
        elif rule in scripts:
            entry = scripts[rule]
        else:
            continue
        runs = {Path(f).resolve() for f in core_module_closure([entry], REPO)} - {entry}
        missing = sorted(str(f.relative_to(REPO)) for f in runs - inputs)
        assert not missing, f"rule {rule} runs {missing} without them as inputs"
        checked.add(rule)
    assert {"prepare_data", "prepare_corpus", "prepare_split", "train_generator", "pretrain", "train_dense",
            "encode_shard", "train_reranker", "merge_teacher_scores", "evaluate", "report"} <= checked, checked


def assert_job_starts_from(proc: subprocess.CompletedProcess, rule: str, wildcards: str | None, init: str) -> None:
    """In a `-n -p` plan, the one `rule` job (with these wildcards) has `init` as an input (so it
    is built first) and passes it to its driver as model_name_or_path."""
    text = proc.stdout + proc.stderr
    jobs = [j for j in text.split(f"rule {rule}:")[1:] if wildcards is None or wildcards in j.split("\n\n", 1)[0]]
    assert len(jobs) == 1, text[-3000:]
    header, shell = jobs[0].split("\n\n", 1)[0], jobs[0][:6000]
    assert init in header.split("output:", 1)[0], header
    # the shell line quotes the JSON, so its quotes may appear escaped
    assert f'model_name_or_path\\": \\"{init}' in shell or f'model_name_or_path": "{init}' in shell, shell[:3000]


@pytest.mark.parametrize("choice, init", [
    ("pretrain", "results/demo/pretrain/checkpoint"),
    ("encoder", "results/demo/models/init"),
    ("retriever1", "results/demo/retriever1/checkpoint"),
])
def test_reranker_initialisation_choice(tmp_path, choice, init):
    proc = snakemake(tmp_path, "-n", "-p", "--config", f"models={{reranker: {choice}}}")
    assert_job_starts_from(proc, "train_reranker", None, init)


@pytest.mark.parametrize("choice, init", [
    ("pretrain", "results/demo/pretrain/checkpoint"),
    ("retriever1", "results/demo/retriever1/checkpoint"),
])
def test_distilled_retriever_initialisation_choice(tmp_path, choice, init):
    proc = snakemake(tmp_path, "-n", "-p", "--config", f"distill={{init: {choice}}}")
    assert_job_starts_from(proc, "train_dense", "system=retriever_distill", init)


def test_gpu_speed_switches_reach_the_drivers(tmp_path):
    """encode.compile and a stage's train.torch_compile end up in the driver args."""
    proc = snakemake(tmp_path, "-n", "-p", "--config", "encode={compile: true}",
                     "retriever={train: {torch_compile: true}}")
    text = (proc.stdout + proc.stderr).replace('\\"', '"')
    encode_jobs = [j for j in text.split("rule encode_shard:")[1:]]
    assert encode_jobs and all('"compile": true' in j[:6000] for j in encode_jobs)
    assert all('"packed": null' in j[:6000] and '"gelu_epilogue": null' in j[:6000] for j in encode_jobs)  # auto
    train_jobs = [j[:6000] for j in text.split("rule train_dense:")[1:] if "system=retriever1" in j.split("\n\n", 1)[0]]
    assert train_jobs and all('"torch_compile": true' in j for j in train_jobs)


def test_packed_encoding_switch_reaches_the_driver(tmp_path):
    proc = snakemake(tmp_path, "-n", "-p", "--config", "encode={packed: false}")
    text = (proc.stdout + proc.stderr).replace('\\"', '"')
    encode_jobs = text.split("rule encode_shard:")[1:]
    assert encode_jobs and all('"packed": false' in j[:6000] for j in encode_jobs)
    proc = snakemake(tmp_path, "-n", "-p", "--config", "encode={gelu_epilogue: true}")
    text = (proc.stdout + proc.stderr).replace('\\"', '"')
    encode_jobs = text.split("rule encode_shard:")[1:]
    assert encode_jobs and all('"gelu_epilogue": true' in j[:6000] for j in encode_jobs)
    bad = snakemake(tmp_path, "-n", "--config", "encode={packed: sometimes}", check=False)
    assert bad.returncode != 0 and "config key 'encode.packed'" in bad.stdout + bad.stderr


def test_packed_training_switch_reaches_the_driver(tmp_path):
    proc = snakemake(tmp_path, "-n", "-p", "--config", "retriever={train: {packed_training: true}}")
    text = (proc.stdout + proc.stderr).replace('\\"', '"')
    jobs = [j[:6000] for j in text.split("rule train_dense:")[1:] if "system=retriever1" in j.split("\n\n", 1)[0]]
    assert jobs and all('"packed_training": true' in j for j in jobs)


def test_group_by_length_switch_reaches_the_pretraining_driver(tmp_path):
    proc = snakemake(tmp_path, "-n", "-p", "--config", "pretrain={train: {group_by_length: true}}")
    text = (proc.stdout + proc.stderr).replace('\\"', '"')
    jobs = [j[:6000] for j in text.split("rule pretrain:")[1:]]
    assert len(jobs) == 1 and '"group_by_length": true' in jobs[0]


def test_packed_scoring_switch_reaches_the_drivers(tmp_path):
    for value, want in (("auto", '"packed": null'), ("false", '"packed": false')):
        proc = snakemake(tmp_path, "-n", "-p", "--config", f"reranker={{packed: {value}}}")
        text = (proc.stdout + proc.stderr).replace('\\"', '"')
        for rule in ("rerank", "score_teacher_shard"):
            jobs = text.split(f"rule {rule}:")[1:]
            assert jobs and all(want in j[:6000] for j in jobs), (rule, value)


def test_training_arguments_carry_torch_compile(tmp_path):
    from simlm_core.training import TrainConfig, to_training_arguments

    args = to_training_arguments(TrainConfig(output_dir=str(tmp_path / "o"), work_dir=str(tmp_path / "w"),
                                             torch_compile=True))
    assert args.torch_compile is True
    assert args.logging_nan_inf_filter is False  # no per-step host sync; a NaN loss shows in the log
    assert to_training_arguments(TrainConfig(output_dir="o", work_dir=str(tmp_path / "w"))).torch_compile is False
    graphs = to_training_arguments(TrainConfig(output_dir="o", work_dir=str(tmp_path / "w"),
                                               torch_compile_mode="reduce-overhead"))
    assert graphs.torch_compile is True and graphs.torch_compile_mode == "reduce-overhead"
    plain = to_training_arguments(TrainConfig(output_dir="o", work_dir=str(tmp_path / "w"), torch_compile=True,
                                              torch_compile_mode="default"))
    assert plain.torch_compile is True and plain.torch_compile_mode is None
    from simlm_core import training

    monkey = pytest.MonkeyPatch()
    monkey.setattr(training.torch.cuda, "is_available", lambda: True)
    try:  # on a CUDA machine, CUDA graphs with gradient accumulation are refused before training
        with pytest.raises(ValueError, match="cannot accumulate gradients"):
            training.check_cuda_graph_settings(TrainConfig(output_dir="o", work_dir="w", gradient_accumulation_steps=4,
                                                           torch_compile_mode="reduce-overhead"))
        training.check_cuda_graph_settings(TrainConfig(output_dir="o", work_dir="w", gradient_accumulation_steps=4,
                                                       torch_compile_mode="max-autotune-no-cudagraphs"))
    finally:
        monkey.undo()
    with pytest.raises(ValueError, match="torch_compile_mode must be one of"):
        to_training_arguments(TrainConfig(output_dir="o", work_dir=str(tmp_path / "w"), torch_compile_mode="fast"))


@pytest.mark.parametrize("name", ["msmarco", "nq", "beir"])
def test_paper_configs_do_not_inherit_demo_schedules(name):
    # configs/*.yaml are merged on top of config.yaml: a demo-only setting they leave unset
    # (a step count, the demo's initialisation shortcuts) would silently apply at paper scale.
    import yaml
    from snakemake.utils import update_config

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    paper = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    update_config(cfg, paper)  # --configfile's merge
    sections = {"retriever": cfg["retriever"]["train"], "reranker": cfg["reranker"]["train"],
                "distill": cfg["distill"]["train"], "retriever2": cfg["retriever2"]["train"]}
    for section, train in sections.items():
        if section == "retriever2" and not cfg["retriever2"]["enabled"] and "num_train_epochs" not in train:
            continue
        assert "num_train_epochs" in train, (name, section)
        assert train.get("packed_training", False) is False, f"{name}: {section}.train inherits packed_training"
        # a step count the paper config does not set itself (the authors' NQ scripts do) is the demo's
        own_steps = paper.get(section, {}).get("train", {}).get("max_steps", -1)
        assert own_steps >= 1000 or train.get("max_steps", -1) <= 0, \
            f"{name}: {section}.train inherits max_steps {train['max_steps']}"
    assert cfg["reranker"]["train"].get("lr_scheduler_type", "linear") == "linear"
    assert cfg["distill"]["init"] == "pretrain"
    assert cfg["models"]["reranker"] != "retriever1"
    assert "demo" not in cfg["dataset"]["format"]


def test_schema_train_sections_match_the_training_arguments():
    """Every training option a stage's arguments take can be set in its config section (and the
    schema names no option the code would reject); paths and seeds come from the workflow."""
    import dataclasses

    import yaml

    from simlm_core.biencoder_training import BiencoderTrainArgs
    from simlm_core.pretraining import GeneratorArgs, PretrainArgs
    from simlm_core.reranker_training import RerankerTrainArgs
    from simlm_core.training import TrainConfig

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())

    def keys(node):
        node = schema["$defs"][node["$ref"].split("/")[-1]] if "$ref" in node else node
        return set(node["properties"])

    by_workflow = {"seed", "output_dir", "work_dir", "corpus_path", "queries_path", "negatives_path",
                   "teacher_scores_path", "model_name_or_path", "tokenizer_path", "tokenizer_name_or_path",
                   "generator", "reference_model", "expected_world_size"}
    props = schema["properties"]
    retriever_level = {"pooling", "normalize", "temperature"}  # retriever section, shared by every dense stage
    for args, node, extra in (
        (PretrainArgs, props["pretrain"]["properties"]["train"], set()),
        (GeneratorArgs, props["pretrain"]["properties"]["generator_train"], set()),
        (BiencoderTrainArgs, props["retriever"]["properties"]["train"], retriever_level),
        (RerankerTrainArgs, props["reranker"]["properties"]["train"], set()),
    ):
        fields = {f.name for f in dataclasses.fields(args)}
        # the offline generator's section takes its own options, not every shared training option
        own = fields - {f.name for f in dataclasses.fields(TrainConfig)} if args is GeneratorArgs else fields
        assert own - by_workflow - extra - keys(node) == set(), args.__name__
        assert keys(node) - fields == set(), args.__name__


def test_data_preparation_reruns_only_what_a_raw_file_edit_or_a_new_split_touches(tmp_path):
    """The corpus and each split are prepared by jobs of their own, whose inputs are the files they
    read (a folder's time stamp does not change when a file inside it is edited): editing one
    split's qrels, or adding an evaluation split, reruns that split only, not the corpus (and so
    not everything trained on it)."""
    src = tmp_path / "beir"
    (src / "qrels").mkdir(parents=True)
    (src / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "cats"}\n')
    (src / "queries.jsonl").write_text('{"_id": "q1", "text": "what"}\n')
    for split in ("train", "test", "dev"):
        (src / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    work = tmp_path / "work"

    def data_targets(*splits):
        return ["results/t/data/corpus.parquet", *(f"results/t/data/qrels/{s}.parquet" for s in splits)]

    def config(*evals):
        return ["--config", f"dataset={{format: beir, path: {src}, train_split: train, "
                            f"eval_splits: [{', '.join(evals)}]}}", "run_name=t"]

    text = snakemake(work, "-n", *data_targets("train", "test"), *config("test")).stdout
    corpus_job = text.split("rule prepare_corpus:")[1].split("\n\n")[0]
    assert str(src / "corpus.jsonl") in corpus_job and "qrels" not in corpus_job.split("output:")[0]
    test_job = next(j for j in text.split("rule prepare_split:")[1:] if "split=test" in j.split("\n\n")[0])
    assert str(src / "qrels" / "test.tsv") in test_job and str(src / "queries.jsonl") in test_job
    snakemake(work, "--cores", "1", *data_targets("train", "test"), *config("test"))
    assert planned_jobs(snakemake(work, "-n", *data_targets("train", "test"), *config("test"))) == {}
    time.sleep(0.05)
    (src / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\n")  # an edit in place
    assert planned_jobs(snakemake(work, "-n", *data_targets("train", "test"), *config("test"))) == \
        {"prepare_split": 1}
    snakemake(work, "--cores", "1", *data_targets("train", "test"), *config("test"))
    assert planned_jobs(snakemake(work, "-n", *data_targets("train", "test", "dev"), *config("test", "dev"))) == \
        {"prepare_split": 1}  # the new split only: the corpus stays
    (src / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "cats purr"}\n')
    assert planned_jobs(snakemake(work, "-n", *data_targets("train", "test"), *config("test"))) == \
        {"prepare_corpus": 1, "prepare_split": 2}  # every split checks its judged passages against it


def test_training_stages_ask_for_their_own_gpu_counts(tmp_path):
    """resources.stage_gpus overrides train_gpus per stage (MS MARCO: the authors' 4 GPUs for the
    retrievers, 8 for pre-training and the re-ranker), and the launcher follows the grant."""
    data = tmp_path / "data"
    data.mkdir()
    proc = snakemake(tmp_path, "-n", "-p", "--configfile", str(REPO / "configs" / "msmarco.yaml"),
                     "--config", f"dataset={{path: {data}}}")
    text = proc.stdout + proc.stderr
    gpus = {}
    for job in text.split("\nrule ")[1:]:
        rule = job.split(":", 1)[0]
        system = re.search(r"wildcards: system=(\w+)", job)
        granted = re.search(r"resources: .*\bgpu=(\d+)", job)
        if rule in ("pretrain", "train_dense", "train_reranker"):
            gpus[rule + (f"/{system.group(1)}" if system else "")] = int(granted.group(1))
            # the driver refuses another number of processes than the config asks for
            assert f'"expected_world_size": {granted.group(1)}' in job.replace('\\"', '"'), rule
            # each job first claims its own GPUs of the machine (simlm_core.gpu_slots)
            assert f"gpu_slots --gpus {granted.group(1)} -- torchrun --standalone --nproc_per_node " \
                   f"{granted.group(1)} " in job, rule
        elif rule in ("encode_shard", "rerank", "score_teacher_shard"):
            assert "python -m simlm_core.gpu_slots --gpus 1 -- python -m simlm_core.drivers." in job, rule
    assert gpus == {"pretrain": 8, "train_reranker": 8, "train_dense/retriever1": 4,
                    "train_dense/retriever2": 4, "train_dense/retriever_distill": 4}
    demo = snakemake(tmp_path, "-n", "-p")  # CPU jobs claim nothing
    assert "-m simlm_core.gpu_slots" not in demo.stdout + demo.stderr
    bad = snakemake(tmp_path, "-n", "--config", "resources={stage_gpus: {retriver: 2}}", check=False)
    assert bad.returncode != 0 and "retriver" in bad.stdout + bad.stderr


@pytest.mark.parametrize("name", ["msmarco", "nq", "beir"])
def test_paper_configs_plan(tmp_path, name):
    data = tmp_path / "data"
    data.mkdir()
    jobs = planned_jobs(
        snakemake(tmp_path, "-n", "--configfile", str(REPO / "configs" / f"{name}.yaml"),
                  "--config", f"dataset={{path: {data}}}")
    )
    assert "pretrain" in jobs or name == "beir"
    assert "init_model" not in jobs  # paper configs start from real pre-trained models
    assert jobs["report"] == 1


# ---------------------------------------------------------------------------------------------
# End to end on the tiny demo


@pytest.fixture(scope="module")
def e2e_workflow(tmp_path_factory) -> Path:
    """A copy of the workflow's sources, so a test can edit a core module without touching the
    repository (the jobs still import the installed simlm_core; only rerun triggers read these)."""
    copy = tmp_path_factory.mktemp("workflow")
    for name in ["Snakefile", "config.yaml", "rules", "workflow_scripts", "simlm_core", "schemas", "report", "envs"]:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, copy / name)
    return copy / "Snakefile"


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory, e2e_workflow):
    workdir = tmp_path_factory.mktemp("e2e")
    snakemake(workdir, "--cores", "2", "--configfile", str(E2E_CONFIG), snakefile=e2e_workflow)
    return workdir


@pytest.mark.slow
@pytest.mark.java
def test_e2e_writes_the_report(e2e_run):
    report = e2e_run / "results" / "e2e" / "report"
    csv = pd.read_csv(report / "metrics.csv")
    assert list(csv.columns) == ["system", "split", "metric", "value"]
    assert set(csv.system) == {"bm25", "retriever1_nopretrain", "retriever1", "reranker", "retriever_distill"}
    assert (csv.value.between(0, 1)).all()
    html = (report / "report.html").read_text()
    assert "retriever_distill" in html and "data:image/png;base64," in html
    metrics = json.loads((e2e_run / "results" / "e2e" / "metrics" / "bm25" / "dev.json").read_text())
    assert metrics["metrics"]["RR@10"] > 0


@pytest.mark.slow
@pytest.mark.java
def test_e2e_second_run_does_nothing(e2e_run, e2e_workflow):
    assert planned_jobs(snakemake(e2e_run, "-n", "--configfile", str(E2E_CONFIG), snakefile=e2e_workflow)) == {}


@pytest.mark.slow
@pytest.mark.java
def test_e2e_bm25_parameter_reruns_bm25_and_dependants_only(e2e_run, e2e_workflow):
    jobs = planned_jobs(
        snakemake(e2e_run, "-n", "--configfile", str(E2E_CONFIG), "--config", "bm25={k1: 1.1}",
                  snakefile=e2e_workflow)
    )
    assert jobs.get("bm25_search") == 2
    assert "evaluate" in jobs and "report" in jobs
    for upstream in ["prepare_data", "bm25_index", "init_model", "train_generator", "pretrain"]:
        assert upstream not in jobs, f"{upstream} must not rerun when only BM25 changes: {jobs}"


@pytest.mark.slow
@pytest.mark.java
@pytest.mark.parametrize(
    "override, stage, upstream",
    [
        ("pretrain={train: {learning_rate: 0.0042}}", "pretrain", ["train_generator", "init_model", "bm25_search"]),
        ("reranker={train: {learning_rate: 0.0042}}", "train_reranker", ["pretrain", "mine_negatives", "bm25_search"]),
        ("retriever={train: {learning_rate: 0.0042}}", "train_dense", ["pretrain", "train_generator", "bm25_search"]),
        # The index feeds mining, so the re-ranker and the distilled retriever follow; not pre-training.
        ("index={type: hnsw}", "build_index", ["pretrain", "train_generator", "bm25_search"]),
    ],
)
def test_e2e_hyper_parameter_reruns_its_stage(e2e_run, e2e_workflow, override, stage, upstream):
    # Each rule passes paths and settings as one JSON `args` param built from wildcards only:
    # Snakemake skips a params function that reads input/output in its params check, so this
    # guards against an `args` that slips back to reading them.
    jobs = planned_jobs(
        snakemake(e2e_run, "-n", "--configfile", str(E2E_CONFIG), "--config", override, snakefile=e2e_workflow)
    )
    assert stage in jobs and "report" in jobs, jobs
    for rule in upstream:
        assert rule not in jobs, f"{rule} must not rerun for {override}: {jobs}"


@pytest.mark.slow
@pytest.mark.java
@pytest.mark.parametrize("override", [
    "pretrain={train: {logging_steps: 7, save_steps: 3}}",
    "retriever={train: {logging_steps: 7, disable_tqdm: true}}",
    "reranker={train: {save_total_limit: 1}}",
    "bm25={heap: 2g}",
])
def test_e2e_settings_that_do_not_change_results_rerun_nothing(e2e_run, e2e_workflow, override):
    """Logging and checkpoint cadence and the Java heap reach the jobs apart from the rerun-checked
    arguments (functions of `threads`): changing them retrains nothing."""
    proc = snakemake(e2e_run, "-n", "-p", "--configfile", str(E2E_CONFIG), "--config", override,
                     snakefile=e2e_workflow)
    assert planned_jobs(proc) == {}, override


@pytest.mark.slow
@pytest.mark.java
def test_e2e_core_module_edit_reruns_its_stage(e2e_run, e2e_workflow):
    # Snakemake 9 reruns on a changed input's content (a bare touch is not enough).
    metrics_py = e2e_workflow.parent / "simlm_core" / "metrics.py"
    metrics_py.write_text(metrics_py.read_text() + "\n# edited by a test\n")
    later = time.time() + 5
    os.utime(metrics_py, (later, later))
    jobs = planned_jobs(snakemake(e2e_run, "-n", "--configfile", str(E2E_CONFIG), snakefile=e2e_workflow))
    assert set(jobs) == {"evaluate", "report"}, jobs
