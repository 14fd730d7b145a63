"""Calibration sources: self-generated text (``--calib self``) and mixes in stated proportions."""

from __future__ import annotations

import json

import pytest
import torch

from ecoflap_cli.data.self_calib import SelfRecipe, generate_windows, sample_next, start_ids, temperature_at
from ecoflap_cli.data.text import calibration_windows, parse_calib_spec
from ecoflap_cli.errors import DataError


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_llama)


def test_self_generation_is_deterministic_and_seeded(tiny):
    model, tok = tiny
    first = generate_windows(model, tok, 5, 12, seed=0, recipe=SelfRecipe(batch_size=2))
    again = generate_windows(model, tok, 5, 12, seed=0, recipe=SelfRecipe(batch_size=2))
    other = generate_windows(model, tok, 5, 12, seed=1, recipe=SelfRecipe(batch_size=2))
    assert first.shape == (5, 12) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert (first[:, 0] == tok.bos_token_id).all()
    assert int(first.max()) < len(tok)


def test_window_i_does_not_depend_on_how_many_are_asked_for(tiny):
    model, tok = tiny
    few = generate_windows(model, tok, 3, 12, seed=4, recipe=SelfRecipe(batch_size=4))
    many = generate_windows(model, tok, 8, 12, seed=4, recipe=SelfRecipe(batch_size=4))
    assert torch.equal(few, many[:3])


def test_generation_with_the_kv_cache_matches_full_recompute(tiny):
    """With a nucleus so small only the best token survives, sampling is greedy decoding: the
    cached generation must equal argmax decoding that re-runs the whole prefix at every step."""
    model, tok = tiny
    got = generate_windows(model, tok, 3, 10, seed=0, recipe=SelfRecipe(top_p=1e-9, batch_size=3))
    ids = torch.tensor([start_ids(tok)] * 3)
    with torch.no_grad():
        while ids.shape[1] < 10:
            logits = model(input_ids=ids).logits[:, -1, : len(tok)]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ids)


def test_prompt_and_schedule():
    recipe = SelfRecipe(temperature_start=1.2, temperature_end=0.6)
    assert temperature_at(0, 5, recipe) == pytest.approx(1.2)
    assert temperature_at(4, 5, recipe) == pytest.approx(0.6)
    assert temperature_at(2, 5, recipe) == pytest.approx(0.9)
    with pytest.raises(DataError):
        SelfRecipe(top_p=0)
    with pytest.raises(DataError):
        SelfRecipe(temperature_end=0)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, 1.0, 0.8, [gen])) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8: the tail is never drawn


def test_mix_gives_each_source_its_share(tiny, calib_text):
    model, tok = tiny
    windows, prov = calibration_windows(tok, f"{calib_text}:1,self:3", 8, 16, 0, model=model)
    assert windows.shape == (8, 16)
    record = prov.to_dict()
    assert [s["samples"] for s in record["sources"]] == [2, 6]
    assert [s["weight"] for s in record["sources"]] == [0.25, 0.75]
    assert record["sources"][1]["source"] == "self" and record["sources"][1]["tokens"] == 6 * 16
    assert record["sources"][1]["recipe"]["top_p"] == SelfRecipe().top_p
    json.dumps(record)  # the artifact's provenance stays JSON
    # each part is exactly what that source alone gives with the same seed, in spec order
    text_only, _ = calibration_windows(tok, str(calib_text), 2, 16, 0)
    assert torch.equal(windows[:2], text_only)
    assert torch.equal(windows[2:], generate_windows(model, tok, 6, 16, 0))


def test_the_generation_batch_changes_the_cost_not_the_tokens(tiny):
    model, tok = tiny
    one_by_one = generate_windows(model, tok, 5, 12, seed=3, recipe=SelfRecipe(batch_size=1))
    for batch in (2, 5, 32):
        assert torch.equal(generate_windows(model, tok, 5, 12, seed=3, recipe=SelfRecipe(batch_size=batch)), one_by_one)


def test_the_generation_batch_is_fitted_to_the_windows_and_the_free_memory(tiny, monkeypatch):
    from ecoflap_cli.data import self_calib
    from ecoflap_cli.engine import memory

    model, tok = tiny
    cfg = model.config
    per_window = self_calib.kv_cache_bytes(model, 100)
    assert (
        per_window
        == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 100 * 4
    )
    monkeypatch.setattr(memory, "free_memory", lambda device="cpu": 1 << 40)
    assert self_calib.fitted_recipe(model, SelfRecipe(), 64, 100).batch_size == 32
    assert self_calib.fitted_recipe(model, SelfRecipe(), 5, 100).batch_size == 5  # no larger than asked
    # room for the KV cache of 3 windows in a quarter of the free memory
    monkeypatch.setattr(memory, "free_memory", lambda device="cpu": 4 * 3 * per_window + 1)
    assert self_calib.fitted_recipe(model, SelfRecipe(), 64, 100).batch_size == 3
    monkeypatch.setattr(memory, "free_memory", lambda device="cpu": 10)
    assert self_calib.fitted_recipe(model, SelfRecipe(), 64, 100).batch_size == 1
    _, prov = calibration_windows(tok, "self", 4, 12, 7, model=model)
    assert prov.to_dict()["sources"][0]["recipe"]["batch_size"] == 1  # the batch used is recorded
    monkeypatch.setattr(memory, "free_memory", lambda device="cpu": None)  # unknown: only the windows cap it
    assert self_calib.fitted_recipe(model, SelfRecipe(), 64, 100).batch_size == 32


def test_self_alone_records_its_recipe(tiny):
    model, tok = tiny
    windows, prov = calibration_windows(tok, "self", 4, 12, 7, model=model)
    record = prov.to_dict()
    assert record["source"] == "self" and record["tokens"] == 48 and record["seed"] == 7
    assert record["sources"][0]["recipe"]["method"] == "self-generated"
    assert torch.equal(windows, generate_windows(model, tok, 4, 12, 7))


def test_plain_file_provenance_is_unchanged(tiny, calib_text):
    _, tok = tiny
    _, prov = calibration_windows(tok, str(calib_text), 2, 16, 0)
    assert set(prov.to_dict()) == {"source", "samples", "seqlen", "seed", "tokens"}


def test_spec_parsing(tmp_path):
    assert parse_calib_spec("self") == [("self", 1.0)]
    assert parse_calib_spec("hub:allenai/c4") == [("hub:allenai/c4", 1.0)]
    assert parse_calib_spec("a.txt:0.5,self:0.5") == [("a.txt", 0.5), ("self", 0.5)]
    assert parse_calib_spec("a.txt:1, self:3") == [("a.txt", 0.25), ("self", 0.75)]
    odd = tmp_path / "x,y:1"
    odd.write_text("text")
    assert parse_calib_spec(str(odd)) == [(str(odd), 1.0)]
    for bad in ("a.txt,self", "a.txt:0.5,self", "a.txt:0,self:1", "a.txt:-1,self:2", "self:1,self:1", ":1,self:1"):
        with pytest.raises(DataError):
            parse_calib_spec(bad)


def test_self_needs_the_model_and_enough_samples(tiny, calib_text):
    _, tok = tiny
    with pytest.raises(DataError, match="needs the model"):
        calibration_windows(tok, "self", 2, 8, 0)
    model, _ = tiny
    with pytest.raises(DataError, match="raise --samples"):
        calibration_windows(tok, f"{calib_text}:0.9,self:0.1", 2, 8, 0, model=model)


def test_no_calib_default_for_language_models_is_c4_from_the_hub(tiny, calib_text, monkeypatch):
    """With no --calib a language model calibrates on C4's first English shard (the paper's and
    Wanda's choice) through ``datasets``; a local dataset in the same format gives the windows the
    same documents give from a file, and the provenance names the hub dataset."""
    datasets = pytest.importorskip("datasets")
    from ecoflap_cli.data.text import DEFAULT_TEXT_DATASET

    _, tok = tiny
    docs = [f"document {i}: " + calib_text.read_text()[i * 40 : i * 40 + 400] for i in range(30)]
    calls = []

    def local(name, split, **kwargs):
        calls.append((name, split, kwargs))
        return datasets.Dataset.from_dict({"text": docs, "timestamp": ["t"] * len(docs)})

    monkeypatch.setattr(datasets, "load_dataset", local)
    windows, prov = calibration_windows(tok, None, 3, 16, 0)
    assert calls == [(DEFAULT_TEXT_DATASET[0], "train", {"data_files": {"train": DEFAULT_TEXT_DATASET[1]}})]
    assert prov.source == f"hub:{DEFAULT_TEXT_DATASET[0]}" and windows.shape == (3, 16)
    again, _ = calibration_windows(tok, None, 3, 16, 0)
    assert torch.equal(windows, again)  # seeded: the same documents and the same windows


def test_no_calib_offline_is_one_line_naming_c4_and_calib(tiny, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (OfflineModeIsEnabled)\ntraceback lines")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    _, tok = tiny
    with pytest.raises(DataError) as err:
        calibration_windows(tok, None, 2, 16, 0)
    assert "\n" not in str(err.value) and "allenai/c4" in str(err.value) and "--calib" in str(err.value)
