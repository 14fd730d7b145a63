"""The registries: one entry per method drives the CLI, the driver, plan validation and the sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.core import allocation
from ecoflap_cli.core.methods import ALLOCATORS, SCORING, SOLVERS, Groups
from ecoflap_cli.core.registry import Entry, Param
from ecoflap_cli.errors import PlanError
from ecoflap_cli.stages.sweep import SweepConfig, parse_method, run_sweep


def _toy(groups: Groups, target: float, tilt: float) -> allocation.Allocation:
    """Sparsity tilted linearly with depth, mean exactly the target (a toy for the tests)."""
    raw = [target + tilt * (2 * d - 1) for d in groups.depths]
    return allocation.from_sparsities(groups.sizes, raw, target)


@pytest.fixture
def toy_allocator():
    ALLOCATORS.add(
        Entry(
            "toy",
            "A toy: sparsity tilted with depth.",
            _toy,
            params=(Param("tilt", 0.05, "Tilt of sparsity with depth.", low=0.0, high=0.3),),
        )
    )
    yield "toy"
    ALLOCATORS.remove("toy")


def _cli(args, cwd: Path, monkeypatch, ok: bool = True):
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if ok:
        assert result.exit_code == 0, result.stderr
    return result


def _zeros(directory: Path) -> dict[str, int]:
    weights = load_file(str(directory / "model.safetensors"))
    return {k: int((v == 0).sum()) for k, v in weights.items() if k.endswith(".weight") and v.dim() == 2}


def test_a_registered_allocator_runs_through_allocate_prune_and_sweep(
    toy_allocator, tiny_llama, calib_text, eval_text, tmp_path, monkeypatch
):
    """Adding an allocator is one function and one entry: allocate, prune and sweep all take it."""
    common = ["--calib", calib_text, "--samples", 4, "--seqlen", 32, "--batch-size", 2]
    _cli(["score", "-m", tiny_llama, "--method", "first", *common, "-o", "scores.json"], tmp_path, monkeypatch)
    _cli(
        ["allocate", "scores.json", "-s", 0.5, "--allocator", "toy", "--param", "tilt=0.1", "-o", "plan.json"],
        tmp_path,
        monkeypatch,
    )
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["allocator"] == {"name": "toy", "per_tower": False, "tilt": 0.1}
    sparsities = [g["sparsity"] for g in plan["groups"]]
    assert sparsities[-1] > sparsities[0]  # tilted with depth
    total = sum(g["params"] for g in plan["groups"])
    assert abs(sum(g["zeros"] for g in plan["groups"]) - round(0.5 * total)) <= 1
    _cli(["prune", "-m", tiny_llama, "--plan", "plan.json", *common, "-o", "staged"], tmp_path, monkeypatch)
    _cli(
        ["prune", "-m", tiny_llama, "-s", 0.5, "--allocator", "toy", "--param", "tilt=0.1", *common, "-o", "oneshot"],
        tmp_path,
        monkeypatch,
    )
    assert _zeros(tmp_path / "oneshot") == _zeros(tmp_path / "staged")
    bad = _cli(
        ["allocate", "scores.json", "-s", 0.5, "--allocator", "toy", "--param", "tilt=0.9"],
        tmp_path,
        monkeypatch,
        ok=False,
    )
    assert bad.exit_code != 0 and "tilt must be in [0, 0.3]" in bad.stderr
    cfg = SweepConfig(
        model=str(tiny_llama),
        calib=str(calib_text),
        text=str(eval_text),
        methods=["toy:wanda@tilt=0.1"],
        sparsities=[0.5],
        output=str(tmp_path / "sweep"),
        samples=4,
        seqlen=32,
        score_samples=4,
        score_seqlen=16,
        batch_size=2,
        eval_seqlen=32,
        eval_windows=2,
        eval_batch_size=2,
        plot=False,
    )
    summary = run_sweep(cfg)
    run = summary["runs"][0]
    assert "error" not in run and run["method"] == "toy:wanda@tilt=0.1" and run["plan_matches"]
    assert run["block_sparsity"] == [round(s, 5) for s in sparsities]


def test_unknown_names_fail_before_any_model_is_loaded(tmp_path, monkeypatch):
    """A typo in a method name is refused while the options are parsed (the model does not exist)."""
    for args, word in (
        (["--solver", "wandaa"], "unknown solver 'wandaa'"),
        (["--allocator", "ecoflapp"], "unknown allocator 'ecoflapp'"),
        (["--score-method", "zeroth-order"], "unknown scoring method"),
        (["--lam", "nan"], "lam must be a finite number"),
        (["--allocator", "rank", "--alpha", "0.5"], "rank takes no parameter 'alpha'"),
        (["--solver-param", "damp=-1", "--solver", "sparsegpt"], "damp must be in"),
        (["--allocator", "uniform", "--score-method", "zeroth"], "uses no scores"),
    ):
        result = _cli(["prune", "-m", tmp_path / "no-such-model", "-s", 0.5, *args], tmp_path, monkeypatch, ok=False)
        assert result.exit_code != 0, args
        assert word in result.output + result.stderr, (args, result.output, result.stderr)
        assert "loading" not in result.stderr and "not found" not in result.stderr


def test_help_lists_and_completion_offers_the_registered_names(toy_allocator, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    result = CliRunner().invoke(app, ["prune", "--help"])
    assert "[auto|ecoflap|uniform|owl|depth|rank|mix|search]" in result.stdout  # names at import time
    assert "[wanda|sparsegpt|magnitude]" in result.stdout
    monkeypatch.setenv("_ECOFLAP_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "ecoflap prune --allocator ")
    monkeypatch.setenv("COMP_CWORD", "3")
    done = CliRunner().invoke(app, [], prog_name="ecoflap")
    assert set(done.stdout.split()) >= {"auto", "mix", "toy"}


def test_plans_are_checked_against_the_registry(tiny_llama, tmp_path):
    from ecoflap_cli.core.methods import check_plan_methods

    check_plan_methods({"allocator": {"name": "mix", "per_tower": False, "lam": 0.15, "alpha": 0.5}})
    for record, word in (
        ({"name": "nope"}, "unknown allocator"),
        ({"name": "mix", "lam": 7}, "lam must be in"),
        ({"name": "mix", "beta": 1}, "takes no parameter 'beta'"),
        ({"name": "depth", "step": "x"}, "takes a number"),
    ):
        with pytest.raises(PlanError, match=word):
            check_plan_methods({"allocator": record})


def test_sweep_keys_come_from_the_registries():
    spec = parse_method("mix-zeroth:sparsegpt@lam=0.2,zseed=3,damp=0.05")
    assert spec.allocator_settings() == {"lam": 0.2}
    assert spec.scoring_settings() == {"seed": 3}
    assert spec.solver_settings() == {"damp": 0.05}
    assert spec.score_key() == "zeroth@seed=3"
    with pytest.raises(PlanError, match="allowed: .*alpha"):
        parse_method("mix:wanda@bogus=1")
    with pytest.raises(PlanError, match="damp must be in"):
        parse_method("uniform:sparsegpt@damp=-1")


@given(
    st.sampled_from(["eps", "lam", "alpha", "step", "temperature", "damp", "m"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.booleans()),
)
@settings(max_examples=200, deadline=None)
def test_every_param_check_accepts_only_valid_values(name, value):
    """Whatever the value, a parameter check either returns a value in range or raises PlanError."""
    params = [p for r in (ALLOCATORS, SOLVERS, SCORING) for e in r for p in e.params if p.name == name]
    for param in params:
        try:
            checked = param.check(value, "test")
        except PlanError:
            continue
        assert isinstance(checked, float) and math.isfinite(checked)
        assert param.low is None or checked >= param.low
        assert param.high is None or checked <= param.high


@pytest.mark.parametrize(
    "method, options",
    [
        ("ecoflap:wanda", []),  # the defaults: prune's auto allocator is ecoflap, auto scoring
        (
            "ecoflap-zeroth:sparsegpt@temp=2,damp=0.02",
            [
                "--allocator",
                "ecoflap",
                "--temperature",
                2,
                "--score-method",
                "zeroth",
                "--solver",
                "sparsegpt",
                "--solver-param",
                "damp=0.02",
            ],
        ),
    ],
)
def test_a_sweep_row_and_prune_give_bit_identical_weights(
    method, options, tiny_llama, calib_text, eval_text, tmp_path, monkeypatch
):
    import torch

    from ecoflap_cli.stages.sweep import SweepRunner

    sizes = dict(samples=4, seqlen=32, score_samples=4, score_seqlen=16, batch_size=2)
    cfg = SweepConfig(
        model=str(tiny_llama),
        calib=str(calib_text),
        text=str(eval_text),
        methods=[method],
        sparsities=[0.5],
        output=str(tmp_path / "sweep"),
        eval_seqlen=32,
        eval_windows=2,
        eval_batch_size=2,
        plot=False,
        **sizes,
    )
    runner = SweepRunner(cfg)
    record = runner.run(parse_method(method), 0.5)
    assert "error" not in record, record.get("error")
    swept = {k: v.clone() for k, v in runner.loaded.model.state_dict().items()}
    _cli(
        [
            "prune",
            "-m",
            tiny_llama,
            "-s",
            0.5,
            *options,
            "--calib",
            calib_text,
            "--samples",
            4,
            "--seqlen",
            32,
            "--score-samples",
            4,
            "--score-seqlen",
            16,
            "--batch-size",
            2,
            "-o",
            "out",
        ],
        tmp_path,
        monkeypatch,
    )
    pruned = load_file(str(tmp_path / "out" / "model.safetensors"))
    compared = [k for k in pruned if k in swept]
    assert len(compared) >= 10 and any(int((pruned[k] == 0).sum()) > 0 for k in compared)
    for key in compared:
        assert torch.equal(pruned[key], swept[key]), key


def test_docs_methods_table_is_generated_from_the_registries():
    from ecoflap_cli.core.docs import methods_markdown

    path = Path(__file__).parents[1] / "docs" / "methods.md"
    assert path.read_text() == methods_markdown(), "regenerate: python -m ecoflap_cli.core.docs > docs/methods.md"
