# Shared helpers: artifact paths, which systems run, core-module inputs, launchers.
import hashlib
import json
import os

from simlm_core.code_deps import core_module_closure

RUN = config["run_name"]
OUT = os.path.join(config["results_dir"], RUN)
SEED = config["seed"]
TRAIN_SPLIT = config["dataset"]["train_split"]
EVAL_SPLITS = list(config["dataset"]["eval_splits"])
ALL_SPLITS = sorted(set(EVAL_SPLITS) | {TRAIN_SPLIT})
DATASET_FORMAT = config["dataset"]["format"]
DENSE_SYSTEMS = ["zeroshot", "retriever1", "retriever1_nopretrain", "retriever2", "retriever_distill"]


wildcard_constraints:
    split="[A-Za-z0-9_.-]+",
    shard=r"\d+",
    system="|".join(DENSE_SYSTEMS),


def out(*parts):
    """A path under results/{run_name}/."""
    return os.path.join(OUT, *parts)


def run_depth(split, eval_depth, mining_depth):
    """Eval splits get the full run depth; a split used only for mining gets the mining depth."""
    return eval_depth if split in EVAL_SPLITS else mining_depth


# Artifact paths declared by one rule and read by others. Each takes the wildcard values (or the
# "{wildcard}" patterns themselves), so a rule's input/output and its wildcards-only `args`
# function (see as_json) compute the same string from one place.


def corpus_path():
    return out("data", "corpus.parquet")


def queries_path(split):
    return out("data", "queries", f"{split}.parquet")


def negatives_path(source):
    """Mined negatives of the training queries: `bm25` or `retriever1`."""
    return out("negatives", f"{source}.parquet")


def run_path(system, split):
    return out(system, "runs", f"{split}.parquet")


def checkpoint_dir(system):
    """A trained model folder: a dense system's, or `reranker`'s."""
    return out(system, "checkpoint")


def embedding_shard_path(system, shard, suffix):
    """One corpus-encoding shard's embeddings (suffix ".npy") or passage ids (".ids.parquet")."""
    return out(system, "embeddings", f"shard-{shard}{suffix}")


def index_path(system, suffix):
    """A dense system's FAISS index (suffix ".faiss") or its passage ids (".ids.parquet")."""
    return out(system, f"index{suffix}")


def teacher_shard_path(shard):
    return out("reranker", "scores", f"shard-{shard}.parquet")


def teacher_scores_path():
    """The merged re-ranker scores of the training queries' candidates (distillation targets)."""
    return out("reranker", "scores", f"{TRAIN_SPLIT}.parquet")


def scratch_model_dir():
    return out("models", "init")


def generator_dir():
    """The RLM generator trained by this workflow (pretrain.generator == "train")."""
    return out("models", "generator")


def pretrain_checkpoint():
    return out("pretrain", "checkpoint")


def log_path(name):
    return out("logs", f"{name}.log")


def bench_path(name):
    return out("benchmarks", f"{name}.tsv")


def core(*modules):
    """Core-library files a stage runs, as inputs: the named modules, io.py and every simlm_core
    module they import, directly or through others (simlm_core/code_deps.py), so editing any of
    them reruns the stage (DESIGN §4c)."""
    named = [os.path.join(workflow.basedir, "simlm_core", m) for m in ("io.py", *modules)]
    return core_module_closure(named, workflow.basedir)


def enabled_systems():
    """Systems in pipeline order, as the config switches them on."""
    systems = ["bm25", "retriever1"]
    if config["retriever"]["zero_shot"]:
        systems.insert(1, "zeroshot")
    if config["pretrain"]["enabled"] and config["pretrain"]["compare_without"]:
        systems.insert(1, "retriever1_nopretrain")
    if config["retriever2"]["enabled"]:
        systems.append("retriever2")
    if config["reranker"]["enabled"]:
        systems.append("reranker")
        if config["distill"]["enabled"]:
            systems.append("retriever_distill")
    elif config["distill"]["enabled"]:
        raise ValueError("config: distill.enabled needs reranker.enabled (the teacher)")
    return systems


def base_encoder():
    """The initial encoder: the scratch model folder, or a hub id / local folder."""
    enc = config["models"]["encoder"]
    return scratch_model_dir() if enc == "scratch" else enc


def pretrained_encoder():
    """What retrievers start from: the SimLM checkpoint when pre-training is on."""
    return pretrain_checkpoint() if config["pretrain"]["enabled"] else base_encoder()


def model_choice(choice):
    """A stage's starting weights as configured: "pretrain" (the SimLM checkpoint, or the encoder
    when pre-training is off), "encoder" (the initial encoder), "retriever1" (the round-1
    retriever's fine-tuned encoder), or a hub id / local folder as it is."""
    if choice == "pretrain":
        return pretrained_encoder()
    if choice == "encoder":
        return base_encoder()
    if choice == "retriever1":
        # It already maps a query's words and their synonyms in passages close together, which
        # a tiny model's cross-attention needs (the demo).
        return checkpoint_dir("retriever1")
    return choice


def reranker_init():
    """The cross-encoder's starting weights (models.reranker)."""
    return model_choice(config["models"]["reranker"])


def distill_init():
    """The distilled retriever's start (distill.init): the SimLM checkpoint (paper) or retriever1."""
    return model_choice(config["distill"]["init"])


def local_model_inputs(path):
    """A model given as a path produced by this workflow is an input; a hub id is not."""
    return [path] if path.startswith(OUT) else []


def work_dir(stage, args):
    """Trainer checkpoints live outside declared outputs (Snakemake deletes those before a job),
    keyed by the arguments so a rerun with changed parameters never resumes stale checkpoints."""
    digest = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    return out("_work", f"{stage}-{digest}")



RUNTIME_KEYS = ("logging_steps", "save_steps", "save_total_limit", "disable_tqdm")
"""Training options that do not change the trained model: passed apart (runtime_args)."""


def runtime_args(section):
    """A params function for a training section's RUNTIME_KEYS, as JSON. It takes `threads`, which
    makes Snakemake leave it out of the rerun check (like functions of input/output/resources):
    logging or checkpoint cadence can change without retraining, and the work-folder hash (from
    train_args, which leaves these out) keeps a killed job resumable."""

    def runtime(wildcards, threads):
        values = section(wildcards) if callable(section) else section
        return as_json({k: values[k] for k in RUNTIME_KEYS if k in values})

    return runtime


def train_args(stage, section, gpus=None, **paths):
    """The driver's arguments: a stage's config section (less RUNTIME_KEYS) plus artifact paths and
    the seed. `gpus`: the GPUs the stage asks for; the driver refuses to train under another number
    of processes (a capped grant would silently change the global batch), and a changed count reruns it."""
    section = {k: v for k, v in section.items() if k not in RUNTIME_KEYS}
    args = {"seed": SEED, **section, **paths}
    if gpus is not None:
        args["expected_world_size"] = max(1, int(gpus))
    args["work_dir"] = work_dir(stage, args)
    return args


def bm25_mem_mb():
    """Memory of a BM25 job: the configured Java heap (bm25.heap, e.g. "16g") plus 4 GB for the
    JVM's own memory and Python; 8 GB with no heap set (the JVM then sizes its heap from the job's
    limit). A scheduler would otherwise kill a job whose heap alone exceeds its memory."""
    heap = config["bm25"]["heap"]
    if not heap:
        return 8000
    scale = {"k": 1 / 1024, "m": 1, "g": 1024}[heap[-1].lower()]
    return max(8000, int(int(heap[:-1]) * scale) + 4096)


def stage_gpus(section):
    """GPUs a training stage asks for: `resources.stage_gpus[section]`, else `resources.train_gpus`
    (the authors ran pre-training and the re-ranker on 8 GPUs, the retrievers on 4)."""
    r = config["resources"]
    return (r.get("stage_gpus") or {}).get(section, r["train_gpus"])


def dense_system_gpus(wildcards):
    return stage_gpus(dense_system_spec(wildcards.system)[3])


def gpu_claim(wildcards, resources):
    """A GPU job's command prefix: claim as many free GPUs of this machine as the job was granted
    and set CUDA_VISIBLE_DEVICES to them (simlm_core.gpu_slots), so concurrent jobs on one
    multi-GPU machine do not all land on GPU 0; a no-op under SLURM or a preset
    CUDA_VISIBLE_DEVICES. CPU jobs: nothing."""
    gpus = int(getattr(resources, "gpu", 0) or 0)
    return f"python -m simlm_core.gpu_slots --gpus {gpus} -- " if gpus > 0 else ""


def launcher(wildcards, resources):
    """python, or torchrun with one process per GPU the job was granted (data-parallel), after
    the GPU claim.

    Reads the job's `gpu` resource, not the config, so `--set-resources` / `--resources` overrides
    and the scheduler's grant stay consistent with the number of processes."""
    gpus = int(getattr(resources, "gpu", 0) or 0)
    if gpus > 1:
        return f"{gpu_claim(wildcards, resources)}torchrun --standalone --nproc_per_node {gpus}"
    return f"{gpu_claim(wildcards, resources)}python"


def as_json(args):
    """A driver's arguments as one JSON string, for an `args` param.

    Build it in a params function that takes only `wildcards` (paths from the helpers above, not
    from `input`/`output`): Snakemake leaves a params function that reads `input`/`output` out of
    its rerun check (it counts as derived from files), so a changed hyper-parameter would not
    rerun the rule. A wildcards-only function is compared, and with it every config value in it."""
    return json.dumps(args, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Stage inputs and arguments (functions live here, rules in the stage files: snakemake --lint)


def corpus_source_spec():
    """prepare_corpus's dataset: the config's, with no splits (its rerun trigger holds nothing a
    split adds or changes)."""
    from simlm_core.data import dataset_spec

    return dataset_spec(config["dataset"], [])


def split_source_spec(split):
    """prepare_split's dataset: the config's, restricted to this split."""
    from simlm_core.data import dataset_spec

    return dataset_spec(config["dataset"], [split])


def _source_files(spec, pick):
    """Raw files as inputs, so an edit to one reruns its job (a folder's time stamp does not change
    when a file inside it does). A dataset that does not resolve yet (missing folder or files)
    stays a folder input: the job then fails naming what is missing."""
    from simlm_core.data import resolve_source
    from simlm_core.io import InputError

    try:
        return [str(f) for f in pick(resolve_source(spec))]
    except (InputError, ValueError):
        return [config["dataset"]["path"]]


def corpus_source_inputs(wildcards):
    return _source_files(corpus_source_spec(), lambda source: source.corpus_files)


def split_source_inputs(wildcards):
    return _source_files(split_source_spec(wildcards.split),
                         lambda source: source.split_files.get(wildcards.split, []))


def generator_value():
    g = config["pretrain"]["generator"]
    return generator_dir() if g == "train" else g


def biencoder_args(stage, section, init, negatives, output_dir, teacher_scores=None, gpus=None):
    r = config["retriever"]
    return train_args(
        stage,
        {
            "pooling": r["pooling"],
            "normalize": r["normalize"],
            "temperature": r["temperature"],
            **section,
        },
        gpus=gpus,
        model_name_or_path=init,
        corpus_path=corpus_path(),
        queries_path=queries_path(TRAIN_SPLIT),
        negatives_path=negatives,
        teacher_scores_path=teacher_scores,
        output_dir=output_dir,
    )


# Per dense system: (initial model, negatives table, teacher scores, config section).
def dense_system_spec(system):
    specs = {
        "retriever1": (pretrained_encoder(), negatives_path("bm25"), None, "retriever"),
        "retriever1_nopretrain": (base_encoder(), negatives_path("bm25"), None, "retriever"),
        "retriever2": (pretrained_encoder(), negatives_path("retriever1"), None, "retriever2"),
        "retriever_distill": (
            distill_init(),
            negatives_path("retriever1"),
            teacher_scores_path(),
            "distill",
        ),
    }
    return specs[system]


def train_dense_inputs(wildcards):
    init, negatives, teacher, _ = dense_system_spec(wildcards.system)
    inputs = {
        "corpus": corpus_path(),
        "queries": queries_path(TRAIN_SPLIT),
        "negatives": negatives,
        "init": local_model_inputs(init),
        "code": core("drivers/train_biencoder.py"),
    }
    if teacher:
        inputs["teacher"] = teacher
    return inputs


def dense_train_section(wildcards):
    """The config `train` section of a dense system's stage."""
    return config[dense_system_spec(wildcards.system)[3]]["train"]


def train_dense_args(wildcards):
    """The driver's arguments. Only wildcards in, no `input`/`output`: Snakemake compares such a
    params function on reruns, so a changed hyper-parameter reruns the training (see as_json)."""
    init, negatives, teacher, section = dense_system_spec(wildcards.system)
    return as_json(
        biencoder_args(
            f"train_{wildcards.system}",
            config[section]["train"],
            init,
            negatives,
            checkpoint_dir(wildcards.system),
            teacher,
            gpus=stage_gpus(section),
        )
    )


def embedding_shards(system, suffix):
    """Every shard's file of one kind (see embedding_shard_path), for a system or "{system}"."""
    return [embedding_shard_path(system, s, suffix) for s in range(config["encode"]["shards"])]


def system_run(wildcards):
    return out(wildcards.any_system, "runs", f"{wildcards.split}.parquet")


def metric_files():
    return expand(
        out("metrics", "{system}", "{split}.json"), system=enabled_systems(), split=EVAL_SPLITS
    )


def report_outputs():
    return [out("report", "report.html"), out("report", "report.md"), out("report", "metrics.csv")]
