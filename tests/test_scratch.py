"""Offline starting models: WordPiece training on the corpus and a seeded scratch BERT."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from simlm_core.io import CORPUS_SCHEMA, write_table
from simlm_core.modeling.scratch import build_scratch_bert, train_wordpiece_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    words = ["photosynthesis", "chlorophyll", "sunlight", "plants", "energy", "glucose", "Leaves",
             "water", "carbon", "dioxide", "oxygen", "réaction", "the", "of", "and", "in"]
    rows = [{"pid": str(i), "title": "Biology" if i % 3 else None,
             "text": " ".join(words[(i + j) % len(words)] for j in range(20))} for i in range(200)]
    path = tmp_path_factory.mktemp("scratch") / "corpus.parquet"
    write_table(pd.DataFrame(rows), path, CORPUS_SCHEMA)
    return path


def test_wordpiece_tokenizer_round_trip(corpus, tmp_path):
    from transformers import AutoTokenizer

    out = train_wordpiece_tokenizer(corpus, tmp_path / "tok", vocab_size=120)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) <= 120
    assert tok.pad_token_id == 0 and tok.mask_token_id is not None
    assert {tok.cls_token, tok.sep_token, tok.unk_token} == {"[CLS]", "[SEP]", "[UNK]"}
    enc = tok("Biology", "Photosynthesis needs sunlight")
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert pieces[0] == "[CLS]" and pieces.count("[SEP]") == 2
    assert enc["token_type_ids"][-1] == 1
    assert all(p == p.lower() for p in pieces if not p.startswith("["))  # uncased
    assert "[UNK]" not in pieces
    # a word outside the vocabulary splits into ## pieces (what whole-word masking relies on)
    assert any(p.startswith("##") for p in tok.convert_ids_to_tokens(tok("photosynthesisleaves")["input_ids"]))
    assert tok.decode(tok("plants and water")["input_ids"], skip_special_tokens=True) == "plants and water"


def test_wordpiece_vocabulary_is_the_same_in_every_process(corpus, tmp_path):
    """Hash-seeded tie-breaking (tokenizers' trainer) gave a new vocabulary per run; ours must not."""
    import subprocess
    import sys

    code = ("import sys; from simlm_core.modeling.scratch import train_wordpiece_tokenizer as t; "
            "t(sys.argv[1], sys.argv[2], vocab_size=int(sys.argv[3]))")
    vocabs = []
    for i, seed in enumerate(["1", "2", "3"]):
        out = tmp_path / f"tok{i}"
        # 56 cuts through the 16 words, which all occur equally often: tie-breaking decides
        subprocess.run([sys.executable, "-c", code, str(corpus), str(out), "56"], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        vocabs.append(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
        assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok0" / "tokenizer.json").read_bytes()
    assert vocabs[0] == vocabs[1] == vocabs[2]
    assert sorted(vocabs[0].values()) == list(range(56))


def test_wordpiece_vocabulary_too_small_for_the_alphabet_is_an_error(corpus, tmp_path):
    with pytest.raises(ValueError, match="characters"):
        train_wordpiece_tokenizer(corpus, tmp_path / "tok", vocab_size=20)


def test_scratch_bert_loads_with_auto_classes_and_is_seeded(corpus, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    tok_dir = train_wordpiece_tokenizer(corpus, tmp_path / "tok", vocab_size=120)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64)
    a = build_scratch_bert(tok_dir, tmp_path / "a", seed=3, **kw)
    b = build_scratch_bert(tok_dir, tmp_path / "b", seed=3, **kw)
    c = build_scratch_bert(tok_dir, tmp_path / "c", seed=4, **kw)
    tok = AutoTokenizer.from_pretrained(str(a))
    mlm = AutoModelForMaskedLM.from_pretrained(str(a))
    enc = AutoModel.from_pretrained(str(a))
    assert type(mlm).__name__ == "BertForMaskedLM" and type(enc).__name__ == "BertModel"
    assert mlm.config.vocab_size == len(tok) and mlm.config.pad_token_id == tok.pad_token_id
    assert mlm.config.hidden_size == 32 and mlm.config.num_hidden_layers == 2
    for k, v in enc.state_dict().items():
        if not k.startswith("pooler."):
            assert torch.equal(v, mlm.bert.state_dict()[k]), k
    sd_a = AutoModelForMaskedLM.from_pretrained(str(a)).state_dict()
    sd_b = AutoModelForMaskedLM.from_pretrained(str(b)).state_dict()
    sd_c = AutoModelForMaskedLM.from_pretrained(str(c)).state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    with torch.no_grad():
        out = mlm(**tok(["plants need water"], return_tensors="pt"))
    assert out.logits.shape[-1] == len(tok)


def test_init_model_driver(corpus, tmp_path, capsys):
    from transformers import AutoModel

    from simlm_core.drivers.init_model import main

    args = {"corpus_path": str(corpus), "out_dir": str(tmp_path / "init"), "tokenizer": "train", "vocab_size": 100,
            "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 32,
            "max_position_embeddings": 64, "seed": 0}
    main(["--args-json", json.dumps(args)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out_dir"] == str(tmp_path / "init")
    assert AutoModel.from_pretrained(str(tmp_path / "init")).config.hidden_size == 16
    # an existing tokenizer instead of a trained one
    args2 = {**args, "tokenizer": str(tmp_path / "init"), "out_dir": str(tmp_path / "init2"), "corpus_path": None}
    main(["--args-json", json.dumps(args2)])
    assert json.loads((tmp_path / "init2" / "config.json").read_text())["vocab_size"] == \
        json.loads((tmp_path / "init" / "config.json").read_text())["vocab_size"]
    with pytest.raises(ValueError, match="unknown key"):
        main(["--args-json", json.dumps({**args, "bogus": 1})])


def test_scratch_bert_dropout_is_saved_and_inherited(corpus, tmp_path):
    from transformers import AutoConfig, AutoModel

    tok_dir = train_wordpiece_tokenizer(corpus, tmp_path / "tok", vocab_size=120)
    kw = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=64)
    default = AutoConfig.from_pretrained(str(build_scratch_bert(tok_dir, tmp_path / "d", **kw)))
    assert default.hidden_dropout_prob == default.attention_probs_dropout_prob == 0.1  # BERT's
    off = build_scratch_bert(tok_dir, tmp_path / "off", dropout=0.0, **kw)
    model = AutoModel.from_pretrained(str(off)).train()
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.0
    # Without dropout a training-mode forward is deterministic: nothing is dropped.
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    with pytest.raises(ValueError, match="dropout"):
        build_scratch_bert(tok_dir, tmp_path / "bad", dropout=1.0, **kw)
