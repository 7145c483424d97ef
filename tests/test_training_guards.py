"""Guards of simlm_core.training.train_and_save: checkpoints are resumed only while the inputs and
the library code they were trained from are unchanged, and a run under another world size than
the configuration expects fails before training."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import biencoder_train_values, make_tiny_bert, make_tiny_dataset
from transformers import TrainerCallback

import simlm_core.training as training
from simlm_core.biencoder_training import BiencoderTrainArgs, build_trainer, train_biencoder
from simlm_core.training import (
    FINGERPRINT_FILE,
    TrainConfig,
    check_world_size,
    fingerprint_changes,
    input_fingerprint,
    last_checkpoint,
    to_training_arguments,
    train_and_save,
)


class _Killed(Exception):
    pass


class _KillAfterFirstSave(TrainerCallback):
    """Stop training right after the first checkpoint is complete (a job killed mid-way)."""

    def on_save(self, args, state, control, **kwargs):
        raise _Killed(f"killed after step {state.global_step}")


@pytest.fixture()
def data(tmp_path):
    """A private copy of the tiny dataset (these tests rewrite its files)."""
    return make_tiny_dataset(tmp_path / "data")


def _values(ds, bert, tmp_path, **over) -> dict:
    """Four steps, a checkpoint every two."""
    return biencoder_train_values(ds, bert, tmp_path, **{"max_steps": 4, "logging_steps": 1, "save_steps": 2,
                                                         "save_total_limit": 5, **over})


def _killed_run(values: dict) -> str:
    """Train as train_biencoder does until the first checkpoint, then die; returns that checkpoint."""
    args = BiencoderTrainArgs(**values)
    trainer, model, _ = build_trainer(args)
    trainer.add_callback(_KillAfterFirstSave())
    with pytest.raises(_Killed):
        train_and_save(trainer, args, lambda tmp: model.save_pretrained(tmp, model.tokenizer))
    assert not Path(values["output_dir"]).exists()
    checkpoint = last_checkpoint(values["work_dir"])
    assert checkpoint is not None and Path(checkpoint).name == "checkpoint-2"
    assert (Path(values["work_dir"]) / FINGERPRINT_FILE).is_file()
    return checkpoint


def _log(values: dict) -> dict:
    return json.loads((Path(values["output_dir"]) / "training_log.json").read_text())


def _first_logged_step(log: dict) -> int:
    return min(h["step"] for h in log["log_history"] if "loss" in h)


def test_unchanged_inputs_resume(data, tiny_bert_dir, tmp_path, capsys):
    values = _values(data, tiny_bert_dir, tmp_path, expected_world_size=1)  # 1 process, as expected
    checkpoint = _killed_run(values)
    stored = json.loads((Path(values["work_dir"]) / FINGERPRINT_FILE).read_text())
    assert set(stored["inputs"]) == {"corpus_path", "queries_path", "negatives_path", "model_name_or_path"}
    assert stored["inputs"]["negatives_path"]["size"] == os.path.getsize(data.negatives_path)
    assert any(f[0] == "config.json" for f in stored["inputs"]["model_name_or_path"]["files"])
    capsys.readouterr()

    result = train_biencoder(BiencoderTrainArgs(**values))
    out = capsys.readouterr().out
    log = _log(values)
    assert log["resumed_from"] == checkpoint
    assert f"resuming from {checkpoint}" in out and "not resuming" not in out
    assert result["global_step"] == 4 and log["global_step"] == 4
    assert not Path(values["work_dir"]).exists()  # cleaned up after the final save


def test_input_file_changed_after_checkpoint_starts_fresh(data, tiny_bert_dir, tmp_path, capsys):
    values = _values(data, tiny_bert_dir, tmp_path)
    _killed_run(values)
    # the negatives are regenerated (another seed) under the same path: same arguments, same work_dir
    other = make_tiny_dataset(tmp_path / "other", seed=1)
    shutil.copyfile(other.negatives_path, data.negatives_path)
    capsys.readouterr()

    result = train_biencoder(BiencoderTrainArgs(**values))
    out = capsys.readouterr().out
    log = _log(values)
    assert log["resumed_from"] is None
    assert _first_logged_step(log) == 1  # trained from step 0, no history from the old checkpoint
    assert result["global_step"] == 4
    lines = [line for line in out.splitlines() if "not resuming" in line]
    assert len(lines) == 1, out
    assert f"negatives_path ({data.negatives_path})" in lines[0]
    assert "corpus_path" not in lines[0] and "simlm_core code" not in lines[0]
    assert "resuming from" not in out


def test_model_folder_changed_is_named(tmp_path):
    bert = make_tiny_bert(tmp_path / "bert")
    args = BiencoderTrainArgs(output_dir=str(tmp_path / "o"), work_dir=str(tmp_path / "w"),
                              model_name_or_path=str(bert), corpus_path=str(tmp_path / "missing.parquet"),
                              queries_path="q", negatives_path="n")
    before = input_fingerprint(args)
    assert set(before["inputs"]) == {"model_name_or_path"}  # missing files are not local inputs
    assert fingerprint_changes(before, input_fingerprint(args)) == []
    (bert / "config.json").write_text((bert / "config.json").read_text() + "\n")
    assert fingerprint_changes(before, input_fingerprint(args)) == [f"model_name_or_path ({bert})"]


def test_code_changed_starts_fresh(data, tiny_bert_dir, tmp_path, capsys, monkeypatch):
    values = _values(data, tiny_bert_dir, tmp_path)
    _killed_run(values)
    real = training.code_fingerprint(BiencoderTrainArgs(**values))
    monkeypatch.setattr(training, "code_fingerprint", lambda cfg: "0" * 64)  # a module it runs was edited
    assert real != "0" * 64
    capsys.readouterr()

    train_biencoder(BiencoderTrainArgs(**values))
    out = capsys.readouterr().out
    log = _log(values)
    assert log["resumed_from"] is None and _first_logged_step(log) == 1
    line = next(line for line in out.splitlines() if "not resuming" in line)
    assert line.endswith("simlm_core code; discarding them, training from scratch"), line
    assert "_path" not in line.split("written:")[1]


def test_work_dir_without_fingerprint_resumes(data, tiny_bert_dir, tmp_path, capsys):
    """Checkpoints of a version before the check: resumed as before, the fingerprint written then."""
    values = _values(data, tiny_bert_dir, tmp_path)
    checkpoint = _killed_run(values)
    (Path(values["work_dir"]) / FINGERPRINT_FILE).unlink()
    capsys.readouterr()
    train_biencoder(BiencoderTrainArgs(**values))
    assert "without checking the inputs" in capsys.readouterr().out
    assert _log(values)["resumed_from"] == checkpoint


def test_code_fingerprint_covers_the_code_the_stage_runs(data, tiny_bert_dir, tmp_path, monkeypatch):
    """The stage's module and what it imports count; a module it does not run (the report) does not."""
    from simlm_core.code_deps import core_module_closure

    args = BiencoderTrainArgs(**_values(data, tiny_bert_dir, tmp_path))
    fp = training.code_fingerprint(args)
    assert len(fp) == 64 and fp == training.code_fingerprint(args)
    root = Path(training.__file__).resolve().parent.parent
    closure = {Path(f).name for f in core_module_closure([training.__file__], root)}
    assert "training.py" in closure and "report.py" not in closure
    assert training.code_fingerprint(TrainConfig(output_dir="o", work_dir="w")) != fp  # another stage's code
    real_read = Path.read_bytes
    edited = {"losses.py"}  # the biencoder's loss functions: part of its closure

    def read_bytes(self):
        return real_read(self) + (b"# edit" if self.name in edited else b"")

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert training.code_fingerprint(args) != fp
    edited.clear()
    edited.add("report.py")
    assert training.code_fingerprint(args) == fp


# ---------------------------------------------------------------------------------------------
# World size
def _cfg(tmp_path, **over) -> TrainConfig:
    return TrainConfig(output_dir=str(tmp_path / "o"), work_dir=str(tmp_path / "retriever1-0123456789"),
                       per_device_train_batch_size=16, **over)


def test_world_size_mismatch_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as err:
        check_world_size(_cfg(tmp_path, expected_world_size=4))
    msg = str(err.value)
    assert msg.startswith("retriever1 runs as 2 process(es) where the config expects 4")
    assert "global batch would be 32 instead of 64" in msg and "--resources gpu=4" in msg
    assert "GPU count to 2" in msg
    check_world_size(_cfg(tmp_path, expected_world_size=2))  # a match passes
    check_world_size(_cfg(tmp_path))  # None: never checked
    monkeypatch.delenv("WORLD_SIZE")
    check_world_size(_cfg(tmp_path, expected_world_size=0))  # no GPU: one process
    check_world_size(_cfg(tmp_path, expected_world_size=1))
    with pytest.raises(ValueError, match="runs as 1 process"):
        check_world_size(_cfg(tmp_path, expected_world_size=8))
    with pytest.raises(ValueError, match="expects 8"):
        to_training_arguments(_cfg(tmp_path, expected_world_size=8))


def test_expected_world_size_is_not_a_training_argument(tmp_path):
    assert "expected_world_size" in training.train_config_fields()
    args = to_training_arguments(_cfg(tmp_path, expected_world_size=1))
    assert not hasattr(args, "expected_world_size")


def test_world_size_mismatch_fails_before_training(data, tiny_bert_dir, tmp_path, monkeypatch):
    args = BiencoderTrainArgs(**_values(data, tiny_bert_dir, tmp_path))
    trainer, model, _ = build_trainer(args)
    trained = []
    monkeypatch.setattr(trainer, "train", lambda *a, **k: trained.append(1))
    cfg = args.train_config()
    assert cfg.expected_world_size is None
    cfg.expected_world_size = 2
    with pytest.raises(ValueError, match="runs as 1 process\\(es\\) where the config expects 2"):
        train_and_save(trainer, cfg, lambda tmp: None)
    assert trained == [] and not Path(args.output_dir).exists()
    assert not (Path(args.work_dir) / FINGERPRINT_FILE).exists()  # refused before the resume decision
    # the whole stage refuses too (the check runs when its TrainingArguments are built)
    with pytest.raises(ValueError, match="expects 2"):
        train_biencoder(BiencoderTrainArgs(**_values(data, tiny_bert_dir, tmp_path, expected_world_size=2)))
    assert not Path(args.output_dir).exists()
