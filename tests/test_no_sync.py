"""Packed training steps never wait for the device.

Each step runs on PyTorch's ``meta`` device, whose tensors have shapes but no data: reading a
value back (``.item()``, ``int(t)``, ``torch.equal``) or an op whose output size depends on the
data (boolean-mask indexing, ``nonzero``) raises there, exactly where it would stall the host
on a GPU. Each test also shows the same step without the collator's token count failing, so
the check has teeth.
"""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from simlm_core.modeling.biencoder import BiEncoder
from simlm_core.modeling.pretrain import SimLMForPretraining
from simlm_core.modeling.reranker import pack_encoder_forward
from simlm_core.reranker_training import group_loss

VOCAB = 64
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64)
# What meta tensors raise on a read-back or a data-dependent shape.
READ_BACK = (RuntimeError, NotImplementedError)


def _padded(rows: int, width: int) -> dict:
    """A right-padded batch on the meta device, with the host's token count (a collator's)."""
    lengths = [width - (i % 3) for i in range(rows)]
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return {"input_ids": torch.randint(5, VOCAB, (rows, width)).to("meta"), "attention_mask": mask.to("meta"),
            "num_tokens": sum(lengths)}


def test_packed_biencoder_encoding_runs_without_the_data():
    with torch.device("meta"):
        model = BiEncoder(BertModel(BertConfig(**CONFIG), add_pooling_layer=False), packed_training=True)
    model.train()
    batch = _padded(6, 12)
    vectors = model.encode_packed(batch["input_ids"], batch["attention_mask"], num_tokens=batch["num_tokens"])
    assert vectors.shape == (6, 32) and vectors.is_meta
    vectors.sum().backward()
    with pytest.raises(READ_BACK):
        model.encode_packed(batch["input_ids"], batch["attention_mask"])


def test_packed_pretraining_step_runs_without_the_data():
    """Encoder, decoder and both MLM losses of ``packed_training``, forward and backward, with the
    authors' labels at every position (``label_positions='masked'`` gathers the labelled rows, a
    sync it documents). The generator is left out: it reads the padded batch in both modes."""
    with torch.device("meta"):
        model = SimLMForPretraining(BertForMaskedLM(BertConfig(**CONFIG)), replacer=None, decoder_layers=2,
                                    label_positions="all", packed_training=True)
    model.train()
    batch = _pretraining_inputs(_padded(6, 12))
    out = model(**batch)
    assert out.loss.is_meta and out.decoder_loss is not None
    out.loss.backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    batch.pop("num_tokens")
    with pytest.raises(READ_BACK):
        model(**batch)


@pytest.mark.parametrize("rdrop_alpha", [0.0, 1.0])
def test_packed_reranker_group_loss_runs_without_the_data(rdrop_alpha):
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=1))
    pack_encoder_forward(model)
    model.train()
    batch = _padded(8, 12)  # 2 groups of 4 pairs
    batch["labels"] = torch.zeros(2, dtype=torch.long, device="meta")
    out = group_loss(model, batch, rdrop_alpha=rdrop_alpha)
    assert out["scores"].shape == (2, 4) and out["loss"].is_meta
    out["loss"].backward()
    batch.pop("num_tokens")
    with pytest.raises(READ_BACK):
        group_loss(model, batch, rdrop_alpha=rdrop_alpha)


def _pretraining_inputs(batch: dict) -> dict:
    ids = batch.pop("input_ids")
    return {**batch, "encoder_input_ids": ids, "decoder_input_ids": ids, "labels": ids}


@pytest.mark.parametrize("stage", ["biencoder", "pretraining"])
def test_the_token_count_recompiles_nothing_when_training_padded(stage):
    """Collators always send ``num_tokens``; a compiled padded model never reads it, so batches of
    one shape (CUDA-graph training pads to max_len) with other counts reuse the first graph."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    if stage == "biencoder":
        model = BiEncoder(BertModel(BertConfig(**CONFIG), add_pooling_layer=False))
    else:
        model = SimLMForPretraining(BertForMaskedLM(BertConfig(**CONFIG)), replacer=None, decoder_layers=1)
    model.train()
    compiled = torch.compile(model, backend="eager")

    def step(rows: int) -> None:
        lengths = [12 - (i + rows) % 5 for i in range(4)]  # other lengths, one shape
        ids = torch.randint(5, VOCAB, (4, 12))
        batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * n + [0] * (12 - n) for n in lengths]),
                 "num_tokens": sum(lengths)}
        if stage == "biencoder":
            loss = compiled(query=batch, passage=batch).loss
        else:
            loss = compiled(**_pretraining_inputs(batch)).loss
        loss.backward()

    dynamo.reset()
    try:
        with dynamo.config.patch(error_on_recompile=True):
            for rows in range(3):
                step(rows)
    finally:
        dynamo.reset()
