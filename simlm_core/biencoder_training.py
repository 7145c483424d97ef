"""Fine-tune the dense retriever: round 1 (BM25 negatives), round 2 (mined negatives) and the
distilled retriever (re-ranker teacher scores), all with :func:`train_biencoder`.

Contrastive mode (no ``teacher_scores_path``): loss = in-batch contrastive CE, groups of 16.
Distillation mode: loss = KL(teacher || retriever over the group) + ``contrastive_weight`` x CE,
groups of 24 restricted to passages the teacher scored. Hyper-parameter defaults follow the
authors' scripts (DESIGN.md section 4); the learning rate / epochs / warmup are TrainConfig's.

Checkpoints go to ``work_dir`` (resumed from automatically); the final model is written
atomically to ``output_dir`` as a plain HF model + ``biencoder_config.json`` +
``training_log.json`` + ``train_args.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, set_seed

from simlm_core.collators import BiencoderCollator, BiencoderDataset
from simlm_core.modeling.biencoder import BiEncoder
from simlm_core.training import (
    TrainConfig,
    check_packed_training,
    to_training_arguments,
    train_and_save,
    train_config_fields,
)

__all__ = ["BiencoderTrainArgs", "BiencoderTrainer", "SetEpochCallback", "TemperatureWarmupCallback", "train_biencoder",
           "build_trainer"]

STEP_DELAY_ENV = "SIMLM_TRAIN_STEP_DELAY_S"
"""Test hook: seconds to sleep after each optimizer step (lets a test kill a run mid-way)."""


@dataclass(kw_only=True)
class BiencoderTrainArgs(TrainConfig):
    """Arguments of retriever training: the shared TrainConfig fields plus these."""

    model_name_or_path: str
    """Initial encoder: the SimLM pre-trained checkpoint, a retriever dir, or an HF hub id."""
    corpus_path: str
    queries_path: str
    negatives_path: str
    teacher_scores_path: str | None = None
    """Re-ranker scores (qid, pid, score): switches to distillation. None: contrastive only."""
    pooling: str = "cls"
    normalize: bool = True
    temperature: float = 0.02
    train_group_size: int | None = None
    """Passages per query (1 positive + negatives); None: 16, or 24 with teacher scores."""
    q_max_len: int = 32
    p_max_len: int = 144
    passage_format: str = "pair"
    contrastive_weight: float = 0.2
    """Weight of the contrastive term in distillation (``kd_cont_loss_weight`` 0.2)."""
    teacher_temperature: float = 1.0
    full_contrastive: bool = True
    """Add the authors' extra q-q, positive-q and positive-positive negatives (their default)."""
    gather_across_ranks: bool = True
    """Under DDP, use every rank's passages as in-batch negatives (global batch)."""
    loss_scale: float | None = None
    """Factor on the contrastive term's gradient (the authors' ``loss_scale``). None: the number of
    ranks, which gives the single-process gradient of the global batch's loss (their default);
    their NQ scripts set 1."""
    temperature_warmup: bool = False
    """The authors' ``t_warmup`` (their NQ scripts): the loss's ``1/t`` grows linearly from 1 to
    ``1/temperature`` over the learning-rate warm-up steps."""
    packed_training: bool = False
    """Run the encoder padding-free (each batch's tokens in one row; BERT and ELECTRA encoders): the same
    model and loss, without the padding's compute (simlm_core.modeling.packed). Not with CUDA graphs."""

    @property
    def group_size(self) -> int:
        if self.train_group_size is not None:
            return self.train_group_size
        return 24 if self.teacher_scores_path else 16

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{name: getattr(self, name) for name in train_config_fields()})


class SetEpochCallback(TrainerCallback):
    """Tell the dataset which epoch starts (new negatives each epoch; correct after a resume).

    accelerate forwards ``set_epoch`` to a dataset only when the sampler has none, so this does
    it explicitly. ``state.epoch`` is fractional (restored from a checkpoint on resume).
    """

    def __init__(self, dataset: BiencoderDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int((state.epoch or 0.0) + 1e-6))


class TemperatureWarmupCallback(TrainerCallback):
    """Before each optimizer step, set the retriever's training temperature for that step
    (``BiEncoder.set_training_step``; a no-op unless ``temperature_warmup``)."""

    def __init__(self, model: BiEncoder) -> None:
        self.model = model

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.set_training_step(state.global_step, args.get_warmup_steps(state.max_steps))


class _StepDelayCallback(TrainerCallback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


class BiencoderTrainer(Trainer):
    """Trainer for :class:`BiEncoder`: the loss comes from the model; the contrastive and KD
    parts are logged beside it (this rank's averages over the logging interval)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts: dict[str, torch.Tensor] = {}
        self._parts_n = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            for name in ("contrastive_loss", "kd_loss"):
                value = getattr(outputs, name, None)
                if value is not None:
                    self._parts[name] = self._parts.get(name, 0.0) + value.detach()
            self._parts_n += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._parts_n:
            for name, total in self._parts.items():
                logs[name] = round(float(total) / self._parts_n, 4)
            self._parts, self._parts_n = {}, 0
        super().log(logs, *args, **kwargs)


def build_trainer(args: BiencoderTrainArgs) -> tuple[BiencoderTrainer, BiEncoder, BiencoderDataset]:
    """Model, data and Trainer for ``args`` (no training yet)."""
    set_seed(args.seed)
    cfg = args.train_config()
    check_packed_training(cfg, args.packed_training)
    distill = args.teacher_scores_path is not None
    model = BiEncoder.from_pretrained(
        args.model_name_or_path,
        args.pooling,
        args.normalize,
        args.temperature,
        passage_format=args.passage_format,
        q_max_len=args.q_max_len,
        p_max_len=args.p_max_len,
        full_contrastive=args.full_contrastive,
        contrastive_weight=args.contrastive_weight,
        teacher_temperature=args.teacher_temperature,
        gather_across_ranks=args.gather_across_ranks,
        packed_training=args.packed_training,
        loss_scale=args.loss_scale,
        temperature_warmup=args.temperature_warmup,
    )
    if model.tokenizer is None:
        raise ValueError(f"{args.model_name_or_path}: no tokenizer found beside the model")
    dataset = BiencoderDataset(
        args.negatives_path,
        args.queries_path,
        args.corpus_path,
        group_size=args.group_size,
        seed=args.seed,
        teacher_scores_path=args.teacher_scores_path if distill else None,
    )
    collator = BiencoderCollator(
        model.tokenizer,
        q_max_len=args.q_max_len,
        p_max_len=args.p_max_len,
        passage_format=args.passage_format,
        pad_to_multiple_of=8 if torch.cuda.is_available() else None,
    )
    callbacks: list[TrainerCallback] = [SetEpochCallback(dataset)]
    if args.temperature_warmup:
        callbacks.append(TemperatureWarmupCallback(model))
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    if delay > 0:
        callbacks.append(_StepDelayCallback(delay))
    overrides: dict[str, Any] = {}
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun without GPUs: HF/accelerate only set up CPU DDP (gloo) when asked for the CPU.
        overrides["use_cpu"] = True
    trainer = BiencoderTrainer(
        model=model,
        args=to_training_arguments(cfg, **overrides),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=model.tokenizer,
        callbacks=callbacks,
    )
    return trainer, model, dataset


def train_biencoder(args: BiencoderTrainArgs) -> dict[str, Any]:
    """Train the retriever and save it to ``args.output_dir``; returns metrics and data stats."""
    trainer, model, dataset = build_trainer(args)
    mode = "distill" if args.teacher_scores_path else "contrastive"
    print(f"[simlm] retriever training ({mode}), group size {args.group_size}: {json.dumps(dataset.stats)}")

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, model.tokenizer)
        (tmp / "train_args.json").write_text(
            json.dumps({"args": dataclasses.asdict(args), "group_size": args.group_size, "data": dataset.stats},
                       indent=2, default=str) + "\n"
        )

    metrics = train_and_save(trainer, args, save)
    return {
        **metrics,
        "mode": mode,
        "group_size": args.group_size,
        "global_step": trainer.state.global_step,
        "output_dir": str(args.output_dir),
        "data": dataset.stats,
    }
