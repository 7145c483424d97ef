"""Re-ranker training: groups of 1 positive + (G-1) hard negatives, listwise CE, R-Drop.

What the authors do (``unilm/simlm/src``: ``loaders/cross_encoder_dataloader.py``,
``models/cross_encoder_model.py``, ``scripts/train_reranker_marco.sh``), and how it maps here:

* Each training query gives one group: one of its positives followed by ``G-1`` of its mined
  negatives, re-drawn every epoch (theirs: a rotating slice seeded by ``seed + epoch``; ours: a
  seeded draw without replacement, a pure function of ``(seed, epoch, row)`` so a resumed job sees
  the same groups). A query with fewer than ``G-1`` negatives is filled with random corpus passages
  (counted in the returned statistics); queries with no positive are dropped (counted).
* Loss: softmax cross-entropy over the group's ``G`` scores with the positive at index 0.
* R-Drop: the batch is run twice in one forward (two dropout masks); loss = mean of the two CE
  terms + ``rdrop_alpha`` x symmetric KL between the two group distributions
  (``0.5 * (KL(p1||p2) + KL(p2||p1))``, summed over the group, mean over queries). The authors'
  weight is an implicit 1.0 (``--rerank_use_rdrop True``); ``rdrop_alpha=0`` disables it (one
  forward pass, plain CE).
* ``forward_factor`` (their ``--rerank_forward_factor 4``): score all ``G`` passages without
  gradients in eval mode, keep the positive and the ``G/forward_factor - 1`` highest-scoring
  negatives, and train on that smaller group only. 1 (the default) trains on the whole group as
  DESIGN.md §4 describes; set 4 to match the authors' MS MARCO run (it also cuts activation memory
  four-fold).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, set_seed

from simlm_core.io import NEGATIVES_SCHEMA, InputError, PassageStore, load_queries
from simlm_core.modeling.reranker import (
    DEFAULT_MAX_LEN,
    CrossEncoder,
    format_passage,
    is_packed,
    pack_encoder_forward,
    tokenize_pairs,
)
from simlm_core.modeling.sdpa_mask import with_encoder_mask
from simlm_core.training import TrainConfig, check_packed_training, to_training_arguments, train_and_save

try:  # the shared loss module (another engineer's); same contract: scores [B, G], positive at 0
    from simlm_core.losses import listwise_ce as _shared_listwise_ce
except ImportError:  # pragma: no cover - depends on the tree's state
    _shared_listwise_ce = None


def listwise_ce(scores: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of each row of ``scores`` [B, G] with the positive at index 0."""
    scores = scores.float()
    if _shared_listwise_ce is not None:
        return _shared_listwise_ce(scores)
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def rdrop_kl(scores1: torch.Tensor, scores2: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between the group distributions of two passes: 0.5 (KL(p1||p2) + KL(p2||p1)).

    Summed over the group, averaged over queries (``batchmean``), as the authors compute it.
    """
    lp1 = torch.log_softmax(scores1.float(), dim=-1)
    lp2 = torch.log_softmax(scores2.float(), dim=-1)
    kl12 = F.kl_div(lp2, lp1, reduction="batchmean", log_target=True)  # KL(p1 || p2)
    kl21 = F.kl_div(lp1, lp2, reduction="batchmean", log_target=True)  # KL(p2 || p1)
    return 0.5 * (kl12 + kl21)


# ---------------------------------------------------------------------------------------------
# Arguments
@dataclass
class RerankerTrainArgs(TrainConfig):
    """Re-ranker training (DESIGN.md §4): shared TrainConfig fields plus the re-ranker's own."""

    model_name_or_path: str = field(kw_only=True)
    """Initialisation: the paper uses google/electra-base-discriminator."""
    corpus_path: str = field(kw_only=True)
    queries_path: str = field(kw_only=True)
    """Training queries (qid, text)."""
    negatives_path: str = field(kw_only=True)
    """Negatives table (qid, positives, negatives)."""
    train_group_size: int = 64
    """Passages per query: 1 positive + (train_group_size - 1) negatives."""
    max_len: int = DEFAULT_MAX_LEN
    """Tokens for the whole [CLS] q [SEP] p [SEP] pair."""
    rdrop_alpha: float = 1.0
    """Weight of the R-Drop symmetric KL; the authors' effective weight is 1.0; 0 disables R-Drop."""
    forward_factor: int = 1
    """Train on the top G/forward_factor of each group (positive always kept); authors use 4."""
    packed_training: bool = False
    """Run the encoder padding-free (BERT / ELECTRA; simlm_core.modeling.packed): the same model
    and loss without the padding's compute. Not with CUDA graphs (each batch has its own size)."""
    # Overrides of shared defaults with the paper's re-ranker values (train_reranker_marco.sh).
    learning_rate: float = 3e-5
    per_device_train_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.train_group_size < 2:
            raise ValueError(f"train_group_size must be >= 2 (1 positive + negatives), got {self.train_group_size}")
        if self.forward_factor < 1:
            raise ValueError(f"forward_factor must be >= 1, got {self.forward_factor}")
        if self.rdrop_alpha < 0:
            raise ValueError(f"rdrop_alpha must be >= 0, got {self.rdrop_alpha}")
        check_packed_training(self, self.packed_training)


def trained_group_size(group_size: int, forward_factor: int) -> int:
    """How many passages per query get gradients: G // forward_factor, at least 2."""
    return max(2, group_size // forward_factor)


# ---------------------------------------------------------------------------------------------
# Data
def read_negatives_table(path: str | Path) -> pa.Table:
    """The negatives table as one-chunk Arrow columns (no per-pid Python objects)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(path, f"cannot read negatives Parquet: {e}") from e
    missing = [f.name for f in NEGATIVES_SCHEMA if f.name not in table.column_names]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; has {table.column_names}")
    table = table.select([f.name for f in NEGATIVES_SCHEMA]).cast(NEGATIVES_SCHEMA).combine_chunks()
    if table.column("qid").null_count:
        raise InputError(path, "null qid")
    return table


class RerankerGroupDataset(Dataset):
    """One item per training query: its text and a group of G passages, positive first.

    The group of row ``i`` in epoch ``e`` depends only on ``(seed, e, i)``; the Trainer sets the
    epoch (``set_epoch``, and :class:`EpochCallback` for multi-process runs).
    """

    def __init__(self, negatives_path: str | Path, queries_path: str | Path, corpus_path: str | Path,
                 group_size: int, seed: int = 42) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        self.group_size = group_size
        self.seed = int(seed)
        self.epoch = 0
        table = read_negatives_table(negatives_path)
        n_pos = pc.fill_null(pc.list_value_length(table.column("positives")), 0)
        keep = pc.greater(n_pos, 0)
        self.dropped_no_positive = int(table.num_rows - pc.sum(keep).as_py()) if table.num_rows else 0
        table = table.filter(keep).combine_chunks()
        if table.num_rows == 0:
            raise InputError(negatives_path, "no query has a positive passage")
        self.qids = table.column("qid").chunk(0)
        self.positives = table.column("positives").chunk(0)
        self.negatives = table.column("negatives").chunk(0)
        n_neg = np.asarray(pc.fill_null(pc.list_value_length(self.negatives), 0).to_numpy(zero_copy_only=False))
        shortfall = np.maximum(0, (group_size - 1) - n_neg)
        self.queries_short_of_negatives = int((shortfall > 0).sum())
        self.random_fill_per_epoch = int(shortfall.sum())

        self.queries = load_queries(queries_path)
        missing = [q for q in self.qids.to_pylist() if q not in self.queries]
        if missing:
            raise InputError(queries_path, f"{len(missing)} qid(s) of {negatives_path} have no query text, "
                                           f"e.g. {missing[:5]}")
        self.store = PassageStore(corpus_path)
        self._corpus_pids = self.store.table.column("pid")

    def __len__(self) -> int:
        return len(self.qids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def stats(self) -> dict[str, int]:
        return {
            "train_queries": len(self),
            "dropped_no_positive": self.dropped_no_positive,
            "queries_short_of_negatives": self.queries_short_of_negatives,
            "random_fill_per_epoch": self.random_fill_per_epoch,
        }

    def sample_group(self, idx: int, epoch: int | None = None) -> tuple[str, list[str]]:
        """(qid, [positive, negative_1, ..., negative_{G-1}]) for row ``idx`` in ``epoch``."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, int(idx)])
        qid = self.qids[idx].as_py()
        positives = self.positives[idx].as_py()
        pos = positives[int(rng.integers(len(positives)))]
        excluded = set(positives)
        negs = []
        for p in self.negatives[idx].as_py() or []:
            if p not in excluded:
                excluded.add(p)
                negs.append(p)
        need = self.group_size - 1
        if len(negs) >= need:
            chosen = [negs[i] for i in rng.choice(len(negs), size=need, replace=False)]
        else:
            chosen = [negs[i] for i in rng.permutation(len(negs))]
            chosen += self._random_fill(rng, need - len(chosen), excluded)
        return qid, [pos] + chosen

    def _random_fill(self, rng: np.random.Generator, count: int, excluded: set[str]) -> list[str]:
        out: list[str] = []
        n = len(self._corpus_pids)
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 100 * count + 100:
                raise ValueError(f"corpus {self.store.path} has too few passages to fill a group of "
                                 f"{self.group_size} (needed {count} more)")
            pid = self._corpus_pids[int(rng.integers(n))].as_py()
            if pid not in excluded:
                excluded.add(pid)
                out.append(pid)
        return out

    def __getitem__(self, idx: int) -> dict[str, Any]:
        qid, pids = self.sample_group(idx)
        passages = [format_passage(t, x) for t, x in self.store.get(pids)]
        return {"qid": qid, "query": self.queries[qid], "pids": pids, "passages": passages}


class GroupCollator:
    """Flatten B groups of G passages into one tokenised batch of B*G pairs (group-major)."""

    def __init__(self, tokenizer, max_len: int = DEFAULT_MAX_LEN) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        sizes = {len(f["passages"]) for f in features}
        if len(sizes) != 1:
            raise ValueError(f"groups of unequal size in one batch: {sorted(sizes)}")
        queries = [f["query"] for f in features for _ in f["passages"]]
        passages = [p for f in features for p in f["passages"]]
        batch = dict(tokenize_pairs(self.tokenizer, queries, passages, max_len=self.max_len))
        batch["labels"] = torch.zeros(len(features), dtype=torch.long)  # positive at index 0
        # known here for free; spares packed_training a host-device sync per forward
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch


class EpochCallback(TrainerCallback):
    """Tell the dataset the epoch at each epoch start (accelerate only does this single-process)."""

    def __init__(self, dataset: RerankerGroupDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is e exactly at the start of epoch e, and e + fraction when resuming inside it.
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-9)))
        return control


# ---------------------------------------------------------------------------------------------
# Loss
def _token_count(num_tokens: int | None) -> dict[str, int]:
    """The keyword a packed model takes for the host's token count; none for other models."""
    return {} if num_tokens is None else {"num_tokens": num_tokens}


def group_loss(model: torch.nn.Module, inputs: dict[str, Any], rdrop_alpha: float = 1.0,
               forward_factor: int = 1, selector: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Loss of one batch of B groups (rows group-major, positive first; ``labels`` holds B zeros).

    Returns ``loss``, ``ce``, ``rdrop`` (0 when off) and ``scores`` [B, G'] of the (first) pass.
    R-Drop applies when ``rdrop_alpha > 0`` and the model is in training mode. ``selector`` is
    the unwrapped model used for the gradient-free top-k pass (defaults to ``model``).
    ``inputs["num_tokens"]`` (the collator's count of real tokens, optional) reaches a packed
    model (:func:`~simlm_core.modeling.reranker.pack_encoder_forward`), sparing it a sync; after a
    ``forward_factor`` selection the kept rows' count is data, so a packed model reads it back once.
    """
    labels = inputs["labels"]
    enc = {k: v for k, v in inputs.items() if k not in ("labels", "num_tokens")}
    unwrapped = selector if selector is not None else model
    if is_packed(unwrapped):
        num_tokens = inputs.get("num_tokens")
    else:  # a mask transformers need not read back (a sync per forward)
        num_tokens = None
        enc = with_encoder_mask(getattr(unwrapped, "config", None), enc, inputs.get("num_tokens"))
    batch = labels.shape[0]
    n_rows = enc["input_ids"].shape[0]
    if n_rows % batch:
        raise ValueError(f"{n_rows} pairs do not split into {batch} equal groups")
    group = n_rows // batch

    keep = trained_group_size(group, forward_factor) if forward_factor > 1 else group
    if keep < group:
        selector = unwrapped
        was_training = selector.training
        selector.eval()
        with torch.no_grad():
            full = selector(**enc, **_token_count(num_tokens)).logits.view(batch, group).float()
            full[:, 0] = float("inf")  # the positive always stays, first
            top = torch.topk(full, k=keep, dim=1, largest=True, sorted=True).indices
            rows = (top + group * torch.arange(batch, device=top.device).unsqueeze(1)).view(-1)
        selector.train(was_training)
        enc = {k: v.index_select(0, rows) for k, v in enc.items()}
        group = keep
        num_tokens = None  # the kept rows' tokens are counted on the device

    if rdrop_alpha > 0 and model.training:
        doubled = {k: torch.cat([v, v], dim=0) for k, v in enc.items()}
        scores = model(**doubled, **_token_count(None if num_tokens is None else 2 * num_tokens)).logits
        scores = scores.view(2, batch, group)
        s1, s2 = scores[0], scores[1]
        ce = 0.5 * (listwise_ce(s1) + listwise_ce(s2))
        rdrop = rdrop_kl(s1, s2)
        loss = ce + rdrop_alpha * rdrop
    else:
        s1 = model(**enc, **_token_count(num_tokens)).logits.view(batch, group)
        ce = listwise_ce(s1)
        rdrop = torch.zeros((), device=ce.device)
        loss = ce
    return {"loss": loss, "ce": ce, "rdrop": rdrop, "scores": s1}


class RerankerTrainer(Trainer):
    """HF Trainer whose loss is :func:`group_loss`; logs the CE, R-Drop and group accuracy too."""

    loss_is_scaled_for_ga = False  # our loss is a per-batch mean

    def __init__(self, *args, rdrop_alpha: float = 1.0, forward_factor: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rdrop_alpha = rdrop_alpha
        self.forward_factor = forward_factor
        self._sums: dict[str, torch.Tensor | float] = dict.fromkeys(("ce_loss", "rdrop_loss", "group_acc"), 0.0)
        self._count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = group_loss(model, inputs, self.rdrop_alpha, self.forward_factor,
                         selector=self.accelerator.unwrap_model(model))
        if model.training:  # accumulated on the device: no host sync per step
            self._sums["ce_loss"] = self._sums["ce_loss"] + out["ce"].detach()
            self._sums["rdrop_loss"] = self._sums["rdrop_loss"] + out["rdrop"].detach()
            acc = (out["scores"].detach().argmax(dim=1) == 0).float().mean()
            self._sums["group_acc"] = self._sums["group_acc"] + acc
            self._count += 1
        return (out["loss"], {"scores": out["scores"]}) if return_outputs else out["loss"]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._count:
            for k, v in self._sums.items():
                logs[k] = round(float(v) / self._count, 6)
            self._sums = dict.fromkeys(self._sums, 0.0)
            self._count = 0
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Entry point
def train_reranker(args: RerankerTrainArgs) -> dict[str, Any]:
    """Train the cross-encoder, resuming from ``args.work_dir``; the model lands in ``args.output_dir``."""
    started = time.time()
    set_seed(args.seed)  # the fresh classification head is initialised reproducibly
    encoder = CrossEncoder.from_pretrained(args.model_name_or_path)
    if args.packed_training:
        pack_encoder_forward(encoder.model)
    dataset = RerankerGroupDataset(args.negatives_path, args.queries_path, args.corpus_path,
                                   group_size=args.train_group_size, seed=args.seed)
    stats = dataset.stats()
    print(f"[simlm] re-ranker training data: {json.dumps(stats)}")
    if stats["queries_short_of_negatives"]:
        print(f"[simlm] {stats['queries_short_of_negatives']} queries have fewer than "
              f"{args.train_group_size - 1} negatives: {stats['random_fill_per_epoch']} random corpus "
              "passages fill their groups each epoch")
    training_args = to_training_arguments(args, label_names=["labels"])
    trainer = RerankerTrainer(
        model=encoder.model,
        args=training_args,
        train_dataset=dataset,
        data_collator=GroupCollator(encoder.tokenizer, args.max_len),
        processing_class=encoder.tokenizer,
        callbacks=[EpochCallback(dataset)],
        rdrop_alpha=args.rdrop_alpha,
        forward_factor=args.forward_factor,
    )

    def save(directory: Path) -> None:
        encoder.save_pretrained(directory)
        (directory / "reranker_args.json").write_text(
            json.dumps({"args": dataclasses.asdict(args), "data": stats}, indent=2, sort_keys=True))

    metrics = train_and_save(trainer, args, save)
    return {**metrics, **stats, "global_step": trainer.state.global_step,
            "wall_seconds": round(time.time() - started, 2)}
