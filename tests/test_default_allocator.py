"""One-shot defaults: the allocation (the search refining the paper's plan for language models in
memory, the paper's rule where the search cannot run or the user configured the rule, and for
vision-language models; the plan records which and why) and the scoring samples' length."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest_vlm import make_model
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.io.loading import LoadedModel, load_model
from ecoflap_cli.stages import driver

SIZES = "--samples 8 --seqlen 32 --score-samples 4"


def prune(args: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, shlex.split(f"prune {args} -o out --overwrite"))
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    return plan, scores


def test_one_shot_default_refines_the_paper_plan_with_the_search(tiny_llama, calib_text, tmp_path, monkeypatch):
    plan, scores = prune(f"-m {tiny_llama} -s 0.6 --calib {calib_text} {SIZES}", tmp_path, monkeypatch)
    assert plan["allocator"]["name"] == "search"
    assert "refines the paper's plan" in plan["allocator"]["chosen"]
    method = scores["method"]
    assert method["name"] == "search" and method["started_from"] == "ecoflap" and method["target"] == 0.6
    assert method["final_fitness"] <= method["start_fitness"]
    total = sum(g["params"] for g in plan["groups"])
    assert sum(g["zeros"] for g in plan["groups"]) == round(0.6 * total)  # the budget, exact

    # the same plan as asking for the search by name
    named, _ = prune(f"-m {tiny_llama} -s 0.6 --calib {calib_text} {SIZES} --allocator search", tmp_path, monkeypatch)
    assert [g["zeros"] for g in named["groups"]] == [g["zeros"] for g in plan["groups"]]


@pytest.mark.parametrize(
    "extra",
    ["--score-method first", "--max-sparsity 0.65", "--score-param seed=3"],
    ids=["scoring", "cap", "scoring-setting"],
)
def test_configuring_the_paper_rule_keeps_it(extra, tiny_llama, calib_text, tmp_path, monkeypatch):
    plan, scores = prune(f"-m {tiny_llama} -s 0.6 --calib {calib_text} {SIZES} {extra}", tmp_path, monkeypatch)
    assert plan["allocator"]["name"] == "ecoflap" and scores["method"]["name"] != "search"
    assert "did not run" not in plan["allocator"]["chosen"]


def test_offloaded_weights_fall_back_to_the_paper_rule_and_say_why(tiny_llama, calib_text, tmp_path, monkeypatch):
    plan, scores = prune(
        f"-m {tiny_llama} -s 0.6 --calib {calib_text} {SIZES} --offload disk --offload-folder off",
        tmp_path,
        monkeypatch,
    )
    assert plan["allocator"]["name"] == "ecoflap" and scores["method"]["name"] != "search"
    assert "did not run: the weights are offloaded" in plan["allocator"]["chosen"]


def _resolved(loaded: LoadedModel) -> tuple[str, str | None]:
    adapter = driver.load_adapter(loaded)
    return driver._resolved_allocator(loaded, adapter, "auto", driver.OneShot(), {})


def test_no_room_for_the_search_falls_back_before_any_work(tiny_llama, monkeypatch):
    import ecoflap_cli.engine.memory as memory

    loaded = load_model(str(tiny_llama))
    assert _resolved(loaded) == ("search", None)
    monkeypatch.setattr(memory, "free_memory", lambda device="cpu": 1000)
    name, note = _resolved(loaded)
    assert name == "ecoflap" and note is not None and "GiB beside the weights on cpu" in note


@pytest.mark.parametrize("case", ["blip2-opt", "clip"])
def test_vision_language_models_keep_the_paper_rule(case):
    model = make_model(case)
    loaded = LoadedModel(model, None, case)
    assert _resolved(loaded) == ("ecoflap", None)


# --- the scoring samples' length -----------------------------------------------------------------


@pytest.mark.parametrize(("extra", "expected"), [("--seqlen 32", 16), ("--seqlen 8", 8), ("--score-seqlen 24", 24)])
def test_one_shot_scores_short_samples_of_text_by_default(
    extra, expected, tiny_llama, calib_text, tmp_path, monkeypatch
):
    """A language model's one-shot scores read ``ONE_SHOT_SCORE_SEQLEN`` tokens per sample (the
    length the benchmarks measured quality at), never more than the pruning calibration's, unless
    ``--score-seqlen`` says otherwise."""
    monkeypatch.setattr(driver, "ONE_SHOT_SCORE_SEQLEN", 16)  # below the tiny model's context of 128
    args = f"-m {tiny_llama} -s 0.5 --allocator ecoflap --calib {calib_text} --samples 4 --score-samples 4 {extra}"
    _, scores = prune(args, tmp_path, monkeypatch)
    assert scores["calibration"]["seqlen"] == expected


def test_vision_language_scoring_length_is_the_calibration_s(tmp_path):
    model = make_model("blip2-opt")
    loaded = LoadedModel(model, None, "blip2-opt")
    calib = driver.CalibrationOptions("captions.jsonl", 8, None, 4, 0, "text")
    assert driver.one_shot_score_seqlen(loaded, driver.load_adapter(loaded), calib) is None
