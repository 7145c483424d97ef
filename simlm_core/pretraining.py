"""SimLM pre-training data and training: passages -> two masked copies -> RLM loss (DESIGN.md §4).

Data and masking, as the authors' code does it (microsoft/unilm ``simlm/``) and as we follow it:

* **Input text** (``src/collators/rlm_collator.py``, ``src/loaders/rlm_dataloader.py``): each
  passage is tokenised on the fly in the collator as the pair ``(title, contents)``, i.e.
  ``[CLS] title [SEP] text [SEP]`` with token types 0/1, truncated (longest first) to
  ``--rlm_max_length 144``, padded per batch. Ours: same (``title_as_pair=True``; ``False`` gives
  the single segment of :func:`simlm_core.io.passage_text`). Passages are read from a memory-mapped
  Arrow IPC copy of the corpus Parquet (built once, streamed), never as Python objects; the
  Trainer's sampler shuffles them (the authors use a map-style ``datasets`` table the same way).
* **How masks are drawn** (``src/collators/collator_utils.py`` ``whole_word_mask``): whole-word
  masking (a word = a token plus its following ``##`` pieces; [CLS]/[SEP] never candidates), a
  *fixed count* per passage ``min(512, max(1, round(len(tokens) * rate)))`` where ``len`` counts
  the special tokens too, words taken in random order and skipped when they would overshoot the
  count. We do the same (:func:`whole_word_masks`); every special token id (incl. ``[UNK]``) is
  excluded from the candidates (the authors let ``[UNK]`` use up budget and then unmask it), and a
  rate of 0 masks nothing (theirs still masks one token).
* **Two masks** (``rlm_collator.py``): the encoder mask at ``rlm_encoder_mask_prob`` = 0.3; the
  decoder mask is NOT drawn independently there: it is the encoder mask OR a second, independent
  whole-word mask at ``(p_dec - p_enc) / (1 - p_enc)`` = 0.2857, so that the decoder's marginal
  rate is 0.5 and every encoder-masked token is also decoder-masked ("overlapping mask").
  ``decoder_mask_mode="nested"`` (our default) follows this; ``"independent"`` draws the decoder
  mask on its own at 0.5, as the paper's text (and DESIGN.md §4) describe it.
* **80/10/10 or not** (``torch_mask_tokens``; ``train_rlm.sh --all_use_mask_token True``): all
  masked positions become ``[MASK]`` before the generator sees them; no 80/10/10. Ours:
  ``all_use_mask_token=True`` (``False`` restores BERT's 80/10/10 in the masked copies).
* **Labels** (``rlm_collator.py``): ``labels = clean_input_ids`` with every special token id set
  to -100, for both heads. Same here. With ``generator="none"`` (our plain-MLM ablation, not in the
  authors' code) ``label_positions="auto"`` restricts each head's labels to its own masked
  positions, as BERT's MLM does; set ``label_positions="all"`` to keep all-token labels there too.
* **Replacement**: done inside the model's forward by the frozen generator (see
  :mod:`simlm_core.modeling.pretrain`), as the authors do; the collator only masks.
* **Optimisation** (``train_rlm.sh``): bert-base-uncased init, 64 per GPU x 4 accumulation x 8
  GPUs, lr 3e-4 linear decay, warmup 4000, weight decay 0, 80k steps, fp16, seed 45678, a
  checkpoint every 10k steps (20 kept). Our :class:`PretrainArgs` defaults are those numbers;
  precision (bf16/fp16) and the number of checkpoints kept stay with :class:`TrainConfig`.

The generator stand-in (:func:`train_generator`): a small ``BertForMaskedLM`` trained with the
standard 15% BERT masking (``DataCollatorForLanguageModeling``: 80/10/10) on the same corpus and
tokenizer, saved as an HF folder; ``AutoModelForMaskedLM`` loads it exactly as it loads
``google/electra-base-generator`` (hidden 256 = 1/3 of BERT-base, 12 layers).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Trainer

from simlm_core.io import corpus_arrow_cache, iter_corpus_batches, passage_text
from simlm_core.modeling.sdpa_mask import with_encoder_mask
from simlm_core.training import (
    TrainConfig,
    check_packed_training,
    mode_uses_cuda_graphs,
    to_training_arguments,
    train_and_save,
    uses_cuda_graphs,
)

logger = logging.getLogger(__name__)

MAX_PREDICTIONS = 512  # whole_word_mask(max_predictions=512) in the authors' collator


# ---------------------------------------------------------------------------------------------
# Passages: a memory-mapped Arrow copy of the corpus
class PassageDataset(torch.utils.data.Dataset):
    """Map-style passages over a memory-mapped Arrow file: ``{"title": str, "text": str}``."""

    def __init__(self, arrow_path: str | os.PathLike[str]) -> None:
        self.arrow_path = str(arrow_path)
        self._table: pa.Table | None = None
        self._len = self.table.num_rows

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = ipc.open_file(pa.memory_map(self.arrow_path, "r")).read_all()
        return self._table

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:  # workers reopen the map instead of pickling data
        return {"arrow_path": self.arrow_path, "_table": None, "_len": self._len}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, str]]:
        sub = self.table.take(pa.array(list(indices), type=pa.int64()))
        titles = sub.column("title").to_pylist()
        texts = sub.column("text").to_pylist()
        return [{"title": t or "", "text": x or ""} for t, x in zip(titles, texts)]

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.__getitems__([index])[0]

    def text_lengths(self) -> list[int]:
        """Each passage's length in characters (title + text): a stand-in for its token count,
        read from the Arrow columns without tokenising (8.8M passages: one list of ints)."""
        table = self.table
        title = pc.fill_null(pc.utf8_length(table.column("title")), 0)
        text = pc.fill_null(pc.utf8_length(table.column("text")), 0)
        return pc.add(title, text).to_pylist()


def tokenize_passages(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    max_len: int,
    title_as_pair: bool = True,
    pad_to_multiple_of: int | None = None,
    pad_to_max_len: bool = False,
) -> dict[str, torch.Tensor]:
    """``[CLS] title [SEP] text [SEP]`` (or one segment), truncated and padded to the batch
    (``pad_to_max_len``: to ``max_len``, one shape for every batch)."""
    titles = [ex.get("title") or "" for ex in examples]
    texts = [ex.get("text") or "" for ex in examples]
    padding = "max_length" if pad_to_max_len else True
    if title_as_pair:
        enc = tokenizer(titles, texts, truncation=True, max_length=max_len, padding=padding,
                        pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
    else:
        enc = tokenizer([passage_text(t, x) for t, x in zip(titles, texts)], truncation=True,
                        max_length=max_len, padding=padding, pad_to_multiple_of=pad_to_multiple_of,
                        return_tensors="pt")
    out = {k: enc[k] for k in ("input_ids", "attention_mask")}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    return out


# ---------------------------------------------------------------------------------------------
# Masking
def continuation_table(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """``table[id]`` is True for WordPiece continuation pieces (``##...``)."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(max(vocab.values()) + 1, len(tokenizer)), dtype=torch.bool)
    for token, idx in vocab.items():
        if token.startswith("##"):
            table[idx] = True
    return table


def whole_word_masks(
    candidates: torch.Tensor,
    continuation: torch.Tensor,
    lengths: torch.Tensor,
    rate: float,
    whole_word: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean masks (B, L), one whole-word mask per row, as in the authors' ``whole_word_mask``.

    ``candidates``: positions that may be masked (not special, not padding); ``continuation``:
    positions holding a ``##`` piece; ``lengths``: each row's unpadded length (special tokens
    included), which sets the count ``min(512, max(1, round(length * rate)))``.
    """
    B, L = candidates.shape
    masks = torch.zeros(B, L, dtype=torch.bool)
    if rate <= 0:
        return masks
    cand = candidates.cpu().numpy()
    cont = continuation.cpu().numpy() if whole_word else np.zeros_like(cand)
    lens = lengths.cpu().tolist()
    out = masks.numpy()
    for b in range(B):
        pos = np.flatnonzero(cand[b])
        if pos.size == 0:
            continue
        # A word starts at a candidate that is not a ## piece or that follows a non-candidate.
        starts = ~cont[b, pos] | np.r_[True, np.diff(pos) != 1]
        word_start = np.flatnonzero(starts)
        word_len = np.diff(np.r_[word_start, pos.size])
        target = min(MAX_PREDICTIONS, max(1, round(lens[b] * rate)))
        order = torch.randperm(word_start.size, generator=generator).numpy()
        count = 0
        for w in order:
            if count >= target:
                break
            n = int(word_len[w])
            if count + n > target:
                continue
            s = word_start[w]
            out[b, pos[s:s + n]] = True
            count += n
    return masks


@dataclass
class RLMCollator:
    """Tokenises passages and draws the encoder and decoder masks (DESIGN.md §4).

    Returns ``encoder_input_ids`` / ``decoder_input_ids`` (masked copies: ``[MASK]`` at masked
    positions), ``encoder_mlm_mask`` / ``decoder_mlm_mask`` (where the model's generator samples),
    ``attention_mask``, ``token_type_ids``, ``labels`` (original ids at every non-special,
    non-padding position; -100 elsewhere) and ``num_tokens`` (a Python int: the real tokens).
    """

    tokenizer: PreTrainedTokenizerBase
    max_len: int = 144
    encoder_mask_rate: float = 0.3
    decoder_mask_rate: float = 0.5
    decoder_mask_mode: str = "nested"
    whole_word_mask: bool = True
    all_use_mask_token: bool = True
    title_as_pair: bool = True
    pad_to_multiple_of: int | None = None
    pad_to_max_len: bool = False
    """Pad every batch to ``max_len``: one input shape, as CUDA-graph replay needs."""

    def __post_init__(self) -> None:
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs [MASK] and [PAD] tokens")
        for name in ("encoder_mask_rate", "decoder_mask_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if self.decoder_mask_mode not in ("nested", "independent"):
            raise ValueError("decoder_mask_mode must be 'nested' (authors' code) or 'independent'")
        if self.decoder_mask_mode == "nested" and self.decoder_mask_rate < self.encoder_mask_rate:
            raise ValueError("decoder_mask_mode='nested' needs decoder_mask_rate >= encoder_mask_rate")
        self._continuation = continuation_table(self.tokenizer)
        self._special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)

    def _apply(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = input_ids.clone()
        if self.all_use_mask_token:
            out[mask] = self.tokenizer.mask_token_id
            return out
        # BERT's 80% [MASK] / 10% random token / 10% unchanged
        r = torch.rand(input_ids.shape)
        out[mask & (r < 0.8)] = self.tokenizer.mask_token_id
        rand_pos = mask & (r >= 0.8) & (r < 0.9)
        out[rand_pos] = torch.randint(len(self.tokenizer), (int(rand_pos.sum()),))
        return out

    def __call__(self, examples: Sequence[dict[str, str]]) -> dict[str, Any]:
        batch = tokenize_passages(self.tokenizer, examples, self.max_len, self.title_as_pair, self.pad_to_multiple_of,
                                  self.pad_to_max_len)
        ids, attn = batch["input_ids"], batch["attention_mask"].bool()
        special = torch.isin(ids, self._special_ids)
        candidates = attn & ~special
        cont = self._continuation[ids.clamp(max=self._continuation.numel() - 1)]
        lengths = attn.sum(1)

        enc_mask = whole_word_masks(candidates, cont, lengths, self.encoder_mask_rate, self.whole_word_mask)
        if self.decoder_mask_mode == "nested":
            extra = (self.decoder_mask_rate - self.encoder_mask_rate) / (1.0 - self.encoder_mask_rate)
            dec_mask = enc_mask.clone()
            if extra > 1e-4:
                dec_mask |= whole_word_masks(candidates, cont, lengths, extra, self.whole_word_mask)
        else:
            dec_mask = whole_word_masks(candidates, cont, lengths, self.decoder_mask_rate, self.whole_word_mask)

        out = {
            "encoder_input_ids": self._apply(ids, enc_mask),
            "decoder_input_ids": self._apply(ids, dec_mask),
            "attention_mask": batch["attention_mask"],
            "labels": ids.masked_fill(~candidates, -100),
            "encoder_mlm_mask": enc_mask,
            "decoder_mlm_mask": dec_mask,
            # known here for free; spares packed_training a host-device sync per step
            "num_tokens": int(attn.sum()),
        }
        if "token_type_ids" in batch:
            out["token_type_ids"] = batch["token_type_ids"]
        return out


def corpus_unigram_counts(
    corpus_path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    max_passages: int | None = 100_000,
    max_len: int = 512,
    batch_size: int = 2_000,
) -> torch.Tensor:
    """Token frequencies over the first ``max_passages`` passages (streamed)."""
    vocab = len(tokenizer)
    counts = np.zeros(vocab, dtype=np.int64)
    seen = 0
    for batch in iter_corpus_batches(corpus_path, batch_size=batch_size):
        titles = batch.column("title").to_pylist()
        texts = batch.column("text").to_pylist()
        if max_passages is not None:
            titles, texts = titles[: max_passages - seen], texts[: max_passages - seen]
        enc = tokenizer([passage_text(t, x or "") for t, x in zip(titles, texts)], truncation=True,
                        max_length=max_len, add_special_tokens=False)
        for ids in enc["input_ids"]:
            counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab)[:vocab]
        seen += len(texts)
        if max_passages is not None and seen >= max_passages:
            break
    return torch.from_numpy(counts)


# ---------------------------------------------------------------------------------------------
# Arguments
@dataclass(kw_only=True)
class PretrainArgs(TrainConfig):
    """SimLM replaced-language-modelling pre-training (defaults: the authors' train_rlm.sh)."""

    corpus_path: str
    model_name_or_path: str = "bert-base-uncased"
    """Initial encoder: a BERT MLM (hub id / HF folder) or a SimLM checkpoint (continues it)."""
    tokenizer_name_or_path: str | None = None
    """Defaults to model_name_or_path."""
    generator: str = "google/electra-base-generator"
    """An MLM folder / hub id (frozen generator), "uniform", "unigram" or "none" (plain MLM)."""
    max_len: int = 144
    encoder_mask_rate: float = 0.3
    decoder_mask_rate: float = 0.5
    decoder_mask_mode: str = "nested"
    """"nested" (authors' code: decoder mask = encoder mask + extra) or "independent"."""
    whole_word_mask: bool = True
    all_use_mask_token: bool = True
    title_as_pair: bool = True
    decoder_layers: int = 2
    use_decoder: bool = True
    encoder_loss_weight: float = 1.0
    decoder_loss_weight: float = 1.0
    label_positions: str = "auto"
    """"all" (RLM: every non-special token), "masked" (BERT MLM), "auto": masked iff generator=none."""
    unigram_max_passages: int = 100_000
    packed_training: bool = False
    """Run encoder and decoder padding-free (simlm_core.modeling.packed): the same model and losses
    without the padding's compute; the generator still reads padded batches. Not with CUDA graphs."""
    group_by_length: bool = False
    """Batches of passages of similar length (transformers' LengthGroupedSampler: shuffled, then
    sorted by length within mega-batches of 50 batches), so padded batches carry little padding.
    Off by default: the authors sample passages at random. Pointless with CUDA graphs (every
    batch is padded to max_len)."""
    # TrainConfig fields with the authors' values (train_rlm.sh)
    learning_rate: float = 3e-4
    warmup_steps: int = 4000
    weight_decay: float = 0.0
    max_steps: int = 80_000
    per_device_train_batch_size: int = 64
    gradient_accumulation_steps: int = 4
    save_steps: int = 10_000
    seed: int = 45678

    def resolved_label_positions(self) -> str:
        if self.label_positions == "auto":
            return "masked" if self.generator == "none" else "all"
        if self.label_positions not in ("all", "masked"):
            raise ValueError(f"label_positions must be auto|all|masked, not {self.label_positions!r}")
        return self.label_positions


@dataclass(kw_only=True)
class GeneratorArgs(TrainConfig):
    """A small MLM generator (offline stand-in for google/electra-base-generator)."""

    corpus_path: str
    tokenizer_path: str
    """Tokenizer folder / hub id (the encoder's: generator and encoder must share the vocabulary)."""
    reference_model: str | None = None
    """Model whose config sizes the generator; defaults to tokenizer_path when it has a config."""
    hidden_size: int = 0
    """0: a quarter of the reference model's hidden size (at least 16)."""
    num_hidden_layers: int = 2
    num_attention_heads: int = 0
    """0: hidden_size // 64 (at least 1)."""
    intermediate_size: int = 0
    """0: 4 x hidden_size."""
    max_position_embeddings: int = 0
    """0: the reference model's (else 512)."""
    max_len: int = 144
    mlm_probability: float = 0.15
    title_as_pair: bool = True
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    max_steps: int = 1000
    per_device_train_batch_size: int = 64
    save_steps: int = 500


# ---------------------------------------------------------------------------------------------
# Trainer
class RLMTrainer(Trainer):
    """Checkpoints through :meth:`SimLMForPretraining.save_pretrained` (safetensors, tied weights
    handled, no generator), resumes through ``load_weights``, logs encoder/decoder losses."""

    def __init__(self, *args: Any, group_by_length: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._meters: dict[str, list[float]] = {}
        self._cuda_graphs = mode_uses_cuda_graphs(self.args.torch_compile_mode)
        self._group_by_length = group_by_length

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self._group_by_length:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        if not isinstance(dataset, PassageDataset):
            raise ValueError(f"group_by_length reads passage lengths from a PassageDataset, not {type(dataset).__name__}")
        # Groups of one optimizer step's passages (as transformers' own group_by_length)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=dataset.text_lengths())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir, tokenizer=self.processing_class)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        logger.info("loading SimLM weights from %s", resume_from_checkpoint)
        model.load_weights(resume_from_checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self._cuda_graphs:
            # Each micro-batch is a new replay: the previous one's outputs have been consumed by
            # its backward (and the loss meters hold copies), so their buffers may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        outputs = model(**inputs)
        if model.training:
            for name in ("encoder_loss", "decoder_loss", "replace_ratio"):
                value = outputs.get(name)
                if value is not None:  # kept on the device: float() here would sync every step;
                    # a copy, since a CUDA-graph replay (torch_compile_mode) reuses its output buffers
                    self._meters.setdefault(name, []).append(value.detach().clone())
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._meters:
            for name, values in self._meters.items():
                logs[name] = round(float(torch.stack(values).float().mean()), 4)
            self._meters = {}
        super().log(logs, *args, **kwargs)


def _cache_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.work_dir) / "cache"


def _passages(args: TrainConfig, training_args) -> PassageDataset:
    with training_args.main_process_first(desc="corpus Arrow cache"):
        arrow = corpus_arrow_cache(args.corpus_path, _cache_dir(args))  # type: ignore[attr-defined]
    return PassageDataset(arrow)


def build_pretrain_model(args: PretrainArgs, tokenizer: PreTrainedTokenizerBase):
    from simlm_core.modeling.pretrain import SimLMForPretraining, build_replacer

    if args.generator == "train":
        raise ValueError("generator='train' is resolved by the workflow to the folder that "
                         "drivers/train_generator.py wrote; pass that folder here")
    counts = None
    if args.generator == "unigram":
        counts = corpus_unigram_counts(args.corpus_path, tokenizer, args.unigram_max_passages, args.max_len)
    replacer = build_replacer(args.generator, len(tokenizer), tokenizer.all_special_ids, counts)
    return SimLMForPretraining.from_pretrained(
        args.model_name_or_path,
        replacer=replacer,
        decoder_layers=args.decoder_layers,
        use_decoder=args.use_decoder,
        encoder_loss_weight=args.encoder_loss_weight,
        decoder_loss_weight=args.decoder_loss_weight,
        label_positions=args.resolved_label_positions(),
        packed_training=args.packed_training,
    )


def pretrain(args: PretrainArgs) -> dict[str, Any]:
    """Run RLM pre-training; the encoder (+ MLM head, decoder, tokenizer) lands in ``args.output_dir``."""
    from transformers import set_seed

    set_seed(args.seed)
    check_packed_training(args, args.packed_training)
    training_args = to_training_arguments(args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or args.model_name_or_path)
    model = build_pretrain_model(args, tokenizer)
    collator = RLMCollator(
        tokenizer,
        max_len=args.max_len,
        encoder_mask_rate=args.encoder_mask_rate,
        decoder_mask_rate=args.decoder_mask_rate,
        decoder_mask_mode=args.decoder_mask_mode,
        whole_word_mask=args.whole_word_mask,
        all_use_mask_token=args.all_use_mask_token,
        title_as_pair=args.title_as_pair,
        pad_to_multiple_of=8 if (args.bf16 or args.fp16) else None,
        pad_to_max_len=uses_cuda_graphs(args),
    )
    trainer = RLMTrainer(
        model=model,
        args=training_args,
        train_dataset=_passages(args, training_args),
        data_collator=collator,
        processing_class=tokenizer,
        group_by_length=args.group_by_length,
    )

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, tokenizer=tokenizer)
        (tmp / "pretrain_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, sort_keys=True))

    return train_and_save(trainer, args, save)


# ---------------------------------------------------------------------------------------------
# Generator stand-in
@dataclass
class MLMCollator:
    """Tokenise passages, then BERT's 15% masking (80/10/10) via DataCollatorForLanguageModeling."""

    tokenizer: PreTrainedTokenizerBase
    max_len: int = 144
    mlm_probability: float = 0.15
    title_as_pair: bool = True

    def __post_init__(self) -> None:
        from transformers import DataCollatorForLanguageModeling

        self._mlm = DataCollatorForLanguageModeling(self.tokenizer, mlm=True, mlm_probability=self.mlm_probability)

    def __call__(self, examples: Sequence[dict[str, str]]) -> dict[str, Any]:
        batch = tokenize_passages(self.tokenizer, examples, self.max_len, self.title_as_pair)
        features = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
        out = dict(self._mlm(features))
        out["num_tokens"] = int(out["attention_mask"].sum())  # for GeneratorTrainer's mask (no sync)
        return out


def generator_config(args: GeneratorArgs, tokenizer: PreTrainedTokenizerBase):
    from transformers import AutoConfig, BertConfig

    ref_hidden, ref_pos = 768, 512
    ref = args.reference_model or args.tokenizer_path
    try:
        ref_cfg = AutoConfig.from_pretrained(ref)
        ref_hidden = int(getattr(ref_cfg, "hidden_size", ref_hidden))
        ref_pos = int(getattr(ref_cfg, "max_position_embeddings", ref_pos))
    except (OSError, ValueError):
        if args.reference_model:
            raise
    hidden = args.hidden_size or max(16, ref_hidden // 4)
    heads = args.num_attention_heads or max(1, hidden // 64)
    if hidden % heads:
        raise ValueError(f"generator hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=heads,
        intermediate_size=args.intermediate_size or 4 * hidden,
        max_position_embeddings=args.max_position_embeddings or max(ref_pos, args.max_len),
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
    )


class GeneratorTrainer(Trainer):
    """HF Trainer for the generator's plain MLM, handing the model a mask transformers need not
    read back (:func:`~simlm_core.modeling.sdpa_mask.with_encoder_mask`, from the collator's
    ``num_tokens``): no per-step padding check of the 2D mask, a host-device sync."""

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        inputs = dict(inputs)
        num_tokens = inputs.pop("num_tokens", None)
        inputs = with_encoder_mask(self.accelerator.unwrap_model(model).config, inputs, num_tokens)
        return super().compute_loss(model, inputs, *args, **kwargs)


def train_generator(args: GeneratorArgs) -> dict[str, Any]:
    """Train a small BERT MLM on the corpus; saved as an HF folder (+ tokenizer) in output_dir."""
    from transformers import BertForMaskedLM, set_seed

    set_seed(args.seed)
    training_args = to_training_arguments(args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    model = BertForMaskedLM(generator_config(args, tokenizer))
    trainer = GeneratorTrainer(
        model=model,
        args=training_args,
        train_dataset=_passages(args, training_args),
        data_collator=MLMCollator(tokenizer, args.max_len, args.mlm_probability, args.title_as_pair),
        processing_class=tokenizer,
    )

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return train_and_save(trainer, args, save)
