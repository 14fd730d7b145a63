"""`--method auto`: first-order where backprop fits in memory, zeroth-order where it does not."""

from __future__ import annotations

import torch

from ecoflap_cli.engine import score_methods
from ecoflap_cli.io.loading import LoadOptions, load_model
from ecoflap_cli.models import get_adapter
from ecoflap_cli.stages import driver


def _batches():
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def _score(loaded):
    adapter = get_adapter(loaded.model)
    return driver.score(loaded, adapter, _batches(), {}, "auto")


def test_auto_picks_first_order_when_it_fits_and_records_why(tiny_llama):
    doc = _score(load_model(str(tiny_llama)))
    assert doc["method"]["name"] == "first" and doc["method"]["chosen_by"] == "auto"
    assert doc["method"]["metric"] == "gradnorm" and "GiB" in doc["method"]["reason"]
    assert all(g["score"] > 0 for g in doc["groups"])


def test_auto_falls_back_to_zeroth_order_when_backprop_does_not_fit(tiny_llama, monkeypatch):
    monkeypatch.setattr(score_methods, "first_order_bytes", lambda model, batches: 1 << 60)
    doc = _score(load_model(str(tiny_llama)))
    assert doc["method"]["name"] == "zeroth" and "would need" in doc["method"]["reason"]


def test_auto_uses_zeroth_order_for_offloaded_weights(tiny_llama, tmp_path):
    loaded = load_model(str(tiny_llama), LoadOptions(offload="disk", offload_folder=str(tmp_path / "off")))
    doc = _score(loaded)
    assert doc["method"]["name"] == "zeroth" and "offloaded" in doc["method"]["reason"]
