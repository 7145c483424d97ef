"""Training steps never wait for the device, padded or packed.

Each step runs on PyTorch's ``meta`` device, whose tensors have shapes but no data: reading a
value back (``.item()``, ``int(t)``, ``torch.equal``) or an op whose output size depends on the
data (boolean-mask indexing, ``nonzero``) raises there, exactly where it would stall the host
on a GPU. On a CUDA machine the same steps also run on the GPU in bf16 under
``torch.cuda.set_sync_debug_mode("error")``, with and without our fused kernels (``-m gpu``;
``benchmarks/gpu_suite.sh`` part ``nosync``). The tests also show what they guard against
failing: packed steps without the collator's token count, and transformers' padding check on a
2D mask (which :func:`~simlm_core.modeling.sdpa_mask.key_padding_mask` spares padded steps).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, ElectraConfig,
                          ElectraForMaskedLM)

from simlm_core.modeling.biencoder import BiEncoder
from simlm_core.modeling.pretrain import GeneratorReplacer, SimLMForPretraining
from simlm_core.modeling.reranker import pack_encoder_forward
from simlm_core.modeling.sdpa_mask import encoder_attention_mask, key_padding_mask
from simlm_core.reranker_training import group_loss
from simlm_core.training import fuse_attention, fuse_norms

VOCAB = 64
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64)
# What a read-back or a data-dependent shape raises: on meta tensors, and under CUDA's sync debug mode.
READ_BACK = (RuntimeError, NotImplementedError)
DEVICES = ["meta", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU")])]


@contextlib.contextmanager
def no_sync(device: str):
    """Raise on any host-device sync inside (CUDA: sync debug mode 'error', bf16 autocast as in training;
    meta: every read-back raises anyway)."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _padded(rows: int, width: int, device: str = "meta") -> dict:
    """A right-padded batch (on the meta device unless told), with the host's token count (a collator's)."""
    lengths = [width - (i % 3) for i in range(rows)]
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return {"input_ids": torch.randint(5, VOCAB, (rows, width)).to(device), "attention_mask": mask.to(device),
            "num_tokens": sum(lengths)}


def _built(model: torch.nn.Module, fused: bool) -> torch.nn.Module:
    """``model`` in training mode, with the fused_norm / fused_attention switches if asked (on meta
    the norms run torch's ops and attention stays SDPA; on CUDA our kernels, after their self-checks)."""
    if fused:
        fuse_norms(model)
        fuse_attention(model)
    return model.train()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_biencoder_step_runs_without_the_data(device, fused, packed):
    """Query and passage encoders, contrastive and distillation losses, backward."""
    with torch.device(device):
        model = _built(BiEncoder(BertModel(BertConfig(**CONFIG), add_pooling_layer=False), packed_training=packed),
                       fused)
    query, passage = _padded(2, 8, device), _padded(4, 12, device)
    with no_sync(device):
        out = model(query=query, passage=passage, teacher_scores=torch.zeros(2, 2, device=device))
        assert out.kd_loss is not None
        out.loss.backward()
    del query["num_tokens"], passage["num_tokens"]
    with torch.device(device):
        plain = BertModel(BertConfig(**CONFIG))
    with no_sync(device):
        if packed:  # without the host's counts the packed batch is built from a read-back
            with pytest.raises(READ_BACK):
                model(query=query, passage=passage)
        with pytest.raises(READ_BACK):  # transformers' own 2D-mask path checks the batch for padding
            plain(input_ids=query["input_ids"], attention_mask=query["attention_mask"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_pretraining_step_runs_without_the_data(device, fused, packed):
    """Frozen generator, encoder, decoder and both MLM losses, forward and backward, with the
    authors' labels at every position (``label_positions='masked'`` gathers the labelled rows, a
    sync it documents)."""
    with torch.device(device):
        encoder = BertForMaskedLM(BertConfig(**CONFIG))
        generator = ElectraForMaskedLM(ElectraConfig(**{**CONFIG, "hidden_size": 16, "intermediate_size": 32}))
        model = _built(SimLMForPretraining(encoder, replacer=GeneratorReplacer(generator), decoder_layers=2,
                                           label_positions="all", packed_training=packed), fused)
    batch = _pretraining_inputs(_padded(6, 12, device))
    masked = torch.zeros(6, 12, dtype=torch.bool, device=device)
    with no_sync(device):
        out = model(**batch, encoder_mlm_mask=masked, decoder_mlm_mask=masked)
        assert out.decoder_loss is not None
        out.loss.backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    if packed:
        batch.pop("num_tokens")
        with no_sync(device), pytest.raises(READ_BACK):
            model(**batch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rdrop_alpha", [0.0, 1.0])
def test_reranker_group_loss_runs_without_the_data(device, fused, packed, rdrop_alpha):
    with torch.device(device):
        model = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=1))
    if packed:
        pack_encoder_forward(model)
    model = _built(model, fused)
    batch = _padded(8, 12, device)  # 2 groups of 4 pairs
    batch["labels"] = torch.zeros(2, dtype=torch.long, device=device)
    with no_sync(device):
        out = group_loss(model, batch, rdrop_alpha=rdrop_alpha)
        assert out["scores"].shape == (2, 4)
        out["loss"].backward()
    if packed:
        batch.pop("num_tokens")
        with no_sync(device), pytest.raises(READ_BACK):
            group_loss(model, batch, rdrop_alpha=rdrop_alpha)


@pytest.mark.parametrize("device", DEVICES)
def test_reranker_forward_factor_selection_runs_without_the_data(device):
    """The authors' forward_factor (score every pair without gradients, train on each group's top
    ones) picks the rows on the device. (With packed_training the kept rows' token count is data:
    that one step reads it back.)"""
    with torch.device(device):
        model = _built(BertForSequenceClassification(BertConfig(**CONFIG, num_labels=1)), fused=False)
    batch = _padded(16, 12, device)  # 2 groups of 8 pairs; forward_factor 4 keeps 2 per group
    batch["labels"] = torch.zeros(2, dtype=torch.long, device=device)
    with no_sync(device):
        out = group_loss(model, batch, rdrop_alpha=1.0, forward_factor=4)
        assert out["scores"].shape == (2, 2)
        out["loss"].backward()


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


def test_key_padding_mask_only_for_bert_and_electra_on_sdpa_and_none_without_padding():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    sdpa = BertModel(BertConfig(**CONFIG)).config  # a model's config names its attention
    assert sdpa._attn_implementation == "sdpa"
    assert torch.equal(key_padding_mask(sdpa, mask), mask.bool()[:, None, None, :])
    eager = BertModel(BertConfig(**CONFIG)).config
    eager._attn_implementation = "eager"  # adds the mask to scores: booleans would be wrong there
    decoder = BertModel(BertConfig(**CONFIG, is_decoder=True)).config
    roberta = BertModel(BertConfig(**CONFIG)).config
    roberta.model_type = "roberta"
    for config in (eager, decoder, roberta):
        assert key_padding_mask(config, mask) is None
    assert key_padding_mask(sdpa, None) is None
    # The encoder's mask: none if the host's count says there is no padding, else the key mask or the 2D one
    assert encoder_attention_mask(sdpa, torch.ones(2, 3), num_tokens=6) is None
    assert encoder_attention_mask(eager, torch.ones(2, 3), num_tokens=6) is None
    assert torch.equal(encoder_attention_mask(sdpa, mask, num_tokens=5), key_padding_mask(sdpa, mask))
    assert torch.equal(encoder_attention_mask(sdpa, mask), key_padding_mask(sdpa, mask))
    assert encoder_attention_mask(eager, mask, num_tokens=5) is mask


def _eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    other = copy.deepcopy(model)
    for module in other.modules():
        config = getattr(module, "config", None)
        if config is not None:
            config._attn_implementation = "eager"  # transformers' own 2D-mask path
    return other


def test_padded_steps_with_the_4d_mask_match_transformers_2d_path():
    """The key mask changes no loss: pre-training (generator, encoder, decoder) and the re-ranker's
    group loss, against the same weights on eager attention, which build their masks from 2D."""
    torch.manual_seed(0)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    generator = ElectraForMaskedLM(ElectraConfig(**{**CONFIG, "hidden_size": 16, "intermediate_size": 32}))
    pretrain = SimLMForPretraining(BertForMaskedLM(BertConfig(**CONFIG, **no_dropout)), decoder_layers=2)
    batch = _pretraining_inputs(_padded(6, 12, device="cpu"))
    masked = torch.rand(6, 12) < 0.3
    losses = []
    for model in (pretrain, _eager_copy(pretrain)):
        model.replacer = GeneratorReplacer(generator if not losses else _eager_copy(generator))
        model.train()
        torch.manual_seed(1)  # the generator's samples
        losses.append(model(**batch, encoder_mlm_mask=masked, decoder_mlm_mask=masked).loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)

    reranker = BertForSequenceClassification(BertConfig(**CONFIG, **no_dropout, num_labels=1)).train()
    pairs = _padded(8, 12, device="cpu")
    pairs["labels"] = torch.zeros(2, dtype=torch.long)
    scores = [group_loss(m, pairs, rdrop_alpha=1.0)["scores"] for m in (reranker, _eager_copy(reranker))]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
