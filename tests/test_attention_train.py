"""The packed training attention kernel (simlm_core.modeling.attention_train).

CI has no GPU: the kernel runs in Triton's CPU interpreter, in a child process
(tests/triton_interpreter_checks.py, part ``attention_train``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from simlm_core.modeling import attention_train
from simlm_core.modeling.attention_train import packed_attention_train, training_kernel_verified

CHECKS = Path(__file__).with_name("triton_interpreter_checks.py")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(CHECKS), "attention_train"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["attention_train"]


def test_kernel_output_and_gradients_match_softmax_attention_on_its_mask(interpreted):
    errors = interpreted["errors"]
    assert len(errors) == 16  # 2 dtypes x 2 tilings x (all tokens, first tokens) x dropout 0 / 0.1
    for key, e in errors.items():
        assert e["dtype_kept"], key
        fp32 = key.startswith("float32")
        assert e["out"] < (2e-6 if fp32 else 3e-3), (key, e)
        assert e["grad"] < (2e-6 if fp32 else 3e-3), (key, e)  # relative to the largest gradient


def test_kernel_dropout_rate_and_independent_masks(interpreted):
    assert abs(interpreted["drop_rate"] - 0.1) < 0.004  # 248,832 draws: std 0.0006
    assert interpreted["heads_differ"] and interpreted["texts_differ"]
    assert interpreted["verified"]  # the self-check passes where the kernel is right
    assert interpreted["self_check_other_default"] < 0.05  # whatever default device a caller set


def test_packed_bert_trains_on_the_kernel_like_on_sdpa(interpreted):
    enc = interpreted["encoder"]
    assert enc["cls kernel"] == enc["mean kernel"] == "triton"
    for key in ("cls eager", "cls compiled", "mean eager"):
        assert enc[key]["same_grad_names"], key
        assert enc[key]["loss"] < 1e-6 and enc[key]["grads"] < 1e-6, (key, enc[key])
    losses = enc["dropout_losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_transformers_models_switched_to_the_kernel_train_like_on_sdpa(interpreted):
    hf = interpreted["transformers"]
    assert hf["bert switched"] == hf["electra switched"] == 1
    for key in ("bert eager", "bert compiled", "electra eager"):
        assert hf[key]["same_grad_names"], key
        assert hf[key]["loss"] < 1e-5 and hf[key]["grads"] < 1e-6, (key, hf[key])


def test_checkpointing_recomputes_the_same_dropout(interpreted):
    """Both kernels draw their seeds from torch's generator, which activation checkpointing
    restores: recomputed forwards drop the same elements, so the gradients are unchanged."""
    assert interpreted["checkpointing"] < 1e-6


def test_not_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not training_kernel_verified(torch.device("cpu"))
    x = torch.zeros(3, 2, 16)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="runs on CUDA with Triton"):
        packed_attention_train(x, x, x, cu, cu)


def test_bad_inputs_are_refused_before_any_kernel(monkeypatch):
    monkeypatch.setattr(attention_train, "triton_available", lambda device: True)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    x = torch.zeros(3, 2, 16)
    with pytest.raises(ValueError, match="power of two"):
        packed_attention_train(torch.zeros(3, 2, 24), torch.zeros(3, 2, 24), torch.zeros(3, 2, 24), cu, cu)
    with pytest.raises(ValueError, match="int32"):
        packed_attention_train(x, x, x, cu.long(), cu.long())
    with pytest.raises(ValueError, match="blocks must be powers of two"):
        packed_attention_train(x, x, x, cu, cu, blocks=(16, 24, 4))
    with pytest.raises(ValueError, match="blocks must be powers of two"):
        packed_attention_train(x, x, x, cu, cu, backward_blocks=(8, 16, 4))
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        packed_attention_train(x, x, x, cu, cu, dropout_p=1.0)


def test_a_failing_kernel_is_reported_once_and_not_used(monkeypatch):
    """Where the kernel cannot build or gives wrong gradients, training keeps SDPA, with a warning."""
    from simlm_core.modeling import triton_support

    monkeypatch.setattr(attention_train, "triton_available", lambda device: True)
    monkeypatch.setattr(triton_support, "_VERIFIED", {})

    def broken(device):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(attention_train, "_self_check", broken)
    with pytest.warns(RuntimeWarning, match="training attention: .*failed its check on cpu .*PassManager::run failed"
                                            ".*attention runs SDPA instead"):
        assert not training_kernel_verified(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # answered from the cache: no second warning
        assert not training_kernel_verified(torch.device("cpu"))
    monkeypatch.setattr(triton_support, "_VERIFIED", {})
    monkeypatch.setattr(attention_train, "_self_check", lambda device: 0.5)
    with pytest.warns(RuntimeWarning, match="differ from torch's by 0.5"):
        assert not training_kernel_verified(torch.device("cpu"))


def test_trainable_packed_encoder_picks_its_attention(monkeypatch):
    from transformers import BertConfig, BertModel

    from simlm_core.modeling import packed
    from simlm_core.modeling.attention_train import use_triton_attention
    from simlm_core.modeling.packed import PackedBertEncoder

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    auto = PackedBertEncoder(bert, trainable=True)
    half = torch.zeros(1, dtype=torch.bfloat16)
    assert auto.attention_kernel(torch.zeros(1)) == "padded"  # not switched: SDPA
    assert auto.attention_kernel(half) == "padded"
    assert PackedBertEncoder(bert, trainable=True, attention="triton").attention_kernel(torch.zeros(1)) == "triton"
    assert PackedBertEncoder(bert, trainable=True, attention="varlen").attention_kernel(torch.zeros(1)) == "padded"
    assert use_triton_attention(bert) == 1  # fused_attention
    assert auto.attention_kernel(half) == "padded"  # CPU: no Triton kernel
    monkeypatch.setattr(packed, "triton_available", lambda device: True)
    assert auto.attention_kernel(half) == "triton"
    assert auto.attention_kernel(torch.zeros(1)) == "padded"  # fp32: SDPA


def test_switched_model_saves_a_plain_config(tmp_path):
    from transformers import BertConfig, BertModel

    from simlm_core.modeling.attention_train import HF_ATTENTION, use_triton_attention

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    assert use_triton_attention(bert) == 1 and bert.config._attn_implementation == HF_ATTENTION
    bert.save_pretrained(tmp_path)
    assert HF_ATTENTION not in (tmp_path / "config.json").read_text()
    assert BertModel.from_pretrained(tmp_path).config._attn_implementation != HF_ATTENTION


def test_decoders_are_not_switched():
    from transformers import BertConfig, BertModel

    from simlm_core.modeling.attention_train import use_triton_attention

    decoder = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, is_decoder=True))
    assert use_triton_attention(decoder) == 0  # causal masks are not the kernel's
    assert decoder.config._attn_implementation == "sdpa"


def test_key_lengths_from_every_mask_form():
    from simlm_core.modeling.attention_train import _key_lengths

    mask2d = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    want = torch.tensor([3, 2], dtype=torch.int32)
    cpu = torch.device("cpu")
    assert torch.equal(_key_lengths(mask2d, 2, 4, cpu), want)
    assert torch.equal(_key_lengths(mask2d.bool()[:, None, None, :], 2, 4, cpu), want)
    additive = torch.where(mask2d.bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :].expand(2, 1, 4, 4)
    assert torch.equal(_key_lengths(additive, 2, 4, cpu), want)
    assert torch.equal(_key_lengths(None, 2, 4, cpu), torch.tensor([4, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected a \[2, 5\] padding mask"):
        _key_lengths(mask2d, 2, 5, cpu)


def test_fused_attention_switch_on_cpu_keeps_sdpa(monkeypatch, capsys):
    from transformers import BertConfig, BertModel

    from simlm_core.training import TrainConfig, fuse_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    assert fuse_attention(bert) == 0
    assert "fused_attention: no Triton kernel on cpu: attention stays SDPA" in capsys.readouterr().out
    assert bert.config._attn_implementation == "sdpa"
    assert TrainConfig(output_dir="o", work_dir="w").fused_attention is False


def test_heads_the_kernel_cannot_take_attend_through_sdpa():
    """A switched model whose head size is not a power of two >= 16 still trains: SDPA takes those."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from simlm_core.modeling.attention_train import hf_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 24) for _ in range(3))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    module = torch.nn.Module()
    module.is_causal = False
    got, _ = hf_attention(module, q, k, v, mask, scaling=24 ** -0.5)
    want, _ = sdpa_attention_forward(module, q, k, v, mask.bool()[:, None, None, :], scaling=24 ** -0.5)
    assert got.shape == (2, 7, 3, 24)
    assert torch.allclose(got, want)
