"""BiEncoder: pooling, encode, losses through forward, save/load, and DDP-equivalent gradients."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from simlm_core.losses import contrastive_loss, distill_loss
from simlm_core.modeling.biencoder import (
    CONFIG_NAME,
    BiEncoder,
    biencoder_loss,
    gather_with_local_grad,
    pool,
    warmed_up_temperature,
)


def _batch(tokenizer, texts):
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def test_pool_cls_and_mean_by_hand():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(h, mask, "cls").tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert pool(h, mask, "mean").tolist() == [[2.0, 3.0], [7.0, 8.0]]  # padding ignored
    with pytest.raises(ValueError):
        pool(h, mask, "max")


def test_encode_normalised_and_padding_invariant(tiny_bert_dir):
    model = BiEncoder.from_pretrained(tiny_bert_dir).eval()
    assert model.pooling == "cls" and model.normalize and model.temperature == 0.02
    tok = model.tokenizer
    with torch.no_grad():
        alone = model.encode(**_batch(tok, ["apple banana"]))
        padded = model.encode(**_batch(tok, ["apple banana", "river lake ocean stream rain snow storm"]))
    assert torch.allclose(alone.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert model.encoder.config._attn_implementation == "sdpa"


def test_pooler_frozen(tiny_bert_dir):
    model = BiEncoder.from_pretrained(tiny_bert_dir)
    assert all(not p.requires_grad for p in model.encoder.pooler.parameters())
    assert all(p.requires_grad for n, p in model.encoder.named_parameters() if not n.startswith("pooler"))


def test_forward_contrastive_and_distill_match_losses(tiny_bert_dir):
    model = BiEncoder.from_pretrained(tiny_bert_dir, temperature=0.1, contrastive_weight=0.3).eval()
    tok = model.tokenizer
    query = _batch(tok, ["apple banana", "river lake"])
    passage = _batch(tok, ["apple", "golf", "tiger", "river lake", "paris", "snow"])  # G = 3
    with torch.no_grad():
        out = model(query=query, passage=passage)
        q, p = model.encode(**query), model.encode(**passage)
        assert out.scores.shape == (2, 6)
        assert out.loss.item() == pytest.approx(contrastive_loss(q, p, 3, 0.1).item(), rel=1e-5)
        teacher = torch.tensor([[3.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
        out_kd = model(query=query, passage=passage, teacher_scores=teacher)
        expected = distill_loss(q, p, teacher, 3, 0.1, contrastive_weight=0.3)
        assert out_kd.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert out_kd.kd_loss is not None
        model.full_contrastive = True
        out_full = model(query=query, passage=passage)
        assert out_full.loss.item() == pytest.approx(contrastive_loss(q, p, 3, 0.1, full_contrastive=True).item(), rel=1e-5)
        assert out_full.scores.shape == (2, 6)  # returned scores: query x passage part only


@pytest.mark.parametrize("distill", [False, True])
def test_training_forward_is_one_compiled_graph(tiny_bert_dir, distill):
    """torch.compile sees the step's forward, loss included, as one graph: a graph break in the
    loss (an untraceable autocast query) had split every compiled step in two on a GPU."""
    import torch._dynamo as dynamo

    model = BiEncoder.from_pretrained(tiny_bert_dir, temperature=0.1).train()
    tok = model.tokenizer
    query = _batch(tok, ["apple banana", "river lake"])
    passage = _batch(tok, ["apple", "golf", "tiger", "river lake", "paris", "snow"])
    teacher = torch.tensor([[3.0, 0.0, -1.0], [2.0, 1.0, 0.0]]) if distill else None
    dynamo.reset()
    explained = dynamo.explain(lambda q, p: model(query=q, passage=p, teacher_scores=teacher).loss)(query, passage)
    dynamo.reset()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


def test_save_load_roundtrip(tiny_bert_dir, tmp_path):
    model = BiEncoder.from_pretrained(tiny_bert_dir, pooling="mean", normalize=False, temperature=0.5).eval()
    with torch.no_grad():  # perturb so we do not just reload the original weights
        model.encoder.embeddings.word_embeddings.weight.add_(0.01)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["pooling"] == "mean" and cfg["normalize"] is False and cfg["temperature"] == 0.5
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))

    again = BiEncoder.from_pretrained(out).eval()
    assert again.pooling == "mean" and not again.normalize and again.temperature == 0.5
    tok = AutoTokenizer.from_pretrained(out)
    query = _batch(tok, ["apple banana", "rain snow"])
    passage = _batch(tok, ["apple", "golf", "snow", "rain"])
    with torch.no_grad():
        a = model(query=query, passage=passage).scores
        b = again(query=query, passage=passage).scores
        assert torch.equal(a, b)
        # a plain HF AutoModel loads the same weights
        hf = AutoModel.from_pretrained(out).eval()
        h = hf(**passage).last_hidden_state
        assert torch.allclose(pool(h, passage["attention_mask"], "mean"), again.encode(**passage), atol=1e-5)
    # explicit arguments override the saved config
    assert BiEncoder.from_pretrained(out, pooling="cls").pooling == "cls"


def test_gather_with_local_grad_routes_gradient_to_local_slice():
    local = torch.ones(2, 3, requires_grad=True)
    others = [torch.zeros(2, 3), torch.full((2, 3), 5.0)]
    gathered = gather_with_local_grad(local, [others[0], local.detach(), others[1]], rank=1)
    assert gathered.shape == (6, 3)
    assert torch.equal(gathered[2:4], local.detach())
    (gathered * torch.arange(6.0).unsqueeze(1)).sum().backward()
    assert local.grad.tolist() == [[2.0] * 3, [3.0] * 3]
    with pytest.raises(ValueError):
        gather_with_local_grad(local, [torch.zeros(3, 3), local.detach()], rank=1)


def _embeddings_and_grads(loss_fn, xq, xp, enc):
    enc.zero_grad()
    loss = loss_fn(torch.nn.functional.normalize(enc(xq), dim=-1), torch.nn.functional.normalize(enc(xp), dim=-1))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in enc.parameters()]


def _rank_gradient_sum(enc, xq, xp, world, teacher=None, **kwargs):
    """Each of ``world`` simulated DDP ranks' gradient of its :func:`biencoder_loss` (every rank's
    embeddings all-gathered, its own with gradient), summed over the ranks: DDP averages this sum."""
    b, g = xq.shape[0] // world, xp.shape[0] // xq.shape[0]

    def encode(x):
        return torch.nn.functional.normalize(enc(x), dim=-1)

    with torch.no_grad():
        all_q = [encode(xq[r * b : (r + 1) * b]) for r in range(world)]
        all_p = [encode(xp[r * b * g : (r + 1) * b * g]) for r in range(world)]
    summed = [torch.zeros_like(p) for p in enc.parameters()]
    for r in range(world):
        enc.zero_grad()
        q_r, p_r = encode(xq[r * b : (r + 1) * b]), encode(xp[r * b * g : (r + 1) * b * g])
        t_r = teacher[r * b : (r + 1) * b] if teacher is not None else None
        out = biencoder_loss(q_r, p_r, teacher_scores=t_r, world_q=all_q, world_p=all_p, rank=r, **kwargs)
        assert out.scores.shape == (b, world * b * g)
        out.loss.backward()
        for acc, p in zip(summed, enc.parameters()):
            acc += p.grad
    return summed


def test_loss_scale_multiplies_only_the_contrastive_gradient():
    """The authors' ``loss_scale``: CE's gradient x scale, the KD term's as it is, the logged loss unscaled."""
    torch.manual_seed(0)
    b, g, d_in, d = 3, 4, 6, 5
    enc = torch.nn.Linear(d_in, d)
    xq, xp, teacher = torch.randn(b, d_in), torch.randn(b * g, d_in), torch.randn(b, g)
    kw = dict(temperature=0.1, teacher_scores=teacher, contrastive_weight=0.2)
    value, scaled = _embeddings_and_grads(lambda q, p: biencoder_loss(q, p, loss_scale=3.0, **kw).loss, xq, xp, enc)
    plain_value, _ = _embeddings_and_grads(lambda q, p: biencoder_loss(q, p, **kw).loss, xq, xp, enc)
    # KD + 0.2 x (3 x CE)'s gradient is that of distill_loss with weight 0.6
    _, by_hand = _embeddings_and_grads(lambda q, p: distill_loss(q, p, teacher, g, 0.1, contrastive_weight=0.6),
                                       xq, xp, enc)
    assert value == pytest.approx(plain_value)
    for got, want in zip(scaled, by_hand):
        assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="loss_scale must be > 0"):
        BiEncoder(torch.nn.Linear(2, 2), loss_scale=0)


def test_simulated_ddp_loss_scale_one_averages_the_ranks():
    """loss_scale 1 under W ranks (the authors' NQ setting): DDP's average is the global contrastive
    gradient divided by W, where the default (W) gives the global gradient itself."""
    torch.manual_seed(1)
    world, b, g, d_in, d = 2, 2, 3, 5, 4
    enc = torch.nn.Linear(d_in, d)
    xq, xp = torch.randn(world * b, d_in), torch.randn(world * b * g, d_in)

    _, single = _embeddings_and_grads(lambda q, p: biencoder_loss(q, p, temperature=0.1).loss, xq, xp, enc)
    summed = _rank_gradient_sum(enc, xq, xp, world, None, temperature=0.1, loss_scale=1.0)
    for s, acc in zip(single, summed):
        assert torch.allclose(acc / world, s / world, atol=1e-6)  # DDP's average: a W-th of the global gradient
        assert not torch.allclose(acc / world, s, atol=1e-4)  # (the default, loss_scale W, gives s itself)


def test_warmed_up_temperature_follows_the_authors_schedule():
    """1/t_step = max(1, min(1, step / warmup) / t): 1 at first, 1/t from the end of the warm-up."""
    assert warmed_up_temperature(0.02, 0, 1000) == 1.0
    assert warmed_up_temperature(0.02, 10, 1000) == 1.0  # 0.01 / 0.02 = 0.5 < 1
    assert warmed_up_temperature(0.02, 500, 1000) == pytest.approx(1 / 25)
    assert warmed_up_temperature(0.02, 1000, 1000) == pytest.approx(0.02)
    assert warmed_up_temperature(0.02, 5000, 1000) == pytest.approx(0.02)
    assert warmed_up_temperature(0.02, 3, 0) == 0.02  # no warm-up: the temperature itself


def test_temperature_warmup_sets_the_training_loss_temperature(tiny_bert_dir):
    from types import SimpleNamespace

    from simlm_core.biencoder_training import TemperatureWarmupCallback

    model = BiEncoder.from_pretrained(tiny_bert_dir, temperature=0.05, temperature_warmup=True)
    tok = model.tokenizer
    query = _batch(tok, ["apple banana", "river lake"])
    passage = _batch(tok, ["apple", "golf", "river lake", "paris"])
    callback = TemperatureWarmupCallback(model)
    args = SimpleNamespace(get_warmup_steps=lambda max_steps: 100)
    torch.manual_seed(0)
    model.train()
    model.encoder.config.hidden_dropout_prob = 0.0
    for step, temperature in ((0, 1.0), (40, 1 / 8), (100, 0.05)):
        callback.on_step_begin(args, SimpleNamespace(global_step=step, max_steps=1000), None)
        assert model.training_temperature.item() == pytest.approx(temperature)
        with torch.no_grad():
            model.eval()
            q, p = model.encode(**query), model.encode(**passage)
            model.train()
            out = model(query=query, passage=passage)
            model.eval()
            assert model(query=query, passage=passage).loss.item() == pytest.approx(
                contrastive_loss(q, p, 2, 0.05).item(), rel=1e-5)  # evaluation: the final temperature
        assert torch.allclose(out.scores, (q @ p.t()) / temperature, rtol=1e-4)  # training: this step's
        assert out.loss.item() == pytest.approx(contrastive_loss(q, p, 2, temperature).item(), rel=1e-5)
    assert "training_temperature" not in model.state_dict()


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("full", [False, True])
def test_simulated_ddp_gradients_equal_single_process(distill, full):
    """W ranks, each with B queries: averaging the ranks' gradients (what DDP does) must equal
    the single-process gradient of the whole W*B batch."""
    torch.manual_seed(0)
    world, b, g, d_in, d = 3, 2, 3, 5, 4
    enc = torch.nn.Linear(d_in, d)
    xq, xp = torch.randn(world * b, d_in), torch.randn(world * b * g, d_in)
    teacher = torch.randn(world * b, g) if distill else None
    kwargs = dict(temperature=0.1, contrastive_weight=0.2, full_contrastive=full)

    _, single = _embeddings_and_grads(lambda q, p: biencoder_loss(q, p, teacher_scores=teacher, **kwargs).loss,
                                      xq, xp, enc)
    summed = _rank_gradient_sum(enc, xq, xp, world, teacher, **kwargs)
    for s, acc in zip(single, summed):
        assert torch.allclose(s, acc / world, atol=1e-6)


def test_activation_checkpointing_switch(tiny_bert_dir):
    model = BiEncoder.from_pretrained(tiny_bert_dir).train()
    assert not model.encoder.is_activation_checkpointing
    model.activation_checkpointing_enable()
    assert model.encoder.is_activation_checkpointing
    tok = model.tokenizer
    out = model(query=_batch(tok, ["apple", "rain"]), passage=_batch(tok, ["apple", "golf", "rain", "java"]))
    out.loss.backward()
    grads = [p.grad for n, p in model.encoder.named_parameters() if "layer.0." in n]
    assert grads and all(gr is not None for gr in grads)
