"""Sequential (offloaded) mode and accelerate placement: same pruned weights, clear errors."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.engine.offload import any_offloaded
from ecoflap_cli.engine.pruning import PruneSettings, prune_model
from ecoflap_cli.engine.scoring import ZerothOrderSettings, zeroth_order_scores
from ecoflap_cli.errors import ModelError
from ecoflap_cli.io.loading import LoadOptions, load_model
from ecoflap_cli.models import get_adapter

SPLIT_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [
        {"input_ids": (ids := torch.randint(3, 100, (2, 16), generator=gen)), "attention_mask": torch.ones_like(ids)}
        for _ in range(2)
    ]


def _placements(tmp_path):
    return {
        "whole": LoadOptions(),
        "sequential-disk": LoadOptions(offload="disk", offload_folder=str(tmp_path / "seq")),
        "split-cpu-disk": LoadOptions(device_map=json.dumps(SPLIT_MAP), offload_folder=str(tmp_path / "split")),
    }


@pytest.mark.parametrize("solver", ["wanda", "sparsegpt"])
def test_pruned_weights_identical_whole_sequential_and_split(solver, tiny_llama, tmp_path):
    results = {}
    for name, opts in _placements(tmp_path).items():
        loaded = load_model(str(tiny_llama), opts)
        assert any_offloaded(loaded.model) == (name != "whole")
        adapter = get_adapter(loaded.model)
        counts = {t: loaded.model.get_parameter(t).numel() // 2 for b in adapter.blocks() for t in b.tensor_names()}
        store = None if name == "whole" else "cpu"
        prune_model(adapter, counts, _batches(), PruneSettings(solver, store_device=store))
        loaded.model.save_pretrained(tmp_path / name)
        results[name] = load_file(tmp_path / name / "model.safetensors")
    for name in ("sequential-disk", "split-cpu-disk"):
        assert results[name].keys() == results["whole"].keys()
        for key, value in results["whole"].items():
            assert torch.equal(value, results[name][key]), (name, key)
    assert int((results["whole"]["model.layers.3.mlp.up_proj.weight"] == 0).sum()) == 32 * 64 // 2


def test_zeroth_order_scores_identical_when_offloaded(tiny_llama, tmp_path):
    scores = {}
    for name, opts in _placements(tmp_path).items():
        adapter = get_adapter(load_model(str(tiny_llama), opts).model)
        scores[name] = zeroth_order_scores(adapter, _batches(), ZerothOrderSettings(seed=4))
    assert scores["whole"] == scores["sequential-disk"] == scores["split-cpu-disk"]


def test_cli_prune_with_disk_offload_matches_whole(tiny_llama, tmp_path, calib_text, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    # zeroth-order for both: auto would pick first-order in memory and zeroth-order when offloaded
    base = (
        f"prune -m {tiny_llama} --sparsity 0.5 --calib {calib_text} --samples 4 --seqlen 16 --score-samples 2 "
        "--score-method zeroth"
    )
    assert runner.invoke(app, shlex.split(base + " -o whole")).exit_code == 0
    res = runner.invoke(app, shlex.split(base + " --offload disk --offload-folder off -o seq"))
    assert res.exit_code == 0, res.stderr
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    seq = load_file(tmp_path / "seq" / "model.safetensors")
    assert all(torch.equal(whole[k], seq[k]) for k in whole)
    report = json.loads((tmp_path / "seq" / "ecoflap_report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (LoadOptions(device_map='{"": 3}'), "this machine has"),
        (LoadOptions(device_map='{"": "tpu"}'), "unknown device"),
        (LoadOptions(device_map="everywhere"), "--device-map takes"),
        (LoadOptions(device_map="auto", max_memory={"cpu": "10KiB"}), "less than one block"),
        (LoadOptions(device_map="auto", max_memory={"cpu": "lots"}), "cannot read size"),
        (LoadOptions(offload="disk"), "--offload-folder"),
        (LoadOptions(offload="tape", offload_folder="x"), "cpu or disk"),
        (LoadOptions(offload="disk", offload_folder="x", device_map="auto"), "not both"),
    ],
)
def test_bad_memory_settings_fail_before_work(opts, message, tiny_llama):
    with pytest.raises(ModelError, match=message):
        load_model(str(tiny_llama), opts)


def test_activation_budget_error_names_the_option(tiny_llama, tmp_path, calib_text, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(
        app,
        shlex.split(
            f"prune -m {tiny_llama} --sparsity 0.5 --allocator uniform --calib {calib_text} "
            f"--samples 1000000000 --seqlen 100 -o out"
        ),
    )
    assert res.exit_code != 0
    assert "lower --samples or --seqlen" in res.stderr
    assert not (tmp_path / "out").exists()


def test_offloaded_model_saves_in_streamed_shards(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from ecoflap_cli.io.checkpoint import save_offloaded

    loaded = load_model(str(tiny_llama), LoadOptions(offload="disk", offload_folder=str(tmp_path / "off")))
    out = tmp_path / "out"
    out.mkdir()
    save_offloaded(loaded.model, out, max_shard_bytes=20_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    assert (out / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for (name, a), (_, b) in zip(original.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_zeroth_order_storage_is_checked_before_work(tiny_llama):
    """Replayed activations plus dL/dh for every calibration token must fit, or a clear error."""
    from ecoflap_cli.engine.estimates import check_zeroth_memory, zeroth_order_bytes

    model = load_model(str(tiny_llama)).model
    hidden = model.config.hidden_size
    small = [{"input_ids": torch.zeros(2, 16, dtype=torch.long)}]
    assert zeroth_order_bytes(model, small) == 32 * hidden * (2 * 4 + 4)  # fp32 model: 2 sets + G
    check_zeroth_memory(model, small)  # fits
    huge = [{"input_ids": torch.empty(10**6, 10**6, device="meta")}]  # counted, never allocated
    with pytest.raises(ModelError, match="lower --samples or --seqlen"):
        check_zeroth_memory(model, huge)
