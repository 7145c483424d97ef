"""The fused dropout-add-LayerNorm (simlm_core.modeling.fused_norm) and the ``fused_norm`` switch.

CI has no GPU: the Triton kernel runs in Triton's CPU interpreter, in a child process
(tests/triton_interpreter_checks.py, part ``fused_norm``). Without the interpreter, on CPU, the
switched modules run torch's own ops: the same numbers as transformers', dropout included.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import BertConfig, BertModel, ElectraConfig, ElectraForSequenceClassification

from simlm_core.modeling.fused_norm import dropout_add_layer_norm, fuse_dropout_add_layer_norm, fused_norm_available
from simlm_core.training import TrainConfig, fuse_norms

CHECKS = Path(__file__).with_name("triton_interpreter_checks.py")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(CHECKS), "fused_norm"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["fused_norm"]


def test_kernel_forward_and_backward_match_torch_on_its_mask(interpreted):
    errors = interpreted["errors"]
    assert len(errors) == 8  # 4 (hidden, dtypes) x dropout 0 / 0.1
    for key, e in errors.items():
        assert e["dtype"] == "torch.float32", key  # fp32 out on an fp32 residual stream, as under autocast
        assert e["grad_dtypes_match"], key
        assert e["y"] < 2e-6, (key, e)
        # relative to the largest gradient; bf16/fp16 gradients round to their last bit
        tol = 1e-5 if "float32/float32" in key else 1e-2
        for g in ("dx", "dr", "dw", "db"):
            assert e[g] < (tol if g in ("dx", "dr") else 1e-5), (key, g, e[g])


def test_kernel_drops_at_the_requested_rate_with_fresh_bits_per_seed(interpreted):
    assert abs(interpreted["drop_rate"] - 0.1) < 0.005  # 196,608 draws: std 0.0007
    assert interpreted["same_seed_same_mask"]
    assert interpreted["rows_differ"]
    assert abs(interpreted["other_seed_overlap"] - 0.82) < 0.005  # independent masks: 0.9^2 + 0.1^2
    assert interpreted["eval_error"] < 1e-6  # not training: no dropout
    assert interpreted["verified"]  # its self-check passes where it is right
    assert interpreted["self_check_other_default"] < 0.05  # whatever default device a caller set


def test_bert_switched_to_the_kernel_trains_like_transformers(interpreted):
    bert = interpreted["bert"]
    assert bert["switched"] == 4 and bert["switched_again"] == 0  # 2 layers x (attention, feed-forward)
    for path in ("padded", "packed", "compiled"):
        got = bert[path]
        assert got["same_grad_names"], path
        assert got["loss"] < 1e-6 and got["grads"] < 1e-6, (path, got)
    losses = bert["dropout_losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def _bert(dropout: float = 0.1, layers: int = 2) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=64, hidden_dropout_prob=dropout), add_pooling_layer=False)


def test_without_triton_the_switched_model_is_transformers_exactly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_norm_available(torch.device("cpu"))
    plain = _bert().train()
    fused = copy.deepcopy(plain)
    assert fuse_dropout_add_layer_norm(fused) == 4
    ids = torch.randint(3, 60, (3, 9))
    torch.manual_seed(1)
    want = plain(input_ids=ids).last_hidden_state
    torch.manual_seed(1)  # same dropout draws: torch's own F.dropout
    got = fused(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints unchanged


def test_switch_finds_electra_and_biencoder_layers_once():
    electra = ElectraForSequenceClassification(ElectraConfig(
        vocab_size=60, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64))
    assert fuse_dropout_add_layer_norm(electra) == 6
    assert fuse_dropout_add_layer_norm(electra) == 0  # already switched
    assert fuse_dropout_add_layer_norm(torch.nn.Linear(3, 3)) == 0


def test_torch_path_checks_nothing_but_computes_the_formula(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    w, b = torch.rand(8), torch.rand(8)
    got = dropout_add_layer_norm(x, r, w, b, 1e-6, p=0.5, training=False)
    assert torch.allclose(got, F.layer_norm(x + r, (8,), w, b, 1e-6))


def test_fuse_norms_refuses_a_model_without_bert_layers(tmp_path, capsys):
    with pytest.raises(ValueError, match="fused_norm: Linear has no BERT-like sublayer outputs"):
        fuse_norms(torch.nn.Linear(2, 2))
    assert fuse_norms(_bert()) == 4
    assert "fused_norm: 4 dropout-add-LayerNorm blocks run on" in capsys.readouterr().out


def test_fused_norm_is_a_train_setting_off_by_default():
    assert TrainConfig(output_dir="o", work_dir="w").fused_norm is False
    schema = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
    for section in ("biencoder_train", "reranker_train", "pretrain_train"):
        for key in ("fused_norm", "fused_attention"):
            assert key in schema["$defs"][section]["properties"], (section, key)


def test_a_norm_kernel_that_fails_its_check_is_not_switched_on(monkeypatch, capsys):
    from simlm_core.modeling import fused_norm, triton_support

    monkeypatch.setattr(triton_support, "_VERIFIED", {})
    monkeypatch.setattr(fused_norm, "fused_norm_available", lambda device: True)
    monkeypatch.setattr(fused_norm, "_self_check", lambda device: 0.3)
    bert = _bert()
    with pytest.warns(RuntimeWarning, match="dropout-add-LayerNorm: .*differ from torch's by 0.3.*torch's ops run"):
        assert fuse_norms(bert) == 0
    assert "fused_norm: the kernel failed its self-check" in capsys.readouterr().out
    assert not any(getattr(m, "_simlm_fused_norm", False) for m in bert.modules())
