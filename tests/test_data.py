"""Calibration data: reading, chunked tokenisation, seeded windows, clear errors."""

from __future__ import annotations

import pytest
import torch
from tiny import make_text, make_tokenizer

from ecoflap_cli.data.text import read_text, sample_windows, to_batches, tokenize_documents
from ecoflap_cli.errors import DataError


def test_chunked_tokenisation_equals_whole_text():
    tokenizer = make_tokenizer()
    text = make_text(3000, seed=7)  # ~150k characters: several 20k-character pieces
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenize_documents(tokenizer, [text]).tolist() == [*whole, tokenizer.eos_token_id]


def test_windows_are_seeded_and_sized():
    tokens = torch.arange(1000)
    a, b = sample_windows(tokens, 5, 64, seed=1), sample_windows(tokens, 5, 64, seed=1)
    assert torch.equal(a, b) and a.shape == (5, 64)
    assert not torch.equal(a, sample_windows(tokens, 5, 64, seed=2))
    assert [x["input_ids"].shape[0] for x in to_batches(a, 2)] == [2, 2, 1]


def test_jsonl_and_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "a b c"}\n\n{"text": "d e"}\n')
    assert read_text(good) == ["a b c", "d e"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        read_text(bad)
    with pytest.raises(DataError, match="--text-field"):
        read_text(good, text_field="body")
    with pytest.raises(DataError, match="not found"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="fewer than one window"):
        sample_windows(torch.arange(10), 2, 64, seed=0)
