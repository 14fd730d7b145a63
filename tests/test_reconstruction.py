"""Local reconstruction after masking: masks kept bit for bit, the block's error against the dense
block falls, seeded, identical when offloaded, on every family's towers; options and records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest_vlm import CASES, make_model, make_processor, processor_for, write_data
from safetensors.torch import load_file
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.core.methods import RECONSTRUCTION
from ecoflap_cli.data.multimodal import make_multimodal_batches, read_image_text_jsonl
from ecoflap_cli.engine.blockwise import capture_inputs, run_block
from ecoflap_cli.engine.pruning import PruneSettings, _collect_statistics, prune_linear, prune_model
from ecoflap_cli.engine.reconstruction import reconstruct_block, recording
from ecoflap_cli.errors import PlanError
from ecoflap_cli.io.loading import LoadOptions, load_model
from ecoflap_cli.models import REGISTRY, get_adapter
from ecoflap_cli.models.base import hidden_of
from ecoflap_cli.stages.sweep import parse_method

FIT = {"steps": 12, "lr": 0.05, "batch": 0, "bias": True}


def _batches(rows: int = 4, n: int = 2) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"input_ids": (ids := torch.randint(3, 100, (rows, 16), generator=gen)), "attention_mask": torch.ones_like(ids)}
        for _ in range(n)
    ]


def _half(adapter) -> dict[str, int]:
    model = adapter.model
    return {t: model.get_parameter(t).numel() // 2 for b in adapter.blocks() for t in b.tensor_names()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().view(torch.int32)


def _first_block_fit(adapter, granularity: str, **fit) -> tuple[dict, dict, float, float]:
    """Prune block 0 by Wanda, then reconstruct it: (weights before the fit, after, the block's
    relative output error against the dense block before and after the fit)."""
    block = adapter.blocks()[0]
    inputs = capture_inputs(adapter, block, _batches())
    with torch.no_grad():
        dense_out = [hidden_of(run_block(block, item)).clone() for item in inputs]
    names = list(block.linears)
    counts = _half(adapter)
    settings = PruneSettings("wanda")
    with recording(adapter, block, granularity, inputs) as units:
        stats = _collect_statistics(block, inputs, "col_sq", names)
    for name in names:
        prune_linear(block.linears[name], counts[f"{name}.weight"], stats[name], settings, "row")

    def error() -> float:
        with torch.no_grad():
            outs = [hidden_of(run_block(block, item)) for item in inputs]
        num = sum(float((o - d).square().sum()) for o, d in zip(outs, dense_out))
        return num / sum(float(d.square().sum()) for d in dense_out)

    before = {n: block.linears[n].weight.detach().clone() for n in names}
    err_before = error()
    checked = RECONSTRUCTION.get(granularity).settings({**FIT, **fit})
    reconstruct_block(adapter, block, inputs, names, units, seed=0, **checked)
    after = {n: block.linears[n].weight.detach().clone() for n in names}
    return before, after, err_before, error()


@pytest.mark.parametrize("granularity", ["sublayer", "block"])
def test_zeros_kept_bit_for_bit_and_block_error_falls(tiny_llama: Path, granularity: str) -> None:
    adapter = get_adapter(load_model(str(tiny_llama)).model)
    before, after, err_before, err_after = _first_block_fit(adapter, granularity)
    for name, old in before.items():
        pruned = old == 0
        assert int(pruned.sum()) == old.numel() // 2
        assert torch.equal(_bits(after[name])[pruned], _bits(old)[pruned]), name  # +0.0 stays +0.0
        assert torch.equal(after[name] == 0, pruned), name  # no kept weight became zero
        assert not torch.equal(after[name], old), f"{name}: kept weights not fitted"
    assert err_after < 0.7 * err_before, (err_before, err_after)


def test_reconstruction_units_come_from_the_structure(tiny_llama: Path, tiny_opt: Path) -> None:
    llama = get_adapter(load_model(str(tiny_llama)).model)
    assert llama.reconstruction_units(llama.blocks()[0]) == ["self_attn", "mlp"]
    # OPT's fc1 / fc2 sit in the layer itself: they are fitted with the whole block, after self_attn
    opt = get_adapter(load_model(str(tiny_opt)).model)
    assert opt.reconstruction_units(opt.blocks()[0]) == ["self_attn", ""]
    t5 = REGISTRY["blip-2"](make_model("blip2-t5"))
    encoder = [b for b in t5.blocks() if b.tower == "language-encoder"][0]
    assert t5.reconstruction_units(encoder) == ["layer.0", "layer.1"]


def _prune(path: Path, recon: str | None, seed: int = 0, opts: LoadOptions | None = None, nm=None, **fit):
    loaded = load_model(str(path), opts or LoadOptions())
    adapter = get_adapter(loaded.model)
    counts = _half(adapter)
    store = None if opts is None or (opts.offload is None and opts.device_map is None) else "cpu"
    settings = PruneSettings(
        "wanda", nm=nm, store_device=store, reconstruct=recon, reconstruct_settings={**FIT, **fit}, seed=seed
    )
    notes: list[dict] = []
    results = prune_model(adapter, counts, _batches(), settings, notes=notes)
    return loaded, results, notes


def _weights(loaded, folder: Path) -> dict[str, torch.Tensor]:
    loaded.model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def test_same_seed_same_weights_other_seed_other_weights(tiny_llama: Path, tmp_path: Path) -> None:
    runs = [_weights(_prune(tiny_llama, "sublayer", seed, batch=1)[0], tmp_path / f"s{i}") for i, seed in
            enumerate((0, 0, 1))]  # fmt: skip
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    assert not all(torch.equal(v, runs[2][k]) for k, v in runs[0].items())


def test_reconstruction_records_and_exact_counts(tiny_llama: Path) -> None:
    _, results, notes = _prune(tiny_llama, "sublayer")
    assert all(r.zeros == r.planned_zeros for r in results)
    assert [n["unit"] for n in notes[:2]] == ["self_attn", "mlp"]
    assert len(notes) == 2 * len({r.name.rsplit(".", 3)[0] for r in results})
    assert all(n["error_last"] < n["error_first"] for n in notes)


def test_offloaded_runs_bit_identical_to_whole_model(tiny_llama: Path, tmp_path: Path) -> None:
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
             "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
             "lm_head": "cpu"}  # fmt: skip
    placements = {
        "whole": None,
        "sequential-disk": LoadOptions(offload="disk", offload_folder=str(tmp_path / "seq")),
        "sequential-cpu": LoadOptions(offload="cpu"),
        "split": LoadOptions(device_map=json.dumps(split), offload_folder=str(tmp_path / "split")),
    }
    weights = {name: _weights(_prune(tiny_llama, "sublayer", opts=o)[0], tmp_path / name)
               for name, o in placements.items()}  # fmt: skip
    whole = weights.pop("whole")
    reference = _weights(_prune(tiny_llama, None)[0], tmp_path / "plain")
    assert not torch.equal(whole["model.layers.0.mlp.up_proj.weight"], reference["model.layers.0.mlp.up_proj.weight"])
    for name, got in weights.items():
        assert got.keys() == whole.keys()
        for key, value in whole.items():
            assert torch.equal(value, got[key]), (name, key)


def test_nm_structure_kept(tiny_llama: Path) -> None:
    loaded, _, _ = _prune(tiny_llama, "block", nm=(2, 4))
    adapter = get_adapter(loaded.model)
    for name in _half(adapter):
        weight = loaded.model.get_parameter(name).detach()
        zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(dim=-1)
        assert bool((zeros == 2).all()), name


def test_half_precision_model_fits_in_fp32_and_keeps_its_dtype(tiny_llama: Path) -> None:
    loaded, results, notes = _prune(tiny_llama, "sublayer", opts=LoadOptions(dtype="bfloat16"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert all(r.zeros == r.planned_zeros for r in results)
    assert all(n["error_last"] < n["error_first"] for n in notes)


# --- vision-language towers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    data = write_data(tmp_path_factory.mktemp("vlm-data"))
    root = tmp_path_factory.mktemp("processors")
    processors = {kind: make_processor(kind, root / kind) for kind in ("blip-2", "instructblip", "clip")}
    captions = read_image_text_jsonl(data["captions"])
    questions = read_image_text_jsonl(data["vqa"])
    return processors, [captions[0], questions[1], captions[2], questions[3]]


@pytest.mark.parametrize(
    ("case", "granularity"),
    [
        ("blip2-opt", "sublayer"),
        ("blip2-t5", "sublayer"),
        ("clip", "sublayer"),
        ("instructblip-opt", "block"),
    ],  # fmt: skip
)
def test_vision_language_towers(case: str, granularity: str, vlm: tuple[dict, list[dict]]) -> None:
    processors, records = vlm
    model = make_model(case)
    adapter = get_adapter(model) if CASES[case][0] == "clip" else REGISTRY[model.config.model_type](model)
    batches = make_multimodal_batches(adapter, processor_for(processors, case), records, 2, 16)
    counts = _half(adapter)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    notes: list[dict] = []
    settings = PruneSettings("wanda", reconstruct=granularity, reconstruct_settings={**FIT, "steps": 4})
    results = prune_model(adapter, counts, batches, settings, notes=notes)
    assert all(r.zeros == r.planned_zeros for r in results)
    assert {n["block"] for n in notes} == {b.name for b in adapter.blocks()}
    biases = {f"{n[: -len('.weight')]}.bias" for n in counts}
    for name, value in model.state_dict().items():
        if name not in counts and name not in biases:
            assert torch.equal(value, before[name]), f"{name} changed but is neither pruned nor a pruned bias"
    fitted = [n for n in counts if not torch.equal(model.state_dict()[n], before[n])]
    assert len(fitted) == len(counts)


# --- options and records -------------------------------------------------------------------------


def test_sweep_method_syntax() -> None:
    spec = parse_method("mix:wanda+sublayer@steps=8,lr=0.0002")
    assert spec.reconstruct == "sublayer"
    assert spec.reconstruct_settings() == {"steps": 8, "lr": 0.0002}
    assert spec.name == "mix-auto:wanda+sublayer@lr=0.0002,steps=8"
    assert parse_method(spec.name) == spec
    assert parse_method("uniform:sparsegpt+block").name == "uniform:sparsegpt+block"
    for bad in ("uniform:wanda+", "uniform:wanda+nope", "llmc:wanda+sublayer", "uniform:wanda@steps=3"):
        with pytest.raises(PlanError):
            parse_method(bad)
    with pytest.raises(PlanError, match="steps"):
        RECONSTRUCTION.get("sublayer").settings({"steps": -1})


def test_cli_prune_records_the_reconstruction(tiny_llama: Path, calib_text: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    base = ["prune", "-m", str(tiny_llama), "--sparsity", "0.5", "--allocator", "uniform", "--calib", str(calib_text),
            "--samples", "4", "--seqlen", "16", "--batch-size", "2"]  # fmt: skip
    result = runner.invoke(app, [*base, "--reconstruct", "sublayer", "--recon-param", "steps=2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "ecoflap_report.json").read_text())
    record = report["reconstruction"]
    assert record["name"] == "sublayer" and record["steps"] == 2 and record["seed"] == 0
    assert {u["unit"] for u in record["units"]} == {"self_attn", "mlp"}
    evaluated = runner.invoke(app, ["eval", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "sublayer reconstruction" in evaluated.output
    bad = runner.invoke(app, [*base, "--reconstruct", "sublayer", "--recon-param", "nope=1", "-o", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "nope" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "b").exists()
    off = runner.invoke(app, [*base, "--recon-param", "steps=2", "-o", str(tmp_path / "c")])
    assert off.exit_code != 0 and "--reconstruct" in off.output


def _linear_fit(lr: float, scale: float = 1.0):
    """A pruned linear (half its weights zero) fitted to its dense outputs; weights x ``scale``."""
    from ecoflap_cli.engine.reconstruction import _Fit

    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(32, 16)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(16, 32, generator=gen) * 0.2 * scale)
        dense.bias.copy_(torch.randn(16, generator=gen) * 0.1 * scale)
    unit = torch.nn.Linear(32, 16)
    unit.load_state_dict(dense.state_dict())
    with torch.no_grad():
        unit.weight.masked_fill_(torch.rand(16, 32, generator=gen) < 0.5, 0.0)
    inputs = [torch.randn(4, 8, 32, generator=gen) for _ in range(6)]
    pieces = [(((x,), {}), dense(x).detach()) for x in inputs]
    pruned = unit.weight.detach().clone()
    fit = _Fit(unit, "u", ["u.weight", "u.bias"], seed=0)
    return fit.run(pieces, 8, lr), unit, pruned


def test_a_fit_that_does_not_lower_the_error_is_dropped() -> None:
    record, unit, pruned = _linear_fit(lr=50.0)  # absurd steps: the error rises
    assert record["kept"] is False and record["error_after"] >= record["error_before"]
    assert unit.weight.equal(pruned)  # the unit keeps its pruned weights
    record, unit, pruned = _linear_fit(lr=0.05)
    assert record["kept"] is True and record["error_after"] < record["error_before"]
    assert not unit.weight.equal(pruned) and unit.weight[pruned == 0].eq(0).all()


def test_the_step_size_is_relative_to_the_weights_scale() -> None:
    # the same model with weights 10x smaller (Qwen2.5's are about 12x smaller than SmolLM2's):
    # the same setting gives the same relative improvement
    big, _, _ = _linear_fit(lr=0.05)
    small, _, _ = _linear_fit(lr=0.05, scale=0.1)
    assert small["error_after"] / small["error_before"] == pytest.approx(
        big["error_after"] / big["error_before"], rel=1e-3
    )
