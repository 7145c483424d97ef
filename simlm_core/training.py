"""Shared Hugging Face Trainer set-up for every training stage (pre-training, retrievers, re-ranker).

One place decides: TrainingArguments from our config, resume from the last checkpoint in a work
directory kept OUTSIDE the stage's declared output (Snakemake deletes declared outputs before a
job starts), and an atomic final save so the output directory appears only when training ended.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainingArguments

from simlm_core.io import atomic_dir

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainConfig:
    """Optimisation settings shared by all training stages (names follow HF TrainingArguments)."""

    output_dir: str
    """Final model directory (HF ``save_pretrained`` layout), written atomically at the end."""
    work_dir: str
    """Trainer checkpoints for resuming a killed job; not a declared Snakemake output."""
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    """``torch.compile`` the model (GPU; measured 1.25-1.34x per step on BERT-base, H200)."""
    torch_compile_mode: str | None = None
    """A ``torch.compile`` mode (implies ``torch_compile``): ``reduce-overhead`` replays each step
    as CUDA graphs (H200, BERT-base RLM, 64 x 144: 1,556 psg/s through RLMTrainer; the bare step
    1,756 vs 1,430 compiled without graphs; pre-training then pads every batch to ``max_len`` so
    the graphs see one shape). Needs ``gradient_accumulation_steps: 1`` (checked before
    training). None / "default": torch's default."""
    fused_attention: bool = False
    """Train BERT/ELECTRA attention (forward, backward, dropout) on our Triton kernel
    (:mod:`simlm_core.modeling.attention_train`), padded batches and ``packed_training`` alike: CUDA
    only, after a self-check against SDPA (a failure keeps SDPA, with a warning)."""
    fused_norm: bool = False
    """Run every BERT/ELECTRA sublayer's dropout + residual add + LayerNorm as one Triton kernel,
    forward and backward (:mod:`simlm_core.modeling.fused_norm`; CUDA with Triton, torch ops
    elsewhere): the same model, with the kernel's own dropout bits."""
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 50
    seed: int = 42
    dataloader_num_workers: int = 0
    disable_tqdm: bool = False


def train_config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def split_train_config(values: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Split a flat argument dict into TrainConfig and the stage's own keys."""
    shared = train_config_fields()
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in shared})
    rest = {k: v for k, v in values.items() if k not in shared}
    return cfg, rest


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(cfg: TrainConfig) -> str | None:
    """``cfg``'s non-default torch.compile mode (None: default or not compiling); checks the name."""
    mode = cfg.torch_compile_mode
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"torch_compile_mode must be one of {COMPILE_MODES}, got {mode!r}")
    return None if mode in (None, "default") else mode


def mode_uses_cuda_graphs(mode: str | None) -> bool:
    """Whether ``torch.compile(mode=mode)`` replays CUDA graphs (on a CUDA device)."""
    return mode is not None and mode not in ("default", "max-autotune-no-cudagraphs") and torch.cuda.is_available()


def uses_cuda_graphs(cfg: TrainConfig) -> bool:
    """Whether training replays CUDA graphs (a compile mode that uses them, on a CUDA device)."""
    return mode_uses_cuda_graphs(compile_mode(cfg))


def check_cuda_graph_settings(cfg: TrainConfig) -> None:
    """Refuse, before any work, what CUDA-graph training cannot do: accumulate gradients.

    Measured on an H200 (benchmarks/trainer_cudagraphs.py): with two micro-batches per step the
    second backward fails with "accessing tensor output of CUDAGraphs that has been overwritten"
    -- the gradient of a weight used twice (SimLM's shared embeddings; a biencoder's one encoder
    for queries and passages) is summed in a graph output buffer that the next replay reuses.
    """
    if uses_cuda_graphs(cfg) and cfg.gradient_accumulation_steps > 1:
        raise ValueError(
            f"torch_compile_mode={cfg.torch_compile_mode!r} replays CUDA graphs, which cannot accumulate "
            f"gradients (gradient_accumulation_steps={cfg.gradient_accumulation_steps}): set "
            "gradient_accumulation_steps to 1 (a larger per_device_train_batch_size or more GPUs keep the "
            "batch) or torch_compile_mode to 'default'")


def check_packed_training(cfg: TrainConfig, packed_training: bool) -> None:
    """Refuse padding-free training under CUDA graphs: every packed batch has its own token count,
    so the graph trees would record a new graph on (nearly) every step."""
    if packed_training and uses_cuda_graphs(cfg):
        raise ValueError(
            f"packed_training gives every batch its own token count, so torch_compile_mode="
            f"{cfg.torch_compile_mode!r} (CUDA graphs, one per shape) would record a graph per step: "
            "use torch_compile_mode 'default' or switch packed_training off")


def to_training_arguments(cfg: TrainConfig, **overrides: Any) -> TrainingArguments:
    """TrainingArguments for ``cfg``; bf16/fp16 are dropped (with a note) where the device lacks them."""
    check_cuda_graph_settings(cfg)
    bf16 = cfg.bf16 and bf16_supported()
    fp16 = cfg.fp16 and torch.cuda.is_available()
    if (cfg.bf16 and not bf16) or (cfg.fp16 and not fp16):
        print("[simlm] mixed precision requested but no CUDA device supports it: training in fp32")
    kwargs: dict[str, Any] = dict(
        output_dir=cfg.work_dir,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        bf16=bf16,
        fp16=fp16,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=cfg.disable_tqdm,
        save_safetensors=True,
        ddp_find_unused_parameters=False,
        torch_compile=cfg.torch_compile or cfg.torch_compile_mode is not None,
        torch_compile_mode=compile_mode(cfg),
        # The filter tests every step's loss for NaN/inf on the host: a device sync per step, and
        # it hides a diverging run behind averaged old losses. Unfiltered, a NaN shows in the log.
        logging_nan_inf_filter=False,
    )
    valid = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5.x renamed gradient_checkpointing (now a deprecated alias) to activation_checkpointing.
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in valid else "gradient_checkpointing"
    kwargs[ckpt_key] = cfg.gradient_checkpointing
    # Without CUDA, transformers sets up DDP under torchrun only when told to run on CPU; otherwise
    # every rank would silently train on the whole dataset.
    kwargs["use_cpu"] = not torch.cuda.is_available()
    # Under DDP an uneven last batch is padded with repeated queries, whose positives would then
    # count as in-batch negatives of their duplicates: drop it instead.
    kwargs["dataloader_drop_last"] = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs.update(overrides)
    # transformers versions differ in which keywords exist; drop the ones this version lacks.
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in valid})


def last_checkpoint(work_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete ``checkpoint-N`` folder in ``work_dir``, or None."""
    path = Path(work_dir)
    if not path.is_dir():
        return None
    found = []
    for child in path.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        # A checkpoint is complete once the trainer state is written (it is written last).
        if m and child.is_dir() and (child / "trainer_state.json").exists():
            found.append((int(m.group(1)), child))
    return str(max(found)[1]) if found else None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _training_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` will train: CUDA when there is one (the Trainer moves it there), else where it is."""
    return torch.device("cuda") if torch.cuda.is_available() else next(model.parameters()).device


def fuse_norms(model: torch.nn.Module) -> int:
    """``fused_norm``: switch ``model``'s sublayer outputs to the fused kernel, saying how many and where."""
    from simlm_core.modeling.fused_norm import fuse_dropout_add_layer_norm, fused_norm_available, fused_norm_verified

    device = _training_device(model)
    if fused_norm_available(device) and not fused_norm_verified(device):  # warns with the reason
        print("[simlm] fused_norm: the kernel failed its self-check: torch's ops stay")
        return 0
    count = fuse_dropout_add_layer_norm(model)
    if count == 0:
        raise ValueError(f"fused_norm: {type(model).__name__} has no BERT-like sublayer outputs "
                         "(dense, dropout, LayerNorm) to fuse")
    where = "the Triton kernel" if fused_norm_available(device) else f"torch ops (no Triton kernel on {device.type})"
    print(f"[simlm] fused_norm: {count} dropout-add-LayerNorm blocks run on {where}")
    return count


def fuse_attention(model: torch.nn.Module) -> int:
    """``fused_attention``: ``model``'s BERT/ELECTRA attention on our Triton kernel, where it runs and
    passes its self-check (else SDPA stays, and this says why); returns how many encoders switched."""
    from simlm_core.modeling.attention_train import training_kernel_verified, use_triton_attention
    from simlm_core.modeling.triton_support import triton_available

    device = _training_device(model)
    if not triton_available(device):
        print(f"[simlm] fused_attention: no Triton kernel on {device.type}: attention stays SDPA")
        return 0
    if not training_kernel_verified(device):  # warns with the reason
        print("[simlm] fused_attention: the kernel failed its self-check: attention stays SDPA")
        return 0
    count = use_triton_attention(model)
    if count == 0:
        raise ValueError(f"fused_attention: {type(model).__name__} has no BERT or ELECTRA encoder")
    print(f"[simlm] fused_attention: {count} encoder(s) attend through the Triton kernel")
    return count


def train_and_save(
    trainer: Trainer,
    cfg: TrainConfig,
    save_model: Callable[[Path], None],
) -> dict[str, Any]:
    """Train (resuming from the last checkpoint in ``cfg.work_dir``), then save atomically.

    ``save_model(tmp_dir)`` writes the final model into a temporary directory that is renamed
    to ``cfg.output_dir`` once complete. The log history is saved beside it as
    ``training_log.json`` so loss curves are part of the artifact.
    """
    if cfg.fused_norm:
        fuse_norms(trainer.model)
    if cfg.fused_attention:
        fuse_attention(trainer.model)
    resume = last_checkpoint(cfg.work_dir)
    if resume:
        print(f"[simlm] resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        with atomic_dir(cfg.output_dir) as tmp:
            save_model(tmp)
            log = {
                "log_history": trainer.state.log_history,
                "global_step": trainer.state.global_step,
                "resumed_from": resume,
                "metrics": result.metrics,
            }
            (tmp / "training_log.json").write_text(json.dumps(log, indent=2))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if trainer.is_world_process_zero():
        # The final model is safely in place: resume checkpoints are no longer needed.
        shutil.rmtree(cfg.work_dir, ignore_errors=True)
    return dict(result.metrics)
