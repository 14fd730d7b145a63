"""`ecoflap inspect` on every artifact kind: scores, plans, dense and packed checkpoints, stdin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.errors import ArtifactError
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.inspect import inspect_artifact
from ecoflap_cli.stages import driver

os.environ["HF_HUB_OFFLINE"] = "1"
runner = CliRunner(env={"HF_HUB_OFFLINE": "1"})
CALIB = ["--samples", "4", "--seqlen", "16", "--batch-size", "4", "--device", "cpu"]


def cli(*args: str, ok: bool = True, stdin: str | None = None):
    result = runner.invoke(app, [str(a) for a in args], input=stdin)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def inspect_json(*args: str, stdin: str | None = None) -> dict:
    result = cli("inspect", *args, "--json", stdin=stdin)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def artifacts_dir(tmp_path_factory, tiny_llama, calib_text) -> Path:
    """scores.json, plan.json, and the dense and packed checkpoints pruned to that plan."""
    root = tmp_path_factory.mktemp("inspect")
    cli("score", "-m", tiny_llama, "--calib", calib_text, *CALIB, "-o", root / "scores.json")
    cli("allocate", root / "scores.json", "-s", "0.5", "-o", root / "plan.json", "--no-show")
    common = ["-m", tiny_llama, "--plan", root / "plan.json", "--calib", calib_text, *CALIB]
    cli("prune", *common, "-o", root / "dense")
    cli("prune", *common, "-o", root / "packed", "--packed")
    return root


def test_scores(artifacts_dir):
    result = cli("inspect", artifacts_dir / "scores.json", "--json")
    summary = json.loads(result.stdout)
    scores = json.loads((artifacts_dir / "scores.json").read_text())
    assert summary["kind"] == "scores"
    assert summary["artifact"] == {"format": "ecoflap.scores", "version": 1}
    assert summary["model"]["fingerprint"] == scores["model"]["fingerprint"]
    assert summary["model"]["model_type"] == "llama"
    assert summary["method"]["name"] == "first"  # --method auto picks first-order on a tiny model
    assert [b["score"] for b in summary["blocks"]] == [g["score"] for g in scores["groups"]]
    assert all(b["planned"] is None and b["achieved"] is None for b in summary["blocks"])
    assert summary["towers"] == [{"name": "language", "blocks": 4, "params": 36864, "planned": None, "achieved": None}]
    assert any("language" in line and "36,864" in line for line in result.stderr.splitlines())
    assert "planned" not in result.stderr  # a scores file has no sparsity columns


def test_plan(artifacts_dir):
    summary = inspect_json(artifacts_dir / "plan.json")
    plan = json.loads((artifacts_dir / "plan.json").read_text())
    assert summary["kind"] == "plan" and summary["allocator"]["name"] == "ecoflap"  # auto
    assert summary["target_sparsity"] == 0.5
    assert summary["achieved_sparsity"] == plan["achieved_sparsity"]
    assert [b["planned"] for b in summary["blocks"]] == [g["sparsity"] for g in plan["groups"]]
    assert summary["towers"][0]["planned"] == pytest.approx(plan["achieved_sparsity"])


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_checkpoint(artifacts_dir, layout):
    result = cli("inspect", artifacts_dir / layout, "--json")
    summary = json.loads(result.stdout)
    report = json.loads((artifacts_dir / layout / "ecoflap_report.json").read_text())
    plan = json.loads((artifacts_dir / "plan.json").read_text())
    assert summary["kind"] == "checkpoint" and summary["storage"]["layout"] == layout
    assert summary["artifact"]["format"] == ("ecoflap.packed" if layout == "packed" else "safetensors")
    assert summary["model"]["fingerprint"] == plan["model"]["fingerprint"]
    assert summary["achieved_sparsity"] == pytest.approx(report["achieved_sparsity"])
    zeros = {t["name"]: t["zeros"] for t in report["tensors"]}
    for block, group in zip(summary["blocks"], plan["groups"], strict=True):
        assert block["name"] == group["name"] and block["planned"] == group["sparsity"]
        measured = sum(zeros[t["name"]] for t in group["tensors"]) / group["params"]
        assert block["achieved"] == pytest.approx(measured)
    assert (summary["storage"]["packed_tensors"] == {"bitmask": 28}) == (layout == "packed")
    # the human view goes to stderr
    assert "achieved" in result.stderr and "model.layers.3" in result.stderr
    assert "model.layers.3" not in result.stdout.split('"blocks"')[0]


def test_dense_and_packed_agree(artifacts_dir):
    dense = inspect_artifact(str(artifacts_dir / "dense"))
    packed = inspect_artifact(str(artifacts_dir / "packed"))
    assert dense["blocks"] == packed["blocks"] and dense["towers"] == packed["towers"]
    assert packed["storage"]["bytes"] < dense["storage"]["bytes"]


def test_checkpoint_without_plan_groups_by_path(artifacts_dir, tmp_path):
    work = tmp_path / "noplan"
    shutil.copytree(artifacts_dir / "packed", work)
    for name in ("plan.json", "scores.json", "ecoflap_report.json"):
        (work / name).unlink(missing_ok=True)
    summary = inspect_artifact(str(work))
    assert [b["name"] for b in summary["blocks"]] == [f"model.layers.{i}" for i in range(4)]
    assert {b["tower"] for b in summary["blocks"]} == {"model.layers"}
    with_plan = inspect_artifact(str(artifacts_dir / "packed"))
    assert [b["achieved"] for b in summary["blocks"]] == [b["achieved"] for b in with_plan["blocks"]]
    assert summary["model"]["model_type"] == "llama" and summary["model"]["fingerprint"] is None


def test_stdin(artifacts_dir):
    text = (artifacts_dir / "plan.json").read_text()
    assert inspect_json("-", stdin=text)["kind"] == "plan"
    result = cli("inspect", "-", ok=False, stdin="")
    assert result.exit_code == 2 and "stdin is empty" in result.stderr


def test_shell_pipe(tiny_llama, calib_text):
    """A real pipe: score -> allocate -> inspect, artifacts on stdout, tables on stderr."""
    ecoflap = f"{sys.executable} -m ecoflap_cli"
    calib = " ".join(CALIB)
    command = (
        f"{ecoflap} score -m {tiny_llama} --calib {calib_text} {calib} -o - "
        f"| {ecoflap} allocate - -s 0.5 -o - | {ecoflap} inspect - --json"
    )
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["kind"] == "plan" and summary["source"] == "stdin"
    assert summary["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert len(summary["blocks"]) == 4 and "Traceback" not in proc.stderr


def test_two_towers_and_chart(tmp_path):
    """Per-tower aggregation on a synthetic vision + language plan, and the PNG chart."""
    groups = [
        {
            "name": f"{tower}.{i}",
            "tower": tower,
            "index": i,
            "params": size,
            "tensors": [{"name": f"{tower}.{i}.fc.weight", "numel": size}],
            "score": 1.0 + i,
        }
        for tower, size in (("vision", 100), ("language", 300))
        for i in range(3)
    ]
    scores = {
        "format": artifacts.SCORES_FORMAT,
        "version": artifacts.VERSION,
        "model": {"id": "synthetic", "fingerprint": "0" * 16},
        "method": {"name": "zeroth"},
        "groups": groups,
    }
    plan = driver.allocate(scores, 0.5, "ecoflap")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    summary = inspect_artifact(str(tmp_path / "plan.json"))
    towers = {t["name"]: t for t in summary["towers"]}
    assert list(towers) == ["vision", "language"]
    assert towers["vision"]["params"] == 300 and towers["language"]["params"] == 900
    for name, entry in plan["towers"].items():
        assert towers[name]["planned"] == pytest.approx(entry["sparsity"])

    pytest.importorskip("matplotlib")
    cli("inspect", tmp_path / "plan.json", "--chart", tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = cli("inspect", tmp_path / "plan.json", "--chart", tmp_path / "plan.png", ok=False)
    assert result.exit_code == 2 and "exists" in result.stderr


def test_chart_without_matplotlib(artifacts_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    result = cli("inspect", artifacts_dir / "plan.json", "--chart", tmp_path / "c.png", ok=False)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install matplotlib" in errors[0]
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "ecoflap.report", "version": 1}', "not a scores file, a plan or a checkpoint"),
        ("not json", "not valid JSON"),
        ('{"format": "ecoflap.plan", "version": 9}', "unsupported version 9"),
    ],
)
def test_not_an_artifact(tmp_path, content, message):
    path = tmp_path / "thing.json"
    path.write_text(content)
    with pytest.raises(ArtifactError, match=message):
        inspect_artifact(str(path))
    result = cli("inspect", path, ok=False)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_missing_path_and_empty_directory(tmp_path):
    result = cli("inspect", tmp_path / "nope.json", ok=False)
    assert result.exit_code == 2 and "file not found" in result.stderr
    result = cli("inspect", tmp_path, ok=False)
    assert result.exit_code == 2 and "not a checkpoint directory" in result.stderr
