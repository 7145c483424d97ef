"""Shared Hugging Face Trainer set-up for every training stage (pre-training, retrievers, re-ranker).

One place decides: TrainingArguments from our config, resume from the last checkpoint in a work
directory kept OUTSIDE the stage's declared output (Snakemake deletes declared outputs before a
job starts), and an atomic final save so the output directory appears only when training ended.

Two guards run before any training step:

* Stale checkpoints. The workflow names a work directory by the stage's arguments only, so input
  files regenerated under the same paths (other BM25 parameters, a re-mined negatives table, a
  retrained upstream model) or a fixed bug in the library would otherwise resume a model trained
  on the old inputs or code. :func:`train_and_save` keeps a fingerprint of the inputs and of the
  ``simlm_core`` source (``work_dir/inputs.json``, :data:`FINGERPRINT_FILE`) and discards the
  checkpoints, saying what changed, when it no longer matches.
* World size. ``expected_world_size`` (for the workflow to set from the GPUs the config asks for)
  must equal the number of processes torchrun started, else the global batch silently changes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainingArguments

from simlm_core.io import atomic_dir, write_json

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_CHECKPOINT_ANY_RE = re.compile(r"^(tmp-)?checkpoint-\d+$")  # complete or half-written by a killed job


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
    expected_world_size: int | None = None
    """The number of training processes the configuration expects (the workflow sets the GPUs it
    asks for: ``resources.stage_gpus`` / ``resources.train_gpus``; 0 GPUs means one process). A
    run under any other ``WORLD_SIZE`` fails before training (:func:`check_world_size`), since
    the global batch would change. None: not checked."""


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


def world_size() -> int:
    """The number of training processes (torchrun's ``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _stage_label(cfg: TrainConfig) -> str:
    """A name for the stage in messages: its work directory without the workflow's argument hash."""
    name = Path(cfg.work_dir).name or str(cfg.work_dir)
    return re.sub(r"-[0-9a-f]{10}$", "", name)


def check_world_size(cfg: TrainConfig) -> None:
    """Refuse to train under a ``WORLD_SIZE`` other than ``cfg.expected_world_size`` (None: no check).

    The workflow launches one process per GPU the job was granted, which a profile or the
    scheduler may cap below what the configuration asks for: every per-device batch setting would
    then give another global batch (and another learning-rate-to-batch ratio) without a word.
    """
    if cfg.expected_world_size is None:
        return
    expected = max(1, int(cfg.expected_world_size))
    actual = world_size()
    if actual == expected:
        return
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    raise ValueError(
        f"{_stage_label(cfg)} runs as {actual} process(es) where the config expects {expected} "
        f"(resources.train_gpus / resources.stage_gpus): the global batch would be {per_step * actual} "
        f"instead of {per_step * expected} ({cfg.per_device_train_batch_size} per device x "
        f"{cfg.gradient_accumulation_steps} accumulation step(s) x processes); give the job {expected} GPUs "
        f"(e.g. --resources gpu={expected}) or set the stage's GPU count to {actual}")


def to_training_arguments(cfg: TrainConfig, **overrides: Any) -> TrainingArguments:
    """TrainingArguments for ``cfg``; bf16/fp16 are dropped (with a note) where the device lacks them.
    Checks the world size (:func:`check_world_size`) and the CUDA-graph settings first."""
    check_world_size(cfg)
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


# ---------------------------------------------------------------------------------------------
# Input fingerprint: resume only checkpoints trained on the current inputs and code
FINGERPRINT_FILE = "inputs.json"
"""Written by rank 0 into ``work_dir`` before training starts (see :func:`input_fingerprint`)."""
FINGERPRINT_FORMAT = 1
INPUT_ARG_NAMES = frozenset({"model_name_or_path", "generator", "tokenizer_path", "init", "reference_model"})
"""Arguments naming an input besides those ending in ``_path``."""
MAX_DIR_FILES = 5000
"""An input folder's walk stops after this many files (model folders hold a few dozen)."""


def is_input_arg(name: str) -> bool:
    """Whether argument ``name`` names an input: ``*_path`` or one of :data:`INPUT_ARG_NAMES`."""
    return name.endswith("_path") or name in INPUT_ARG_NAMES


def declared_inputs(cfg: Any) -> dict[str, str]:
    """``cfg``'s input arguments with a path-like value (name -> path), existing or not."""
    if not dataclasses.is_dataclass(cfg):
        return {}
    found = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name, None)
        if is_input_arg(f.name) and isinstance(value, (str, os.PathLike)) and os.fspath(value):
            found[f.name] = os.fspath(value)
    return found


def _path_state(path: str) -> dict[str, Any] | None:
    """An existing local file's size and mtime_ns, or a folder's files' (capped); None: not local."""
    if os.path.isfile(path):
        st = os.stat(path)
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not os.path.isdir(path):
        return None  # a hub id, a keyword ("uniform", "none"), or missing: nothing local to track
    files: list[list[Any]] = []
    truncated = False
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            if len(files) >= MAX_DIR_FILES:
                truncated = True
                break
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:  # vanished while walking
                continue
            files.append([os.path.relpath(full, path), st.st_size, st.st_mtime_ns])
        if truncated:
            break
    state: dict[str, Any] = {"path": path, "files": files}
    if truncated:
        state["truncated"] = True
    return state


def code_fingerprint(cfg: TrainConfig) -> str:
    """sha256 over the library code the stage runs: the module defining ``cfg``'s class (the stage's
    training module, e.g. ``simlm_core.pretraining``), this module, and every ``simlm_core`` module
    they import (:mod:`simlm_core.code_deps`). Editing an unrelated module (the report, say) keeps
    a killed run resumable."""
    from simlm_core.code_deps import core_module_closure

    root = Path(__file__).resolve().parent.parent
    stage = sys.modules[type(cfg).__module__].__file__
    digest = hashlib.sha256()
    for file in core_module_closure([stage, __file__], root):
        digest.update(Path(file).resolve().relative_to(root).as_posix().encode() + b"\0")
        digest.update(Path(file).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def input_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint in ``cfg.work_dir`` was trained from: the state of every input argument
    that is a local file or folder (:func:`declared_inputs`) and its code's hash."""
    inputs = {}
    for name, path in sorted(declared_inputs(cfg).items()):
        state = _path_state(path)
        if state is not None:
            inputs[name] = state
    return {"format": FINGERPRINT_FORMAT, "code": code_fingerprint(cfg), "inputs": inputs}


def fingerprint_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, for a message ([]: they match)."""
    if stored.get("format") != current.get("format"):
        return [f"fingerprint format ({stored.get('format')} -> {current.get('format')})"]
    changes = []
    old, new = stored.get("inputs") or {}, current.get("inputs") or {}
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            where = (new.get(name) or old.get(name) or {}).get("path", "?")
            changes.append(f"{name} ({where})")
    if stored.get("code") != current.get("code"):
        changes.append("simlm_core code")
    return changes


def read_fingerprint(work_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The fingerprint stored in ``work_dir`` (None: none there); an unreadable one reads as ``{}``."""
    path = Path(work_dir) / FINGERPRINT_FILE
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def write_fingerprint(work_dir: str | os.PathLike[str], fingerprint: dict[str, Any]) -> None:
    """Write ``fingerprint`` to ``work_dir/inputs.json`` atomically (temporary file, then rename)."""
    write_json(fingerprint, Path(work_dir) / FINGERPRINT_FILE)


def discard_checkpoints(work_dir: str | os.PathLike[str]) -> int:
    """Delete every ``checkpoint-N`` (and half-written ``tmp-checkpoint-N``) folder in ``work_dir``;
    other contents (e.g. pre-training's corpus cache, keyed by the corpus itself) stay."""
    path = Path(work_dir)
    if not path.is_dir():
        return 0
    stale = [child for child in path.iterdir() if _CHECKPOINT_ANY_RE.match(child.name) and child.is_dir()]
    for child in stale:
        shutil.rmtree(child, ignore_errors=True)
    return len(stale)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def resume_checkpoint(cfg: TrainConfig, main_process: bool | None = None) -> str | None:
    """The checkpoint to resume from, after checking the inputs' fingerprint (None: start fresh).

    Every rank decides from the same files: the newest checkpoint and the stored fingerprint.
    * They match: resume.
    * They differ (an input file or folder changed, or the ``simlm_core`` code): print one line
      naming what changed, then rank 0 deletes the stale checkpoints: training starts fresh.
    * No fingerprint file (a work directory of a version before this check): resume as before,
      with a note; the fingerprint is written from now on.
    Then rank 0 writes the current fingerprint. Ranks wait for each other (when torch.distributed
    is initialised) after deciding and after rank 0 wrote, so no rank reads a file rank 0 changed.
    """
    if main_process is None:
        main_process = is_main_process()
    current = input_fingerprint(cfg)
    resume = last_checkpoint(cfg.work_dir)
    stored = read_fingerprint(cfg.work_dir)
    stale = False
    if resume is not None:
        if stored is None:
            if main_process:
                print(f"[simlm] {cfg.work_dir} has no {FINGERPRINT_FILE} (checkpoints of an older version): "
                      "resuming without checking the inputs")
        else:
            changes = fingerprint_changes(stored, current) if stored else ["fingerprint file unreadable"]
            if changes:
                stale = True
                if main_process:
                    print(f"[simlm] not resuming {Path(resume).name}: changed since the checkpoints in "
                          f"{cfg.work_dir} were written: {', '.join(changes)}; discarding them, training from scratch")
    _barrier()  # every rank has decided before rank 0 touches the work directory
    if main_process:
        if stale:
            discard_checkpoints(cfg.work_dir)
        if stored != current:
            write_fingerprint(cfg.work_dir, current)
    _barrier()
    return None if stale else resume


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

    First :func:`check_world_size`; a checkpoint is resumed only while the inputs and code it was
    trained from are unchanged (:func:`resume_checkpoint`, fingerprint in ``work_dir/inputs.json``).

    ``save_model(tmp_dir)`` writes the final model into a temporary directory that is renamed
    to ``cfg.output_dir`` once complete. The log history is saved beside it as
    ``training_log.json`` so loss curves are part of the artifact.
    """
    check_world_size(cfg)
    if cfg.fused_norm:
        fuse_norms(trainer.model)
    if cfg.fused_attention:
        fuse_attention(trainer.model)
    resume = resume_checkpoint(cfg, trainer.is_world_process_zero())
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
    _barrier()
    if trainer.is_world_process_zero():
        # The final model is safely in place: resume checkpoints are no longer needed.
        shutil.rmtree(cfg.work_dir, ignore_errors=True)
    return dict(result.metrics)
