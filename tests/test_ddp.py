"""Retriever training under real multi-process DDP (torchrun, 2 CPU ranks over gloo).

1. Global in-batch negatives. One global batch of ``2B`` queries is trained for one step by the
   real driver as one process (batch ``2B``) and as 2 torchrun ranks (batch ``B`` each). The
   first logged loss is computed before the first update, from the same initial weights, so it
   must agree: each rank scores the ``2B`` queries against ALL ``2B*G`` passages of the global
   batch, and the Trainer logs the mean of the (equal) per-rank losses. Without gathering
   (``gather_across_ranks=False``) each rank only sees its own ``B*G`` passages: the logged loss
   is then the mean of two half-batch losses and differs -- which shows the test can fail.

   Why the runs see the same data: the dataset is exactly ONE global batch, so both runs use
   the same ``2B`` queries whatever the order; the groups are drawn from a generator seeded by
   (seed, epoch, query index), not by data order; and the contrastive loss (a mean over
   queries of softmax cross-entropies over the whole passage set, ``full_contrastive`` extras
   included) does not depend on the order of the queries in the batch. (Order itself: the
   Trainer builds a ``RandomSampler``; accelerate swaps it for its ``SeedableRandomSampler``
   and, under DDP, shards the batches of that one permutation across ranks with
   ``BatchSamplerShard`` -- there is no ``DistributedSampler``.)

2. It trains: 20 steps of 2 ranks on the 20-query dataset -- the loss falls, only rank 0
   writes the final model, and the ranks see disjoint halves of every epoch (5 steps per epoch
   = ceil(20 / (2 ranks x 2)), not the 10 an unsharded rank would take). With the same seed a
   single process with batch 2B draws the same global batches, so its loss and gradient-norm
   curve must match the 2-rank one step by step.

The recorder ``tests/ddp_helpers/record_driver.py`` runs the same driver ``main`` and logs what
each rank computed (batch queries, per-rank loss, score-matrix shape) and which rank saved.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from simlm_core.io import NEGATIVES_SCHEMA, write_table

REPO = Path(__file__).resolve().parents[1]
RECORDER = Path(__file__).resolve().parent / "ddp_helpers" / "record_driver.py"
WORLD = 2
B = 2  # per-rank batch (queries)
GROUP = 4  # passages per query
SEED = 13
REL_TOL = 1e-4
TIMEOUT_S = 300


def _gloo_ok() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _gloo_ok(), reason="torch.distributed with the gloo backend is unavailable"),
]

# Variables a launcher sets for its workers: none may leak into the single-process run.
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
              "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
              "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.pop("SIMLM_TRAIN_STEP_DELAY_S", None)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        MASTER_PORT=str(_free_port()),  # torchrun --standalone picks its own rendezvous port anyway
        CUDA_VISIBLE_DEVICES="",  # these tests are about CPU/gloo DDP
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _tail(text: str | bytes | None, n: int = 4000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def _run(cmd: list[str], cwd: Path) -> tuple[str, float]:
    """Run ``cmd`` in its own process group; assert success; return (stdout, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {TIMEOUT_S}s: {' '.join(cmd)}\n--- stdout ---\n{_tail(out)}"
                             f"\n--- stderr ---\n{_tail(err)}")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, (f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout ---\n{_tail(out)}"
                                  f"\n--- stderr ---\n{_tail(err)}")
    return out, elapsed


def _torchrun(target: list[str]) -> list[str]:
    # ``python -m torch.distributed.run`` is ``torchrun``, pinned to this interpreter.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *target]


def _driver_args(ds, bert: Path, work: Path, negatives: Path, **over) -> dict:
    values = dict(
        output_dir=str(work / "out"),
        work_dir=str(work / "ckpt"),
        model_name_or_path=str(bert),
        corpus_path=str(ds.corpus_path),
        queries_path=str(ds.queries_path),
        negatives_path=str(negatives),
        train_group_size=GROUP,
        q_max_len=16,
        p_max_len=32,
        full_contrastive=True,
        gather_across_ranks=True,
        learning_rate=0.0,  # the first logged loss is computed before any update anyway
        warmup_steps=0,
        max_steps=1,
        logging_steps=1,
        save_steps=10_000,
        seed=SEED,
        disable_tqdm=True,
    )
    values.update(over)
    return values


def _train(name: str, root: Path, args: dict, *, ddp: bool, record: bool) -> dict:
    """Run one training job in ``root/name``; return its logs, recordings and timing."""
    work = root / name
    work.mkdir(parents=True)
    args = {**args, "output_dir": str(work / "out"), "work_dir": str(work / "ckpt")}
    (work / "args.json").write_text(json.dumps(args, indent=2))
    if record:
        target = [str(RECORDER), str(work / "record"), "--args-file", str(work / "args.json")]
        cmd = _torchrun(target) if ddp else [sys.executable, *target]
    else:
        target = ["-m", "simlm_core.drivers.train_biencoder", "--args-file", str(work / "args.json")]
        cmd = _torchrun(target) if ddp else [sys.executable, *target]
    stdout, seconds = _run(cmd, cwd=work)
    out = work / "out"
    log = json.loads((out / "training_log.json").read_text())
    steps = [h for h in log["log_history"] if "loss" in h and "train_runtime" not in h]
    events = []
    for path in sorted((work / "record").glob("rank*.jsonl")) if record else []:
        events += [json.loads(line) for line in path.read_text().splitlines()]
    return dict(work=work, out=out, stdout=stdout, seconds=seconds, log=log, steps=steps, events=events)


def _result_lines(stdout: str) -> list[dict]:
    """The driver's result lines (one JSON object with ``global_step``, printed on rank 0 only)."""
    found = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "global_step" in value and "output_dir" in value:
                found.append(value)
    return found


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_batch_negatives(tiny_dataset, tmp_path_factory) -> Path:
    """The negatives table cut to exactly one global batch: ``WORLD * B`` queries (other topics)."""
    df = pd.read_parquet(tiny_dataset.negatives_path)
    sub = df[df.qid.isin(["q00", "q05", "q10", "q15"][: WORLD * B])].reset_index(drop=True)
    assert len(sub) == WORLD * B
    path = tmp_path_factory.mktemp("ddp_one_batch") / "negatives.parquet"
    write_table(sub, path, NEGATIVES_SCHEMA)
    return path


@pytest.fixture(scope="module")
def first_step_runs(tiny_dataset, tiny_bert_dir, one_batch_negatives, tmp_path_factory) -> dict:
    """Single process (batch 2B), 2 ranks gathered (B each), 2 ranks not gathered."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_bert_dir)
    # dropout would make the two runs' forward passes differ
    assert cfg.hidden_dropout_prob == 0.0 and cfg.attention_probs_dropout_prob == 0.0
    root = tmp_path_factory.mktemp("ddp_first_step")
    base = _driver_args(tiny_dataset, tiny_bert_dir, root, one_batch_negatives)
    return {
        "single": _train("single", root, {**base, "per_device_train_batch_size": WORLD * B}, ddp=False, record=False),
        "ddp": _train("ddp", root, {**base, "per_device_train_batch_size": B}, ddp=True, record=False),
        "ddp_nogather": _train("ddp_nogather", root, {**base, "per_device_train_batch_size": B,
                                                      "gather_across_ranks": False}, ddp=True, record=True),
    }


@pytest.fixture(scope="module")
def reference(tiny_dataset, tiny_bert_dir, one_batch_negatives):
    """In-process loss of any subset of the one-batch queries, from the initial weights."""
    from simlm_core.collators import BiencoderCollator, BiencoderDataset
    from simlm_core.modeling.biencoder import BiEncoder

    model = BiEncoder.from_pretrained(tiny_bert_dir, "cls", True, 0.02, q_max_len=16, p_max_len=32,
                                      full_contrastive=True).eval()
    dataset = BiencoderDataset(one_batch_negatives, tiny_dataset.queries_path, tiny_dataset.corpus_path,
                               group_size=GROUP, seed=SEED)
    collate = BiencoderCollator(model.tokenizer, q_max_len=16, p_max_len=32)
    index = {text: i for i, text in enumerate(dataset.query_texts)}

    def loss_of(query_texts: list[str]) -> float:
        batch = collate([dataset[index[t]] for t in query_texts])
        with torch.no_grad():
            return float(model(**batch).loss)

    loss_of.all_queries = list(dataset.query_texts)  # type: ignore[attr-defined]
    return loss_of


# ---------------------------------------------------------------------------------------------
def test_first_step_loss_matches_single_process(first_step_runs, reference):
    single, ddp = first_step_runs["single"], first_step_runs["ddp"]
    for run in (single, ddp):
        assert run["log"]["global_step"] == 1
        assert len(run["steps"]) == 1, run["log"]["log_history"]
        # one step is a whole epoch in both: under DDP each rank took half the data
        assert run["steps"][0]["epoch"] == pytest.approx(1.0), run["log"]["log_history"]
    l_single, l_ddp = single["steps"][0]["loss"], ddp["steps"][0]["loss"]
    l_ref = reference(reference.all_queries)
    print(f"\nfirst-step loss: single {l_single:.7f} ({single['seconds']:.1f}s), 2-rank gathered "
          f"{l_ddp:.7f} ({ddp['seconds']:.1f}s), in-process reference {l_ref:.7f}")
    assert _rel(l_single, l_ref) < REL_TOL, (l_single, l_ref)
    assert _rel(l_ddp, l_single) < REL_TOL, (
        f"2-rank loss {l_ddp} != single-process loss {l_single}: the ranks did not score against the "
        f"global batch\n{_tail(ddp['stdout'])}"
    )
    # the averaged DDP gradient is the single-process gradient (the x W scaling of the local slices)
    g_single, g_ddp = single["steps"][0]["grad_norm"], ddp["steps"][0]["grad_norm"]
    assert _rel(g_ddp, g_single) < 1e-3, (g_ddp, g_single)


def test_first_step_loss_without_gather_is_mean_of_local_losses(first_step_runs, reference):
    run, single = first_step_runs["ddp_nogather"], first_step_runs["single"]
    steps = [e for e in run["events"] if e["event"] == "step"]
    assert sorted(e["rank"] for e in steps) == list(range(WORLD)), run["events"]
    by_rank = {e["rank"]: e for e in steps}
    # each rank saw B different queries, together the whole batch, scored against its own B*G passages
    seen = [q for e in steps for q in e["queries"]]
    assert sorted(seen) == sorted(reference.all_queries), seen
    for e in steps:
        assert e["scores_shape"] == [B, B * GROUP] and e["num_passages"] == B * GROUP, e
        assert _rel(e["loss"], reference(e["queries"])) < REL_TOL, (e, reference(e["queries"]))
    local = [by_rank[r]["loss"] for r in range(WORLD)]
    logged = run["steps"][0]["loss"]
    print(f"\nfirst-step loss without gathering: logged {logged:.7f} = mean of per-rank {local} "
          f"({run['seconds']:.1f}s); gathered/single {single['steps'][0]['loss']:.7f}")
    # the Trainer logs the mean over ranks ...
    assert _rel(logged, sum(local) / WORLD) < REL_TOL, (logged, local)
    # ... which, with only local negatives, is NOT the global-batch loss: the comparison can fail
    assert _rel(logged, single["steps"][0]["loss"]) > 100 * REL_TOL, (logged, single["steps"][0]["loss"])


def test_first_step_ddp_prints_one_result(first_step_runs):
    # the plain driver under torchrun: one result line (rank 0's), both ranks' output merged
    results = _result_lines(first_step_runs["ddp"]["stdout"])
    assert len(results) == 1, _tail(first_step_runs["ddp"]["stdout"])
    assert results[0]["global_step"] == 1 and results[0]["mode"] == "contrastive"


# ---------------------------------------------------------------------------------------------
def _training_args(ds, bert: Path, root: Path, **over) -> dict:
    values = dict(learning_rate=3e-3, max_steps=20, num_train_epochs=100, per_device_train_batch_size=B,
                  temperature=0.05)
    return _driver_args(ds, bert, root, ds.negatives_path, **{**values, **over})


@pytest.fixture(scope="module")
def training_run(tiny_dataset, tiny_bert_dir, tmp_path_factory) -> dict:
    """20 steps of 2 ranks x B queries (the recorder logs each rank's batches and saves)."""
    root = tmp_path_factory.mktemp("ddp_train")
    return _train("train", root, _training_args(tiny_dataset, tiny_bert_dir, root), ddp=True, record=True)


@pytest.fixture(scope="module")
def training_single(tiny_dataset, tiny_bert_dir, tmp_path_factory) -> dict:
    """The same 20 steps in this process, one rank with the global batch of 2B queries."""
    from simlm_core.biencoder_training import BiencoderTrainArgs, train_biencoder

    root = tmp_path_factory.mktemp("ddp_train_single")
    args = _training_args(tiny_dataset, tiny_bert_dir, root, per_device_train_batch_size=WORLD * B) | dict(
        output_dir=str(root / "out"), work_dir=str(root / "ckpt"))
    t0 = time.monotonic()
    train_biencoder(BiencoderTrainArgs(**args))
    log = json.loads((root / "out" / "training_log.json").read_text())
    steps = [h for h in log["log_history"] if "loss" in h and "train_runtime" not in h]
    return dict(log=log, steps=steps, seconds=time.monotonic() - t0)


def test_ddp_training_reduces_loss(training_run):
    losses = [h["loss"] for h in training_run["steps"]]
    assert training_run["log"]["global_step"] == 20 and len(losses) == 20, training_run["log"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"\n2-rank training ({training_run['seconds']:.1f}s): mean loss first 5 steps {first:.4f}, "
          f"last 5 {last:.4f}")
    assert all(math.isfinite(x) for x in losses), losses
    assert last < 0.9 * first, losses


def test_ddp_training_follows_single_process_curve(training_run, training_single):
    """Same global batches (accelerate shards one permutation), same gradients (gathered
    negatives + the x W gradient scaling against DDP's average): the same run, step by step.
    grad_norm is the norm of the averaged DDP gradient before clipping, so a wrong gradient
    scale shows even though Adam's update would hide it."""
    ddp, single = training_run["steps"], training_single["steps"]
    assert [h["step"] for h in ddp] == [h["step"] for h in single] == list(range(1, 21))
    worst_loss = max(_rel(d["loss"], s["loss"]) for d, s in zip(ddp, single))
    worst_norm = max(_rel(d["grad_norm"], s["grad_norm"]) for d, s in zip(ddp, single))
    print(f"\n2-rank vs single-process curve over 20 steps: max rel. diff loss {worst_loss:.1e}, "
          f"grad_norm {worst_norm:.1e} (single in-process run {training_single['seconds']:.1f}s)")
    pairs = [(d["loss"], s["loss"], d["grad_norm"], s["grad_norm"]) for d, s in zip(ddp, single)]
    assert worst_loss < 1e-3, pairs
    assert worst_norm < 1e-2, pairs


def test_ddp_training_only_rank0_saves_a_loadable_model(training_run):
    from transformers import AutoModel

    from simlm_core.modeling.biencoder import BiEncoder

    saves = [e for e in training_run["events"] if e["event"] == "save"]
    assert [e["rank"] for e in saves] == [0], saves
    results = _result_lines(training_run["stdout"])
    assert len(results) == 1, _tail(training_run["stdout"])
    # one output dir, no temp dirs left beside it; the resume checkpoints are cleaned up
    assert sorted(p.name for p in training_run["work"].iterdir()) == ["args.json", "out", "record"]
    out = training_run["out"]
    for name in ("model.safetensors", "config.json", "biencoder_config.json", "train_args.json", "training_log.json"):
        assert (out / name).is_file(), name
    model = BiEncoder.from_pretrained(out)
    assert model.temperature == 0.05
    AutoModel.from_pretrained(out)


def test_ddp_ranks_process_disjoint_data(training_run, tiny_dataset):
    n = tiny_dataset.num_queries
    steps_per_epoch = math.ceil(n / (WORLD * B))  # 5; an unsharded rank would need ceil(n / B) = 10
    for h in training_run["steps"]:
        assert h["epoch"] == pytest.approx(h["step"] / steps_per_epoch), training_run["log"]["log_history"]
    assert training_run["log"]["log_history"][-1]["epoch"] == pytest.approx(20 / steps_per_epoch)
    queries = pd.read_parquet(tiny_dataset.queries_path).text.tolist()
    per_rank = {r: [e["queries"] for e in training_run["events"] if e["event"] == "step" and e["rank"] == r]
                for r in range(WORLD)}
    assert all(len(batches) == 20 for batches in per_rank.values()), per_rank
    for epoch in range(20 // steps_per_epoch):
        window = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        seen = [q for r in range(WORLD) for batch in per_rank[r][window] for q in batch]
        # each epoch, the ranks together see every query exactly once
        assert sorted(seen) == sorted(queries), (epoch, seen)
