"""SimLM pre-training model: BERT encoder + shallow decoder behind a [CLS] bottleneck, trained with
replaced language modelling (RLM).

What the authors' code does at each choice point (microsoft/unilm, ``simlm/``), and what we do:

* **Model pieces** (``src/models/rlm.py``, class ``ReplaceLM``): the encoder is a
  ``BertForMaskedLM`` (``bert`` + ``cls`` MLM head); the decoder is
  ``copy.deepcopy(encoder.bert.encoder.layer[-rlm_decoder_layers:])`` taken once at construction
  (``--rlm_decoder_layers`` default 2), so it starts equal to the encoder's last two layers and is
  trained separately afterwards. We do the same (:class:`SimLMForPretraining`).
* **Generator** (``rlm.py`` ``_replace_tokens``; ``train_rlm.sh``: ``--rlm_generator_model_name
  google/electra-base-generator --rlm_freeze_generator True``): an ``AutoModelForMaskedLM`` that
  is put in ``eval()`` mode with ``requires_grad_(False)`` and run under ``torch.no_grad()``
  *inside the model's forward* on each masked copy (input ids with ``[MASK]``, attention mask,
  token type ids). Its MLM loss is computed but multiplied by zero when frozen
  (``--rlm_generator_mlm_weight 0.2`` only matters for an unfrozen generator), so we drop it.
  Sampling is ``torch.distributions.Categorical(logits=outputs.logits).sample()``: plain
  categorical sampling at temperature 1 over the *whole* vocabulary (no Gumbel trick, no
  exclusion of special tokens or of the original token), taken at the masked positions only
  (``labels >= 0``); every other position keeps its input id. The encoder copy and the decoder
  copy are sampled separately. We follow this exactly (:class:`GeneratorReplacer`, run inside
  ``forward`` so it uses the GPU), keeping the generator out of ``state_dict``, of
  ``parameters()`` (hence of the optimizer and of DDP) and of every save.
  Baseline switches that are ours, not the authors': ``uniform`` (replacement uniform over the
  vocabulary minus special tokens), ``unigram`` (corpus token frequencies) and ``none`` (no
  replacement: masked positions stay ``[MASK]``, i.e. plain MLM; see ``label_positions``).
* **Encoder loss**: ``BertForMaskedLM(**encoder_inputs, labels=labels)`` i.e. mean cross-entropy
  of the encoder's MLM head over every labelled position. Labels are the *original* token ids at
  every position that is not a special token (the collator sets ``[CLS]``, ``[SEP]``, ``[PAD]``,
  ``[UNK]``, ``[MASK]`` ids to -100): all tokens are predicted, replaced or not
  (``rlm_collator.py``, "use the un-masked version of labels"). Same here (``label_positions=
  "all"``). We apply the MLM head only at labelled positions (same mean CE, less memory).
* **Decoder input** (``rlm.py`` ``forward``): ``cls_hidden = encoder_out.hidden_states[-1][:, :1]``
  -- the encoder's last-layer hidden state at position 0, as is, no extra position embedding or
  LayerNorm -- concatenated with ``self.encoder.bert.embeddings(decoder_input_ids)[:, 1:]``,
  i.e. the encoder's *full* embeddings module (word + position + token-type + LayerNorm +
  dropout) applied to the decoder's replaced copy, called *without* ``token_type_ids`` (so type 0
  everywhere, even on the text segment of a title/text pair). The decoder uses the encoder's
  attention mask. Position 0 of the decoder input ([CLS] embedding) is thus replaced by the
  encoder's [CLS] vector, the only thing the decoder sees of the encoder. We follow this.
* **Decoder loss**: the decoder output goes through the *shared* encoder MLM head
  (``self.encoder.cls``), mean CE with the same all-token labels.
* **Total loss**: ``decoder_mlm_loss + encoder_out.loss (+ 0 * generator loss)``: weights 1 and 1.
  Ours: ``encoder_loss_weight * CE_enc + decoder_loss_weight * CE_dec`` (defaults 1.0, 1.0);
  ``use_decoder=False`` trains the encoder alone (ablation).
* **Saving** (``rlm.py`` ``save_pretrained``, ``trainers/rlm_trainer.py`` ``_save``): the encoder
  with ``BertForMaskedLM.save_pretrained`` plus ``decoder.pt`` (``torch.save`` of the decoder's
  state dict, a pickle) and the tokenizer; the generator is never saved. Ours differs in format
  only: the encoder is written as a plain ``BertModel`` folder (config + ``model.safetensors``,
  keys without the ``bert.`` prefix, *plus* the pooler weights carried unchanged from the initial
  checkpoint, or seeded fresh ones when it had none) so ``AutoModel.from_pretrained(dir)`` loads
  it with no missing and no unexpected weights; the MLM head goes to ``mlm_head/`` and the
  decoder to ``decoder/`` (safetensors, never pickles) so pre-training can resume or continue.
  The pooler is not trained by RLM (the retriever uses the [CLS] hidden state, not the pooler).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import ModelOutput

from simlm_core.modeling.sdpa_mask import encoder_attention_mask

IGNORE_INDEX = -100
ENCODER_WEIGHTS = "model.safetensors"
MLM_HEAD_DIR = "mlm_head"
DECODER_DIR = "decoder"
DECODER_META = "decoder_config.json"

GENERATOR_MODES = ("uniform", "unigram", "none")


# ---------------------------------------------------------------------------------------------
# Token replacement (the "generator")
class TokenReplacer(Protocol):
    """Fills the masked positions of a masked copy with replacement tokens."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        mask: torch.Tensor,
        num_tokens: int | None = None,
    ) -> torch.Tensor: ...


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """One draw from ``softmax(logits)`` along the last axis, by the Gumbel-max trick.

    Exactly the distribution of ``Categorical(logits=...).sample()`` (the authors' call), but over
    every position at once: no boolean indexing and no ``mask.any()``, so the step has static
    shapes, no host-device sync and no ``torch.compile`` graph break (the noise and the argmax fuse
    into one kernel there).
    """
    uniform = torch.rand(logits.shape, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
    return torch.argmax(logits.float() + gumbel, dim=-1)


class GeneratorReplacer:
    """A frozen MLM generator (e.g. ELECTRA-base generator): sample from softmax(logits) at masked
    positions, as the authors do (``Categorical(logits=...).sample()``: temperature 1, full vocab).

    Deliberately *not* an ``nn.Module`` attribute of the model, so it stays out of
    ``state_dict()``, ``parameters()``, the optimizer, DDP and ``model.train()``. It follows the
    inputs' device lazily.
    """

    def __init__(self, generator: nn.Module) -> None:
        self.generator = generator
        self.generator.eval()
        self.generator.requires_grad_(False)

    @property
    def vocab_size(self) -> int:
        return int(self.generator.config.vocab_size)

    def _to(self, device: torch.device) -> None:
        p = next(self.generator.parameters())
        if p.device != device:
            self.generator.to(device)

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, token_type_ids, mask, num_tokens=None):
        self._to(input_ids.device)
        self.generator.eval()
        kwargs: dict[str, Any] = {"input_ids": input_ids,  # a mask transformers need not read back
                                  "attention_mask": encoder_attention_mask(self.generator.config, attention_mask,
                                                                           num_tokens)}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        logits = self.generator(**kwargs).logits
        return torch.where(mask.bool(), sample_categorical(logits), input_ids)


class DistributionReplacer:
    """Replacement tokens drawn i.i.d. from a fixed distribution over the vocabulary
    (``uniform`` over non-special tokens, or ``unigram`` corpus frequencies)."""

    def __init__(self, probs: torch.Tensor) -> None:
        probs = probs.double()
        if probs.dim() != 1 or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError("replacement distribution must be a non-negative, non-zero vector")
        self.probs = (probs / probs.sum()).float()

    @property
    def vocab_size(self) -> int:
        return int(self.probs.numel())

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, token_type_ids, mask, num_tokens=None):
        if self.probs.device != input_ids.device:
            self.probs = self.probs.to(input_ids.device)
        # One draw per position, kept where masked: static shapes, no host sync (see GeneratorReplacer).
        draws = torch.multinomial(self.probs, input_ids.numel(), replacement=True).view_as(input_ids)
        return torch.where(mask.bool(), draws.to(input_ids.dtype), input_ids)


def uniform_distribution(vocab_size: int, special_ids: Sequence[int]) -> torch.Tensor:
    probs = torch.ones(vocab_size)
    probs[[i for i in special_ids if 0 <= i < vocab_size]] = 0.0
    return probs


def unigram_distribution(counts: torch.Tensor, special_ids: Sequence[int], smoothing: float = 0.0) -> torch.Tensor:
    probs = counts.double() + smoothing
    probs[[i for i in special_ids if 0 <= i < probs.numel()]] = 0.0
    return probs


def build_replacer(
    generator: str,
    vocab_size: int,
    special_ids: Sequence[int],
    unigram_counts: torch.Tensor | None = None,
) -> TokenReplacer | None:
    """``generator``: an MLM folder / hub id, ``uniform``, ``unigram`` (needs counts) or ``none``."""
    if generator == "none":
        return None
    if generator == "uniform":
        return DistributionReplacer(uniform_distribution(vocab_size, special_ids))
    if generator == "unigram":
        if unigram_counts is None:
            raise ValueError("generator='unigram' needs corpus token counts")
        return DistributionReplacer(unigram_distribution(unigram_counts, special_ids))
    model = AutoModelForMaskedLM.from_pretrained(generator)
    return GeneratorReplacer(model)


# ---------------------------------------------------------------------------------------------
# The model
@dataclass
class SimLMPretrainOutput(ModelOutput):
    loss: torch.Tensor | None = None
    encoder_loss: torch.Tensor | None = None
    decoder_loss: torch.Tensor | None = None
    replace_ratio: torch.Tensor | None = None


def is_simlm_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A folder written by :meth:`SimLMForPretraining.save_pretrained`."""
    return (Path(path) / MLM_HEAD_DIR / ENCODER_WEIGHTS).is_file()


def _pooler_from_checkpoint(name_or_path: str) -> dict[str, torch.Tensor] | None:
    """The pooler weights of a BERT checkpoint (folder or cached hub id), if it has them."""
    try:
        from transformers.utils import cached_file

        path = cached_file(name_or_path, ENCODER_WEIGHTS, _raise_exceptions_for_missing_entries=False)
    except Exception:  # offline hub id without a cache, gated repo, ...
        return None
    if not path:
        return None
    found: dict[str, torch.Tensor] = {}
    with safetensors.safe_open(path, "pt") as f:
        for key in f.keys():
            for name in ("pooler.dense.weight", "pooler.dense.bias"):
                if key == name or key.endswith("." + name):
                    found[name] = f.get_tensor(key)
    return found if len(found) == 2 else None


def _fresh_pooler(config: BertConfig) -> dict[str, torch.Tensor]:
    """BERT's initialisation for a pooler (normal(0, initializer_range), zero bias)."""
    w = torch.empty(config.hidden_size, config.hidden_size).normal_(0.0, config.initializer_range)
    return {"pooler.dense.weight": w, "pooler.dense.bias": torch.zeros(config.hidden_size)}


def _mlm_head_state(encoder: BertForMaskedLM) -> dict[str, torch.Tensor]:
    """The MLM head's own tensors (without the decoder weight when it is tied to the embeddings)."""
    tied = encoder.get_output_embeddings().weight is encoder.get_input_embeddings().weight
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in encoder.cls.state_dict().items():
        if tied and key == "predictions.decoder.weight":
            continue
        ptr = value.data_ptr()
        if ptr in seen:  # decoder.bias is the same tensor as predictions.bias
            continue
        seen.add(ptr)
        state[key] = value.detach().contiguous().cpu()
    return state


def load_encoder_for_mlm(path: str | os.PathLike[str], **kwargs: Any) -> tuple[BertForMaskedLM, dict[str, torch.Tensor] | None]:
    """A ``BertForMaskedLM`` (with its MLM head) from a hub id / HF folder or a SimLM checkpoint,
    plus the pooler weights to carry through to the saved encoder."""
    path = str(path)
    if not is_simlm_checkpoint(path):
        model = BertForMaskedLM.from_pretrained(path, **kwargs)
        return model, _pooler_from_checkpoint(path)
    config = BertConfig.from_pretrained(path)
    model = BertForMaskedLM(config)
    bert_state = safetensors.torch.load_file(str(Path(path) / ENCODER_WEIGHTS))
    pooler = {k: bert_state.pop(k) for k in list(bert_state) if k.startswith("pooler.")}
    model.bert.load_state_dict(bert_state, strict=True)
    head = safetensors.torch.load_file(str(Path(path) / MLM_HEAD_DIR / ENCODER_WEIGHTS))
    result = model.cls.load_state_dict(head, strict=False)
    allowed_missing = {"predictions.decoder.weight", "predictions.decoder.bias"}
    if result.unexpected_keys or set(result.missing_keys) - allowed_missing:
        raise ValueError(f"{path}: MLM head does not match: {result}")
    model.tie_weights()
    return model, (pooler or None)


class SimLMForPretraining(nn.Module):
    """Encoder (``BertForMaskedLM``) + ``decoder_layers`` BERT layers reading [CLS; decoder copy].

    ``forward`` takes the collator's masked copies (``encoder_input_ids``/``decoder_input_ids``
    with ``[MASK]`` at the positions flagged in ``encoder_mlm_mask``/``decoder_mlm_mask``), fills
    the masked positions with the frozen ``replacer`` (the generator), and returns the RLM loss.
    """

    def __init__(
        self,
        encoder: BertForMaskedLM,
        replacer: TokenReplacer | None = None,
        decoder_layers: int = 2,
        use_decoder: bool = True,
        encoder_loss_weight: float = 1.0,
        decoder_loss_weight: float = 1.0,
        label_positions: str = "all",
        pooler_state: dict[str, torch.Tensor] | None = None,
        packed_training: bool = False,
    ) -> None:
        super().__init__()
        if label_positions not in ("all", "masked"):
            raise ValueError(f"label_positions must be 'all' or 'masked', not {label_positions!r}")
        n_layers = len(encoder.bert.encoder.layer)
        if use_decoder and not 1 <= decoder_layers <= n_layers:
            raise ValueError(f"decoder_layers={decoder_layers} but the encoder has {n_layers} layers")
        if replacer is not None and replacer.vocab_size > encoder.config.vocab_size:
            raise ValueError(
                f"generator vocabulary ({replacer.vocab_size}) is larger than the encoder's "
                f"({encoder.config.vocab_size}): they must share one tokenizer"
            )
        self.encoder = encoder
        self.decoder = nn.ModuleList()
        if use_decoder:
            # copy.deepcopy of the last layers, once, as the authors do: same start, trained apart.
            import copy

            self.decoder = copy.deepcopy(encoder.bert.encoder.layer[-decoder_layers:])
        self.replacer = replacer  # a plain attribute: not a submodule (see GeneratorReplacer)
        self.use_decoder = use_decoder
        self.encoder_loss_weight = encoder_loss_weight
        self.decoder_loss_weight = decoder_loss_weight
        self.label_positions = label_positions
        self.pooler_state = pooler_state or _fresh_pooler(encoder.config)
        self.packed_training = bool(packed_training)
        if self.packed_training:
            from simlm_core.modeling.packed import PackedBertEncoder

            # Raises, naming the reason, for an encoder it cannot pack. Out of the module tree: it
            # shares every weight with ``encoder`` (nothing to save or move).
            object.__setattr__(self, "_packed_encoder", PackedBertEncoder(encoder.bert, pooling="tokens",
                                                                          trainable=True))

    # -- construction / persistence ------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike[str],
        replacer: TokenReplacer | None = None,
        decoder_layers: int = 2,
        use_decoder: bool = True,
        **kwargs: Any,
    ) -> "SimLMForPretraining":
        """From a BERT (hub id / HF folder) or a SimLM checkpoint (then its decoder too, if saved)."""
        encoder, pooler = load_encoder_for_mlm(model_name_or_path)
        model = cls(encoder, replacer=replacer, decoder_layers=decoder_layers, use_decoder=use_decoder,
                    pooler_state=pooler, **kwargs)
        dec_file = Path(model_name_or_path) / DECODER_DIR / ENCODER_WEIGHTS
        if use_decoder and dec_file.is_file():
            meta = json.loads((dec_file.parent / DECODER_META).read_text())
            if int(meta["decoder_layers"]) == decoder_layers:
                model.decoder.load_state_dict(safetensors.torch.load_file(str(dec_file)), strict=True)
        return model

    def encoder_state_for_save(self) -> dict[str, torch.Tensor]:
        """The encoder as ``BertModel`` weights (no ``bert.`` prefix), pooler included."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.encoder.bert.state_dict().items()}
        for k, v in self.pooler_state.items():
            state[k] = v.detach().contiguous().cpu()
        return state

    def save_pretrained(self, output_dir: str | os.PathLike[str], tokenizer: Any = None) -> None:
        """Encoder as a plain ``BertModel`` folder (what ``AutoModel`` loads), MLM head in
        ``mlm_head/``, decoder in ``decoder/``; all safetensors. The generator is never saved."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = BertConfig.from_dict(self.encoder.config.to_dict())
        config.architectures = ["BertModel"]
        config.save_pretrained(out)
        safetensors.torch.save_file(self.encoder_state_for_save(), str(out / ENCODER_WEIGHTS),
                                    metadata={"format": "pt"})
        (out / MLM_HEAD_DIR).mkdir(exist_ok=True)
        safetensors.torch.save_file(_mlm_head_state(self.encoder), str(out / MLM_HEAD_DIR / ENCODER_WEIGHTS),
                                    metadata={"format": "pt"})
        if self.use_decoder:
            (out / DECODER_DIR).mkdir(exist_ok=True)
            dec_state = {k: v.detach().contiguous().cpu() for k, v in self.decoder.state_dict().items()}
            safetensors.torch.save_file(dec_state, str(out / DECODER_DIR / ENCODER_WEIGHTS), metadata={"format": "pt"})
            (out / DECODER_DIR / DECODER_META).write_text(json.dumps({"decoder_layers": len(self.decoder)}))
        if tokenizer is not None:
            tokenizer.save_pretrained(out)

    def load_weights(self, path: str | os.PathLike[str]) -> None:
        """Load a folder written by :meth:`save_pretrained` in place (parameters keep their identity,
        so an optimizer built on them stays valid): used to resume training."""
        encoder, pooler = load_encoder_for_mlm(path)
        self.encoder.load_state_dict(encoder.state_dict(), strict=True)
        if pooler:
            self.pooler_state = pooler
        if self.use_decoder:
            dec_file = Path(path) / DECODER_DIR / ENCODER_WEIGHTS
            self.decoder.load_state_dict(safetensors.torch.load_file(str(dec_file)), strict=True)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)
        func = getattr(self.encoder.bert.encoder.layer[0], "_gradient_checkpointing_func", None)
        for layer in self.decoder:
            layer._gradient_checkpointing_func = func
            layer.gradient_checkpointing = func is not None

    gradient_checkpointing_enable = activation_checkpointing_enable

    # -- forward -------------------------------------------------------------------------------
    def _replace(self, input_ids, attention_mask, token_type_ids, mask, num_tokens=None):
        if self.replacer is None or mask is None:
            return input_ids
        return self.replacer(input_ids, attention_mask, token_type_ids, mask, num_tokens)

    def _mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean CE of the (shared) encoder MLM head over labelled positions only.

        With ``label_positions='all'`` (the authors' setting) nearly every position is labelled, so
        the head runs on all of them and ``ignore_index`` drops the rest: static shapes, no host
        sync, one ``torch.compile`` graph. With ``'masked'`` (30-50% labelled) gathering the
        labelled rows first saves more head FLOPs than the sync costs.
        """
        sel = labels != IGNORE_INDEX
        if self.label_positions == "masked":
            hidden, labels = hidden[sel], labels[sel]
        logits = self.encoder.cls(hidden).flatten(0, -2)
        total = F.cross_entropy(logits.float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return total / sel.sum().clamp(min=1)

    def _labels(self, labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.label_positions == "all":
            return labels
        if mask is None:
            raise ValueError("label_positions='masked' needs the collator's *_mlm_mask")
        return labels.masked_fill(~mask.bool(), IGNORE_INDEX)

    def decoder_inputs(self, cls_hidden: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """[encoder last-layer [CLS] vector ; embeddings(decoder ids)[1:]] (authors' construction)."""
        embeds = self.encoder.bert.embeddings(input_ids=decoder_input_ids)
        return torch.cat([cls_hidden[:, None, :].to(embeds.dtype), embeds[:, 1:]], dim=1)

    def forward(
        self,
        encoder_input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        encoder_mlm_mask: torch.Tensor | None = None,
        decoder_mlm_mask: torch.Tensor | None = None,
        num_tokens: int | None = None,
    ) -> SimLMPretrainOutput:
        """``num_tokens``: the attention mask's sum, if the host knows it (:class:`RLMCollator`
        gives it); ``packed_training`` then packs the batch without waiting for the device."""
        enc_ids = self._replace(encoder_input_ids, attention_mask, token_type_ids, encoder_mlm_mask, num_tokens)
        if self.packed_training and self.training:
            loss, enc_loss, dec_loss = self._packed_losses(enc_ids, decoder_input_ids, attention_mask, labels,
                                                           token_type_ids, encoder_mlm_mask, decoder_mlm_mask,
                                                           num_tokens)
            return self._output(loss, enc_loss, dec_loss, enc_ids, labels, attention_mask)
        # No mask, or a ready 4D one, where transformers would read the 2D one back (a sync per call)
        model_mask = encoder_attention_mask(self.encoder.config, attention_mask, num_tokens)
        hidden = self.encoder.bert(
            input_ids=enc_ids, attention_mask=model_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        enc_loss = self._mlm_loss(hidden, self._labels(labels, encoder_mlm_mask))
        loss = self.encoder_loss_weight * enc_loss

        dec_loss = None
        if self.use_decoder:
            dec_ids = self._replace(decoder_input_ids, attention_mask, token_type_ids, decoder_mlm_mask, num_tokens)
            x = self.decoder_inputs(hidden[:, 0], dec_ids)
            ext_mask = model_mask if model_mask is None or model_mask.dim() == 4 else create_bidirectional_mask(
                config=self.encoder.config, inputs_embeds=x, attention_mask=model_mask
            )
            for layer in self.decoder:
                x = layer(x, ext_mask)
                if isinstance(x, tuple):  # older transformers return (hidden,)
                    x = x[0]
            dec_loss = self._mlm_loss(x, self._labels(labels, decoder_mlm_mask))
            loss = loss + self.decoder_loss_weight * dec_loss
        return self._output(loss, enc_loss, dec_loss, enc_ids, labels, attention_mask)

    def _packed_losses(self, enc_ids, decoder_input_ids, attention_mask, labels, token_type_ids,
                       encoder_mlm_mask, decoder_mlm_mask, num_tokens=None):
        """The RLM losses with encoder and decoder run padding-free (``packed_training``): the same
        arithmetic on the real tokens only; the generator still reads the padded batch. Per-token
        tensors are gathered by index (:meth:`PackedBatch.gather`), so with the host's
        ``num_tokens`` nothing here waits for the device."""
        from simlm_core.modeling.packed import PackedBatch

        batch = PackedBatch.from_padded(enc_ids, attention_mask, token_type_ids, num_tokens)
        hidden = self._packed_encoder.encode(batch)  # [T, H], the texts' tokens in row-major order
        enc_loss = self._mlm_loss(hidden, batch.gather(self._labels(labels, encoder_mlm_mask)))
        loss = self.encoder_loss_weight * enc_loss
        dec_loss = None
        if self.use_decoder:
            dec_ids = self._replace(decoder_input_ids, attention_mask, token_type_ids, decoder_mlm_mask, num_tokens)
            # BERT's embedding block on the real tokens only (token type 0, as decoder_inputs)
            embeds = self._packed_encoder.embed(batch.gather(dec_ids), batch.positions)
            first = batch.cu_seqlens[:-1].long()  # each text's [CLS] row takes the encoder's vector
            x = embeds.index_copy(0, first, hidden[first].to(embeds.dtype))
            for layer in self.decoder:
                x = self._packed_encoder.run_layer(layer, x, batch)
            dec_loss = self._mlm_loss(x, batch.gather(self._labels(labels, decoder_mlm_mask)))
            loss = loss + self.decoder_loss_weight * dec_loss
        return loss, enc_loss, dec_loss

    def _output(self, loss, enc_loss, dec_loss, enc_ids, labels, attention_mask) -> SimLMPretrainOutput:
        with torch.no_grad():
            valid = labels != IGNORE_INDEX
            replaced = (enc_ids != labels) & valid
            replace_ratio = replaced.sum().float() / attention_mask.sum().clamp(min=1).float()
        return SimLMPretrainOutput(
            loss=loss,
            encoder_loss=enc_loss.detach(),
            decoder_loss=None if dec_loss is None else dec_loss.detach(),
            replace_ratio=replace_ratio,
        )
