"""Retriever training end to end on the tiny dataset: learning, saving, distillation, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import biencoder_train_values
from transformers import AutoModel

from simlm_core.biencoder_training import STEP_DELAY_ENV, BiencoderTrainArgs, build_trainer, train_biencoder
from simlm_core.modeling.biencoder import BiEncoder
from simlm_core.training import last_checkpoint


_args = biencoder_train_values


def _losses(out_dir: Path, key: str = "loss") -> list[float]:
    log = json.loads((out_dir / "training_log.json").read_text())
    return [h[key] for h in log["log_history"] if key in h and "train_runtime" not in h]


def test_training_reduces_loss_and_saves_loadable_model(tiny_dataset, tiny_bert_dir, tmp_path):
    result = train_biencoder(BiencoderTrainArgs(**_args(tiny_dataset, tiny_bert_dir, tmp_path)))
    out = tmp_path / "out"
    assert result["mode"] == "contrastive" and result["global_step"] == 50
    losses = _losses(out)
    assert len(losses) == 10
    assert losses[-1] < 0.85 * losses[0], losses
    for name in ("model.safetensors", "config.json", "biencoder_config.json", "train_args.json", "tokenizer.json"):
        assert (out / name).exists(), name
    model = BiEncoder.from_pretrained(out).eval()
    assert model.temperature == 0.05 and model.pooling == "cls"
    AutoModel.from_pretrained(out)  # a plain HF model too
    # the trained model ranks each query's positive first among a few passages more often than not
    tok = model.tokenizer
    with torch.no_grad():
        q = model.encode(**tok(["apple banana", "river lake", "guitar piano"], padding=True, return_tensors="pt"))
        p = model.encode(**tok(["apple banana", "river lake", "guitar piano"], ["", "", ""],
                               padding=True, return_tensors="pt"))
    assert (q @ p.T).argmax(dim=1).tolist() == [0, 1, 2]


def test_distillation_default_group_and_kd_logged(tiny_dataset, tiny_bert_dir, tmp_path):
    values = _args(tiny_dataset, tiny_bert_dir, tmp_path, teacher_scores_path=str(tiny_dataset.teacher_scores_path),
                   train_group_size=None, max_steps=4, logging_steps=2, p_max_len=16)
    result = train_biencoder(BiencoderTrainArgs(**values))
    assert result["mode"] == "distill" and result["group_size"] == 24
    # 12 scored negatives per query, 23 needed: repeated, counted
    assert result["data"]["queries_short_of_negatives"] == tiny_dataset.num_queries
    assert result["data"]["fill_passages_per_epoch"] == 11 * tiny_dataset.num_queries
    kd = _losses(tmp_path / "out", "kd_loss")
    assert len(kd) == 2 and all(k >= 0 for k in kd)
    assert len(_losses(tmp_path / "out", "contrastive_loss")) == 2


def test_temperature_warmup_follows_the_trainer_steps(tiny_dataset, tiny_bert_dir, tmp_path):
    """The NQ recipe's switches through the Trainer: the loss's temperature at each optimizer step
    is the warm-up's (scores logged by a spy on the loss), the saved model keeps the final one."""
    from simlm_core.modeling.biencoder import warmed_up_temperature

    trainer, model, _ = build_trainer(BiencoderTrainArgs(**_args(
        tiny_dataset, tiny_bert_dir, tmp_path, temperature=0.1, temperature_warmup=True, loss_scale=1.0,
        warmup_steps=4, max_steps=6)))
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(model.training_temperature.item())
        return forward(*args, **kwargs)

    model.forward = spy
    trainer.train()
    assert seen == pytest.approx([warmed_up_temperature(0.1, step, 4) for step in range(6)])
    assert seen[0] == 1.0 and seen[-1] == pytest.approx(0.1) and seen[2] == pytest.approx(0.2)
    assert model.temperature == 0.1


def test_epochs_reach_the_dataset(tiny_dataset, tiny_bert_dir, tmp_path):
    trainer, _, dataset = build_trainer(
        BiencoderTrainArgs(**_args(tiny_dataset, tiny_bert_dir, tmp_path, num_train_epochs=3, learning_rate=1e-5))
    )
    seen = []
    orig_rows = dataset.group_rows  # __getitem__ calls self.group_rows: record the epoch it sees

    def spy(idx):
        seen.append(dataset.epoch)
        return orig_rows(idx)

    dataset.group_rows = spy
    trainer.train()
    assert sorted(set(seen)) == [0, 1, 2]
    assert seen == sorted(seen)


@pytest.mark.slow
def test_kill_and_resume_from_checkpoint(tiny_dataset, tiny_bert_dir, tmp_path):
    values = _args(tiny_dataset, tiny_bert_dir, tmp_path, max_steps=6, save_steps=2, logging_steps=1,
                   save_total_limit=5)
    env = dict(os.environ, **{STEP_DELAY_ENV: "0.4", "HF_HUB_OFFLINE": "1"})
    cmd = [sys.executable, "-m", "simlm_core.drivers.train_biencoder", "--args-json", json.dumps(values)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    try:
        while last_checkpoint(values["work_dir"]) is None:
            if proc.poll() is not None:
                pytest.fail(f"training ended before the kill (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("no checkpoint appeared within 120 s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not Path(values["output_dir"]).exists()  # nothing half-written where the output goes
    killed_at = int(Path(last_checkpoint(values["work_dir"])).name.split("-")[1])
    assert killed_at < 6

    result = train_biencoder(BiencoderTrainArgs(**values))
    log = json.loads((Path(values["output_dir"]) / "training_log.json").read_text())
    assert log["resumed_from"] is not None and Path(log["resumed_from"]).name.startswith("checkpoint-")
    assert int(Path(log["resumed_from"]).name.split("-")[1]) >= killed_at
    assert log["global_step"] == 6 and result["global_step"] == 6
    steps_logged = [h["step"] for h in log["log_history"] if "loss" in h]
    assert steps_logged[-1] == 6


def test_driver_rejects_unknown_keys():
    from simlm_core.drivers.train_biencoder import main

    with pytest.raises(ValueError, match="bogus"):
        main(["--args-json", json.dumps({"bogus": 1})])


def test_cli_merges_runtime_options_and_refuses_a_key_given_twice():
    from simlm_core.cli import parse_dataclass_cli

    base = {"output_dir": "o", "work_dir": "w", "model_name_or_path": "m", "corpus_path": "c",
            "queries_path": "q", "negatives_path": "n"}
    args = parse_dataclass_cli(BiencoderTrainArgs, ["--args-json", json.dumps(base),
                                                    "--runtime-json", json.dumps({"logging_steps": 7})])
    assert args.logging_steps == 7 and args.model_name_or_path == "m"
    with pytest.raises(ValueError, match=r"\['logging_steps'\] given both"):
        parse_dataclass_cli(BiencoderTrainArgs, ["--args-json", json.dumps({**base, "logging_steps": 5}),
                                                 "--runtime-json", json.dumps({"logging_steps": 7})])
    with pytest.raises(ValueError, match="bogus"):
        parse_dataclass_cli(BiencoderTrainArgs, ["--args-json", json.dumps(base), "--runtime-json", '{"bogus": 1}'])


def test_packed_training_with_fused_norm_learns_and_saves_the_same_model_format(tiny_dataset, tiny_bert_dir,
                                                                                tmp_path, capsys):
    result = train_biencoder(BiencoderTrainArgs(**_args(tiny_dataset, tiny_bert_dir, tmp_path, packed_training=True,
                                                        fused_norm=True)))
    assert "fused_norm: 4 dropout-add-LayerNorm blocks run on torch ops" in capsys.readouterr().out
    out = tmp_path / "out"
    assert result["global_step"] == 50
    losses = _losses(out)
    assert losses[-1] < 0.85 * losses[0], losses
    saved = BiEncoder.from_pretrained(out).encoder.state_dict()
    initial = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    assert saved.keys() == initial.keys()  # a plain HF encoder, nothing of the packed path
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)
