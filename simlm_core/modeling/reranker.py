"""Cross-encoder re-ranker: one relevance score for ``[CLS] query [SEP] passage [SEP]``.

The model is a plain Hugging Face ``AutoModelForSequenceClassification`` with one output
(``num_labels=1``); for the paper it is initialised from ELECTRA-base (discriminator), whose
classification head reads the [CLS] vector. Passages are shown as ``title: text`` (the authors'
format, ``unilm/simlm/src/loaders/cross_encoder_dataloader.py``), and pairs are truncated
``longest_first`` to ``max_len`` tokens as the authors' ``truncation=True`` does: with a short query
that cuts the passage only, and a pathological query longer than the passage is cut too instead of
raising.

Saved checkpoints are ordinary ``save_pretrained`` folders (config, ``model.safetensors``,
tokenizer) so any HF tool loads them.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from simlm_core.io import passage_text
from simlm_core.modeling.packed import PackedBatch, PackedBertEncoder, packed_support
from simlm_core.modeling.sdpa_mask import with_encoder_mask
from simlm_core.tokenized import BackendTokenizer, Tokenized

DEFAULT_MAX_LEN = 192
TITLE_SEPARATOR = ": "


def format_passage(title: str | None, text: str) -> str:
    """How the re-ranker sees a passage: ``title: text`` (just ``text`` without a title)."""
    return passage_text(title, text, sep=TITLE_SEPARATOR)


def tokenize_pairs(tokenizer, queries: Sequence[str], passages: Sequence[str], max_len: int = DEFAULT_MAX_LEN,
                   padding: bool | str = True, pad_to_multiple_of: int | None = None):
    """Tokenise (query, passage) pairs into one padded batch of PyTorch tensors."""
    return tokenizer(
        list(queries),
        list(passages),
        max_length=max_len,
        truncation="longest_first",
        padding=padding,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
    )


def padded_pairs(tokenized: Tokenized, pad_id: int, token_type_ids: bool,
                 pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) tensors of
    ``tokenized``: what :func:`tokenize_pairs` returns for the same pairs."""
    n = len(tokenized)
    lengths = tokenized.lengths
    width = int(lengths.max()) if n else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(rows)) - np.repeat(tokenized.offsets[:-1], lengths)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    ids[rows, cols] = tokenized.ids
    mask = np.zeros((n, width), dtype=np.int64)
    mask[rows, cols] = 1
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if token_type_ids:
        types = np.zeros((n, width), dtype=np.int64)
        if tokenized.type_ids is not None:
            types[rows, cols] = tokenized.type_ids
        out["token_type_ids"] = torch.from_numpy(types)
    return out


# Sequence classifiers whose head reads only the first token: the packed encoder's [CLS] rows suffice.
_FIRST_TOKEN_HEADS = ("BertForSequenceClassification", "ElectraForSequenceClassification")


def packed_scoring_support(model: PreTrainedModel) -> str | None:
    """``None`` if :meth:`CrossEncoder.score_pairs` can score with ``model`` padding-free; else why not."""
    name = type(model).__name__
    if name not in _FIRST_TOKEN_HEADS:
        return f"{name} (packed scoring: {', '.join(_FIRST_TOKEN_HEADS)})"
    return packed_support(model.base_model)


def packed_logits(model: PreTrainedModel, encoder: PackedBertEncoder, batch: PackedBatch) -> torch.Tensor:
    """``model``'s logits for a packed batch: its head on the [CLS] rows of ``encoder`` (built
    from ``model.base_model``), given as ``[N, 1, H]`` since both heads read position 0."""
    first = encoder.encode(batch)[:, None, :]
    if type(model).__name__ == "BertForSequenceClassification":
        return model.classifier(model.dropout(model.bert.pooler(first)))
    return model.classifier(first)


def is_packed(model: torch.nn.Module) -> bool:
    """Whether :func:`pack_encoder_forward` switched ``model`` (unwrapped: not DDP / compiled)."""
    return getattr(getattr(model, "base_model", None), "_packed_encoder", None) is not None


def pack_encoder_forward(model: PreTrainedModel) -> None:
    """Make ``model``'s encoder (``model.base_model``) run padding-free, for training.

    The encoder's ``forward`` is replaced on this instance only by the packed encoder's
    (:class:`~simlm_core.modeling.packed.PackedBertEncoder`, ``trainable=True``: the BERT's dropout,
    gradients to every weight). It returns the [CLS] rows only, as a ``[N, 1, H]`` last hidden
    state plus BERT's pooler output: all that the sequence-classification heads read. The model
    object, its parameters and state dict, the Trainer, DDP and checkpoints stay as they are.
    The switched model also takes ``num_tokens`` (the mask's sum, known to the host: the
    collator's), which packs the batch without a host-device sync.
    """
    reason = packed_scoring_support(model)
    if reason is not None:
        raise ValueError(f"packed training is not available: {reason}")
    base = model.base_model
    packed = PackedBertEncoder(base, pooling="cls", trainable=True)
    pooler = getattr(base, "pooler", None)

    def forward(input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, num_tokens: int | None = None,
                **kwargs: Any) -> BaseModelOutputWithPooling:
        if input_ids is None or inputs_embeds is not None or position_ids is not None:
            raise ValueError("the packed encoder takes input_ids (positions follow the attention mask)")
        if attention_mask is None:
            attention_mask, num_tokens = torch.ones_like(input_ids), input_ids.numel()
        batch = PackedBatch.from_padded(input_ids, attention_mask, token_type_ids, num_tokens)
        first = packed.encode(batch)[:, None, :]
        return BaseModelOutputWithPooling(last_hidden_state=first,
                                          pooler_output=pooler(first) if pooler is not None else None)

    base.forward = forward
    object.__setattr__(base, "_packed_encoder", packed)  # for inspection (its attention); not a submodule


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA devices that support it; a no-op elsewhere (CPU runs fp32)."""
    if bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _flat_pairs(tokenized: Tokenized, token_type_ids: bool) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """A packed batch's host tensors (flat ids, starts, lengths) and its (total tokens, longest)."""
    out = {"ids": torch.from_numpy(tokenized.ids.astype(np.int64)),
           "starts": torch.from_numpy(tokenized.offsets[:-1].copy()),
           "lengths": torch.from_numpy(tokenized.lengths.copy())}
    if token_type_ids and tokenized.type_ids is not None:
        out["type_ids"] = torch.from_numpy(tokenized.type_ids.astype(np.int64))
    longest = int(tokenized.lengths.max()) if len(tokenized) else 0
    return out, (int(tokenized.lengths.sum()), longest)


class CrossEncoder:
    """A sequence-classification model with one logit, plus its tokenizer."""

    def __init__(self, model: PreTrainedModel, tokenizer) -> None:
        if model.config.num_labels != 1:
            raise ValueError(f"a cross-encoder needs num_labels=1, the model has {model.config.num_labels}")
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike[str], **model_kwargs) -> "CrossEncoder":
        """Load a checkpoint or initialise from an encoder (a fresh one-logit head is added then).

        Weights are loaded in fp32 whatever dtype they were saved in (mixed precision is applied at
        run time by autocast, never by storing low-precision master weights).
        """
        name = str(path_or_hub_id)
        model_kwargs.setdefault("dtype", torch.float32)
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name)
        return cls(model, tokenizer)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Plain HF layout: ``config.json``, ``model.safetensors`` and the tokenizer files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @torch.inference_mode()
    def score_pairs(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        batch_size: int = 128,
        max_len: int = DEFAULT_MAX_LEN,
        device: str | torch.device = "auto",
        bf16: bool = True,
        show_progress: bool = True,
        tokenizer_threads: int = 1,
        packed: bool | None = None,
    ) -> np.ndarray:
        """Score each (query, passage) pair; returns float32 scores in input order.

        Pairs are processed longest first in batches of similar length (less padding); bf16
        autocast is used on CUDA only. The next batch is tokenised in a background thread while
        the current one runs. On an H200 (ELECTRA-base size, len 192, bf16) the model alone does
        ~9,200 pairs/s and tokenising through transformers' call was the bottleneck: ~3,400-3,700
        pairs/s end to end with this overlap, ~3,100 without. A fast tokenizer's Rust backend
        (:class:`~simlm_core.tokenized.BackendTokenizer`, same ids) now does it instead, at 2.0x
        the call's rate on a 2-core CPU (11.2-11.5k vs 5.3-5.7k pairs/s, batches of 128); the
        end-to-end GPU rate with it is not measured yet.

        ``packed``: run the encoder padding-free (:mod:`simlm_core.modeling.packed`: each batch's
        tokens in one row, the last layer on [CLS] rows only; BERT and ELECTRA sequence
        classifiers with a fast tokenizer). None: wherever the model allows it.
        """
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        n = len(queries)
        if n == 0:
            return np.empty(0, dtype=np.float32)
        dev = resolve_device(device)
        was_training = self.model.training
        self.model.eval()
        self.model.to(dev)
        # Character length is a cheap proxy for token length: batches of similar lengths.
        order = np.argsort([-(len(q) + len(p)) for q, p in zip(queries, passages)], kind="stable")
        starts = list(range(0, n, batch_size))
        pad_multiple = 8 if dev.type == "cuda" else None
        # Extra threads (each with its own tokenizer copy: a fast tokenizer must not be shared
        # between threads) did not help on an H200: the tokenizer call holds the GIL most of the time.
        workers = max(1, min(tokenizer_threads, len(starts)))
        local = threading.local()

        fast = getattr(self.tokenizer, "backend_tokenizer", None) is not None
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with_types = "token_type_ids" in self.tokenizer.model_input_names
        reason = packed_scoring_support(self.model) if fast else "a slow (non-Rust) tokenizer"
        if packed and reason is not None:
            raise ValueError(f"packed scoring is not available: {reason}")
        # Built per call: its fused q/k/v projection copies the current weights.
        encoder = PackedBertEncoder(self.model.base_model, pooling="cls") if (
            packed or (packed is None and reason is None)) else None

        def model_inputs(host: dict) -> dict:  # the host sees its padding, so transformers need not
            return with_encoder_mask(self.model.config, host, int(host["attention_mask"].sum()))

        def tokenize(start: int):
            idx = order[start:start + batch_size]
            if fast:  # each thread its own backend copy, set up once
                if not hasattr(local, "backend"):
                    local.backend = BackendTokenizer(self.tokenizer, max_len)
                pairs = [(queries[i], passages[i]) for i in idx]
                if encoder is not None:
                    return _flat_pairs(local.backend(pairs), with_types)
                return model_inputs(padded_pairs(local.backend(pairs), pad_id, with_types, pad_multiple)), None
            if not hasattr(local, "tokenizer"):
                local.tokenizer = copy.deepcopy(self.tokenizer) if workers > 1 else self.tokenizer
            return model_inputs(tokenize_pairs(local.tokenizer, [queries[i] for i in idx], [passages[i] for i in idx],
                                               max_len=max_len, pad_to_multiple_of=pad_multiple)), None

        outputs = []
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pending = deque(pool.submit(tokenize, s) for s in starts[:workers + 1])
                submitted = len(pending)
                for _ in tqdm(range(len(starts)), desc="rerank score", unit="batch", disable=not show_progress,
                              mininterval=5):
                    batch = pending.popleft().result()
                    if submitted < len(starts):
                        pending.append(pool.submit(tokenize, starts[submitted]))
                        submitted += 1
                    tensors = {key: v.to(dev, non_blocking=True) for key, v in batch[0].items()}
                    with autocast_context(dev, bf16):
                        if encoder is not None:
                            total, longest = batch[1]
                            logits = packed_logits(self.model, encoder, PackedBatch.from_flat(
                                tensors["ids"], tensors.get("type_ids"), tensors["starts"], tensors["lengths"],
                                total, longest))
                        else:
                            logits = self.model(**tensors).logits
                    outputs.append(logits.view(-1).float())  # stays on the device: no sync per batch
        finally:
            self.model.train(was_training)
        scores = np.empty(n, dtype=np.float32)
        scores[order] = torch.cat(outputs).cpu().numpy()
        return scores
