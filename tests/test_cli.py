"""End-to-end CLI tests on tiny LLaMA and OPT: pipes, one-shot, reload, and bad input."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ECOFLAP = f"{shlex.quote(sys.executable)} -m ecoflap_cli"


def sh(command: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{command}\nexit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def assert_zeros_match_plan(out: Path) -> dict:
    plan = json.loads((out / "plan.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    planned = {t["name"]: t["zeros"] for g in plan["groups"] for t in g["tensors"]}
    assert planned
    for name, zeros in planned.items():
        assert int((params[name] == 0).sum()) == zeros, name
    return plan


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_stages_through_a_real_shell_pipe(fixture, request, tmp_path, calib_text, eval_text):
    model = request.getfixturevalue(fixture)
    cmd = (
        f"{ECOFLAP} score -m {model} --calib {calib_text} --samples 8 --seqlen 32 --batch-size 4 -o - "
        f"| {ECOFLAP} allocate - --sparsity 0.6 -o - "
        f"| tee plan.json "
        f"| {ECOFLAP} prune -m {model} --plan - --calib {calib_text} --samples 16 --seqlen 32 -o out"
    )
    sh(cmd, tmp_path)
    plan = assert_zeros_match_plan(tmp_path / "out")
    # the default: the paper's rule with its cap at target + 0.1, and the plan says why
    assert plan["allocator"]["name"] == "ecoflap" and plan["allocator"]["chosen"].startswith("auto: the paper's rule")
    assert plan["allocator"]["max_sparsity"] == 0.7
    assert json.loads((tmp_path / "plan.json").read_text()) == plan
    sparsities = [g["sparsity"] for g in plan["groups"]]
    assert max(sparsities) <= 0.7 + 1e-3 and abs(plan["achieved_sparsity"] - 0.6) < 1e-3
    code, out, err = run_cli(
        shlex.split(f"eval out --text {eval_text} --seqlen 32 --max-windows 8 --compare {model} -o -"),
        tmp_path,
        request.getfixturevalue("monkeypatch"),
    )
    assert code == 0, err
    results = json.loads(out)
    assert results["summary"]["mismatches"] == 0
    assert results["summary"]["achieved"] == pytest.approx(0.6, abs=1e-3)
    assert results["perplexity"]["dense"] > 1 and results["perplexity"]["pruned"] > 1
    assert "perplexity" in err  # the table goes to stderr, the JSON to stdout


@pytest.mark.parametrize("solver", ["wanda", "sparsegpt", "magnitude"])
def test_one_shot_prune_writes_reloadable_checkpoint(solver, tiny_llama, tmp_path, calib_text, monkeypatch):
    code, _, err = run_cli(
        shlex.split(
            f"prune --model {tiny_llama} --sparsity 0.5 --solver {solver} --calib {calib_text} "
            f"--samples 8 --seqlen 32 --score-samples 4 -o out"
        ),
        tmp_path,
        monkeypatch,
    )
    assert code == 0, err
    out = tmp_path / "out"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "plan.json",
        "scores.json",
        "ecoflap_report.json",
    ):
        assert (out / name).is_file(), name
    plan = assert_zeros_match_plan(out)
    report = json.loads((out / "ecoflap_report.json").read_text())
    assert report["solver"] == solver and report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert plan["target_sparsity"] == 0.5
    # dense parts are untouched
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    planned = {t["name"] for g in plan["groups"] for t in g["tensors"]}
    for name, p in dense.named_parameters():
        if name not in planned:
            assert torch.equal(p, dict(pruned.named_parameters())[name]), name
    assert not list(tmp_path.glob(".out.*"))  # no temporary directory left behind


def test_nm_prune_with_uniform_plan(tiny_llama, tmp_path, calib_text, monkeypatch):
    code, _, err = run_cli(
        shlex.split(
            f"prune -m {tiny_llama} --sparsity 0.5 --allocator uniform --nm 2:4 "
            f"--calib {calib_text} --samples 4 --seqlen 32 -o out"
        ),
        tmp_path,
        monkeypatch,
    )
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    weight = model.model.layers[0].mlp.up_proj.weight
    kept = (weight != 0).reshape(weight.shape[0], -1, 4).sum(dim=2)
    assert torch.all(kept == 2)


def test_inspecting_a_plan_before_pruning(tiny_opt, tmp_path, calib_text, monkeypatch):
    code, _, err = run_cli(
        shlex.split(f"score -m {tiny_opt} --calib {calib_text} --samples 4 --seqlen 32 --method first -o scores.json"),
        tmp_path,
        monkeypatch,
    )
    assert code == 0, err
    code, out, err = run_cli(
        shlex.split("allocate scores.json -s 0.5 --allocator depth -o plan.json"), tmp_path, monkeypatch
    )
    assert code == 0 and "model.decoder.layers.0" in err and "budget per tower" in err
    assert out == ""
    plan = json.loads((tmp_path / "plan.json").read_text())
    sp = [g["sparsity"] for g in plan["groups"]]
    assert sp == sorted(sp) and plan["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_allocate_rank_mix_and_temperature_record_their_settings(tiny_opt, tmp_path, calib_text, monkeypatch):
    code, _, err = run_cli(
        shlex.split(f"score -m {tiny_opt} --calib {calib_text} --samples 4 --seqlen 32 --method first -o scores.json"),
        tmp_path,
        monkeypatch,
    )
    assert code == 0, err
    cases = {
        "rank --lam 0.2": {"name": "rank", "lam": 0.2},
        "mix --lam 0.1 --alpha 0.25": {"name": "mix", "lam": 0.1, "alpha": 0.25},
        "mix": {"name": "mix", "lam": 0.15, "alpha": 0.5},
        "ecoflap --temperature 2": {"name": "ecoflap", "temperature": 2.0, "max_sparsity": 0.6},
    }
    for i, (args, expected) in enumerate(cases.items()):
        code, _, err = run_cli(
            shlex.split(f"allocate scores.json -s 0.5 --allocator {args} -o p{i}.json --no-show"), tmp_path, monkeypatch
        )
        assert code == 0, err
        plan = json.loads((tmp_path / f"p{i}.json").read_text())
        assert {k: plan["allocator"][k] for k in expected} == expected
        assert plan["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
    code, _, err = run_cli(
        shlex.split("allocate scores.json -s 0.5 --allocator mix --alpha 2 -o bad.json"), tmp_path, monkeypatch
    )
    assert code != 0 and "alpha" in err and not (tmp_path / "bad.json").exists()


def run_cli(args: list[str], cwd: Path, monkeypatch) -> tuple[int, str, str]:
    """Run the CLI in-process (fast); returns exit code, stdout and stderr."""
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def artifacts_dir(tmp_path_factory, tiny_llama, calib_text):
    work = tmp_path_factory.mktemp("artifacts")
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for args in (
            [
                "score",
                "-m",
                str(tiny_llama),
                "--calib",
                str(calib_text),
                "--samples",
                "2",
                "--seqlen",
                "16",
                "-o",
                "scores.json",
            ],
            ["allocate", "scores.json", "-s", "0.6", "-o", "plan.json", "--no-show"],
        ):
            assert runner.invoke(app, args).exit_code == 0
    finally:
        os.chdir(cwd)
    return work


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("prune -m ./no/such/model --sparsity 0.5 -o out", "model path not found"),
        ("allocate bad.json -s 0.5", "not valid JSON"),
        ("allocate empty.json -s 0.5", "is empty"),
        ("allocate plan.json -s 0.5 -o p2.json", "is a plan, expected a scores file"),
        ("allocate scores.json -s 1.0", "must be in [0, 1)"),
        ("allocate scores.json -s 0.6 --allocator ecoflap --max-sparsity 0.5", "below the target"),
        ("allocate scores.json -s 0.6 --lam 0.1 -o p3.json", "add --allocator owl or rank or mix"),
        ("prune -m MODEL --plan plan.json --nm 2:4 --calib empty.txt -o o2", "N:M 2:4"),
        ("prune -m MODEL --sparsity 0.5 --allocator uniform --calib empty.txt -o o3", "contains no text"),
        ("prune -m MODEL --sparsity 0.5 -o existing", "exists"),
        ("prune -m OTHER --plan plan.json --calib CALIB -o o4", "was made for model"),
        ("prune -m MODEL --sparsity 0.5 --nm 4 -o o5", "--nm takes N:M"),
        ("prune -m MODEL --plan plan.json --sparsity 0.5 -o o6", "exactly one of"),
    ],
)
def test_bad_input_is_one_line_error(
    command, message, tiny_llama, tiny_opt, tmp_path, calib_text, artifacts_dir, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("scores.json", "plan.json"):
        (tmp_path / name).write_bytes((artifacts_dir / name).read_bytes())
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "existing").mkdir()
    command = (
        command.replace("MODEL", str(tiny_llama)).replace("OTHER", str(tiny_opt)).replace("CALIB", str(calib_text))
    )
    code, _out, err = run_cli(shlex.split(command), tmp_path, monkeypatch)
    assert code != 0
    assert message in err, err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    for partial in ("o2", "o3", "o4", "o5", "o6", "out", "p2.json"):
        assert not (tmp_path / partial).exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    res = sh(f"{ECOFLAP} allocate missing.json -s 0.5", tmp_path, check=False)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: file not found: missing.json"


def test_compare_group_with_unknown_tower_is_refused(tiny_llama, tmp_path, calib_text, monkeypatch):
    code, _, err = run_cli(
        shlex.split(
            f"prune -m {tiny_llama} --sparsity 0.5 --allocator uniform --calib {calib_text} --samples 2 "
            f"--seqlen 16 --compare-group visoin=row -o out"
        ),
        tmp_path,
        monkeypatch,
    )
    assert code != 0 and "unknown tower 'visoin'" in err and "language" in err
    assert not (tmp_path / "out").exists()
