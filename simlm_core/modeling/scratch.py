"""Offline starting models for the demo: a WordPiece vocabulary learned on the corpus and a small,
randomly initialised BERT.

The paper starts from ``bert-base-uncased``; the offline demo cannot download it, so this module
builds the same *kind* of model from nothing:

* :func:`train_wordpiece_tokenizer` builds an uncased WordPiece vocabulary from the corpus (BERT
  normaliser and pre-tokeniser, ``##`` continuation prefix, the five BERT special tokens with
  ``[PAD]`` at id 0; frequent whole words plus character pieces, the same in every process),
  streaming the corpus Parquet in record batches, and saves it as a standard BERT tokenizer
  (``tokenizer.json``) that ``AutoTokenizer`` loads.
  Because it is an ordinary BERT WordPiece vocabulary, whole-word masking (which looks for the
  ``##`` prefix) works on it exactly as on BERT's own.
* :func:`build_scratch_bert` saves a seeded random ``BertForMaskedLM`` (encoder + MLM head) with
  that tokenizer: a plain Hugging Face model folder that ``AutoModel`` (encoder only) and
  ``AutoModelForMaskedLM`` both load.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from simlm_core.io import atomic_dir, iter_corpus_batches, passage_text

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _iter_corpus_texts(corpus_path: str | os.PathLike[str], batch_size: int = 10_000) -> Iterator[list[str]]:
    """Passages (title + text, as every model sees them) in lists of ``batch_size``."""
    for batch in iter_corpus_batches(corpus_path, batch_size=batch_size):
        titles = batch.column("title").to_pylist()
        texts = batch.column("text").to_pylist()
        yield [passage_text(t, x or "") for t, x in zip(titles, texts)]


def train_wordpiece_tokenizer(
    corpus_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 8000,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> Path:
    """Build a BERT WordPiece vocabulary from the corpus and save it as a BERT tokenizer folder.

    The vocabulary is the five special tokens, every character seen (alone and as a ``##``
    continuation), then the most frequent whole words (count >= ``min_frequency``, ties broken
    alphabetically) up to ``vocab_size``. A word outside it splits into ``##`` pieces, as in BERT.
    Words are found by BERT's own normaliser and pre-tokeniser from ``tokenizers``.

    Why not ``tokenizers``' ``WordPieceTrainer``: it breaks ties between equal counts in hash-map
    order, which is seeded per process, so the same corpus gave a different vocabulary (and ids) in
    every run, and with it a different model after every stage. This one is the same for the same
    corpus, in every process. Returns ``out_dir``; the folder appears atomically.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    for texts in _iter_corpus_texts(corpus_path):
        for text in texts:
            word_counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))

    chars = sorted({c for w in word_counts for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the special tokens and the corpus's {len(chars)} "
            f"characters ({len(vocab)} entries); raise models.scratch.vocab_size"
        )
    taken = set(vocab)
    frequent = sorted(
        (w for w, n in word_counts.items() if n >= min_frequency and w not in taken),
        key=lambda w: (-word_counts[w], w),
    )
    vocab += frequent[: vocab_size - len(vocab)]

    # transformers' BERT tokenizer builds the exact BERT pipeline (normaliser, pre-tokeniser,
    # [CLS] A [SEP] B [SEP] template) around the vocabulary.
    bert_tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=lowercase)
    with atomic_dir(out_dir) as tmp:
        bert_tok.save_pretrained(tmp)
    return Path(out_dir)


def build_scratch_bert(
    tokenizer_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    dropout: float = 0.1,
    seed: int = 0,
) -> Path:
    """Save a seeded, randomly initialised ``BertForMaskedLM`` plus its tokenizer to ``out_dir``.

    ``dropout`` sets BERT's hidden and attention dropout (0.1 in BERT). Every later stage inherits
    it through the saved config: a tiny model trained for minutes learns several times faster
    without it (the demo's re-ranker: group accuracy 0.66 against 0.38 after 1,400 steps).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token_id is None or tokenizer.mask_token_id is None:
        raise ValueError(f"{tokenizer_dir}: tokenizer needs [PAD] and [MASK] tokens for MLM")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def init_model(
    out_dir: str | os.PathLike[str],
    corpus_path: str | os.PathLike[str] | None = None,
    tokenizer: str = "train",
    vocab_size: int = 8000,
    lowercase: bool = True,
    seed: int = 0,
    **model_kwargs,
) -> Path:
    """Tokenizer (learned with ``tokenizer="train"``, else an existing folder / hub id) + scratch BERT."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as scratch:
        if tokenizer == "train":
            if corpus_path is None:
                raise ValueError("tokenizer='train' needs corpus_path")
            tok_dir: str | Path = train_wordpiece_tokenizer(
                corpus_path, Path(scratch) / "tokenizer", vocab_size=vocab_size, lowercase=lowercase
            )
        else:
            tok_dir = tokenizer
        return build_scratch_bert(tok_dir, out_dir, seed=seed, **model_kwargs)
