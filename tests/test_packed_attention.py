"""The packed-attention Triton kernel (simlm_core.modeling.packed_attention).

CI has no GPU: the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``), in a child
process (tests/triton_interpreter_checks.py) so the setting reaches nothing else.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simlm_core.modeling.packed_attention import packed_attention, triton_attention_available

CHECKS = Path(__file__).with_name("triton_interpreter_checks.py")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(CHECKS)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernel_matches_per_text_attention(interpreted):
    errors = interpreted["kernel"]
    assert len(errors) == 18  # 2 dtypes x 3 block shapes x (all tokens, 64-bit offsets, first tokens)
    for key, err in errors.items():
        assert err < (1e-5 if key.startswith("float32") else 2e-3), (key, err)


def test_packed_encoder_on_the_kernel_matches_transformers(interpreted):
    got = interpreted["encoder"]
    assert got["cls kernel"] == got["mean kernel"] == "triton"
    for key in ("cls eager", "mean eager", "cls compiled"):
        assert got[key] < 1e-5, (key, got[key])


def test_bad_shapes_are_refused_before_any_kernel_runs():
    cu = torch.tensor([0, 3], dtype=torch.int32)
    x = torch.zeros(3, 4, 16)
    with pytest.raises(ValueError, match="power of two"):
        packed_attention(torch.zeros(3, 4, 48), torch.zeros(3, 4, 48), torch.zeros(3, 4, 48), cu, cu)
    with pytest.raises(ValueError, match="groups of 3"):
        packed_attention(x, x, x, cu, cu, blocks=(16, 16, 3, 4))
    with pytest.raises(ValueError, match="int32"):
        packed_attention(x, x, x, cu.long(), cu.long())
    with pytest.raises(ValueError, match=r"\[tokens, heads, dim\]"):
        packed_attention(x[0], x, x, cu, cu)
    with pytest.raises(ValueError, match="unit stride"):
        packed_attention(x.transpose(1, 2).contiguous().transpose(1, 2), x, x, cu, cu)


def test_not_available_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_attention_available(torch.device("cpu"))


def test_auto_attention_on_cpu_is_sdpa(monkeypatch):
    from transformers import BertConfig, BertModel

    from simlm_core.modeling.packed import PackedBertEncoder

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    enc = PackedBertEncoder(bert)
    assert enc.attention_kernel(torch.zeros(1)) == "padded"
    assert enc.attention_kernel(torch.zeros(1, dtype=torch.bfloat16)) == "padded"
    assert PackedBertEncoder(bert, attention="triton").attention_kernel(torch.zeros(1)) == "triton"
