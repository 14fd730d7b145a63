"""Outputs and resume: a prune killed with SIGKILL and resumed gives bit-identical weights (a
causal LM and two-tower CLIP); two prunes to one output give one checkpoint and one error line;
killed runs' temporaries are cleaned by the next run; outputs that would overwrite the input, the
working directory or an unwritable place, or that do not fit on disk, are refused before the work;
``--packed`` writes packed weights directly, byte-identical to pruning dense and converting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest_vlm import save_model_dir, write_data
from safetensors.torch import load_file
from typer.testing import CliRunner

from ecoflap_cli import files as atomic
from ecoflap_cli.cli.app import app
from ecoflap_cli.io.checkpoint import estimate_checkpoint_bytes
from ecoflap_cli.io.layout import weight_bytes
from ecoflap_cli.io.loading import LoadOptions, load_model
from ecoflap_cli.io.pruned import load_pruned
from ecoflap_cli.io.resume import state_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ENV["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), ENV.get("PYTHONPATH", "")])
#: checkpoint the resume state after every block (the default waits minutes between checkpoints)
EVERY_BLOCK = ["--resume-interval", "0"]
LLAMA_ARGS = ["-s", "0.5", "--samples", "8", "--seqlen", "32", "--batch-size", "4", *EVERY_BLOCK]
CLIP_ARGS = ["-s", "0.5", "--samples", "8", "--batch-size", "4", *EVERY_BLOCK]

#: runs the CLI in a child process that SIGKILLs itself at a chosen moment:
#: KILL_AFTER_BLOCKS=k after the k-th block is recorded, KILL_IN_BLOCK=k while the k-th block's
#: tensors are being written (before its progress is), KILL_IN_SAVE=1 inside the checkpoint save
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from ecoflap_cli import files as atomic
    from ecoflap_cli.io import resume

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    after, inside = int(os.environ.get("KILL_AFTER_BLOCKS", 0)), int(os.environ.get("KILL_IN_BLOCK", 0))
    done, saving = resume.ResumeState.block_done, resume.save_packed
    calls = {"done": 0, "saves": 0}

    def block_done(self, *args, **kwargs):
        done(self, *args, **kwargs)
        calls["done"] += 1
        if calls["done"] == after:
            die()

    def save_packed(*args, **kwargs):
        saving(*args, **kwargs)
        calls["saves"] += 1
        if calls["saves"] == inside:
            die()

    resume.ResumeState.block_done, resume.save_packed = block_done, save_packed
    if os.environ.get("KILL_IN_SAVE"):
        atomic.publish_modes = lambda directory: die()
    from ecoflap_cli.cli.app import main
    sys.argv = ["ecoflap", *sys.argv[1:]]
    main()
    """
)

Run = namedtuple("Run", "code stdout stderr")


def ecoflap(args: list, cwd: Path, kill: dict[str, str] | None = None) -> Run:
    """The CLI run in ``cwd``: in this process, or with ``kill`` in a child process that is
    killed as ``kill`` says (see KILLER)."""
    if kill is None:
        here = Path.cwd()
        os.chdir(cwd)
        try:
            result = CliRunner().invoke(app, [str(a) for a in args])
        finally:
            os.chdir(here)
        return Run(result.exit_code, result.stdout, result.stderr)
    command = [sys.executable, "-c", KILLER, *map(str, args)]
    done = subprocess.run(command, cwd=cwd, env={**ENV, **kill}, capture_output=True, text=True, timeout=300)
    return Run(done.returncode, done.stdout, done.stderr)


def error_line(stderr: str) -> str:
    """The single `error:` line of a refused run (and no traceback)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and torch.equal(wa[name].view(-1).view(torch.uint8),
                                                                wb[name].view(-1).view(torch.uint8)), name  # fmt: skip
    report_a, report_b = (json.loads((d / "ecoflap_report.json").read_text()) for d in (a, b))
    assert report_a["tensors"] == report_b["tensors"]
    assert report_a["achieved_sparsity"] == report_b["achieved_sparsity"]


@pytest.fixture(scope="module")
def clip_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clip")
    return save_model_dir("clip", root / "clip"), write_data(root / "data")["captions"]


# --- kill and resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("kill", [{"KILL_AFTER_BLOCKS": "3"}, {"KILL_IN_BLOCK": "3"}], ids=["after-3", "in-3"])
def test_killed_causal_lm_prune_resumes_bit_identical(kill, tmp_path, tiny_llama, calib_text):
    args = ["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS]
    assert ecoflap([*args, "-o", "whole"], tmp_path).code == 0
    killed = ecoflap([*args, "-o", "out"], tmp_path, kill)
    assert killed.code == -9 and not (tmp_path / "out").exists()
    progress = json.loads((state_dir(tmp_path / "out") / "progress.json").read_text())
    finished = int(kill.get("KILL_AFTER_BLOCKS") or int(kill["KILL_IN_BLOCK"]) - 1)
    assert progress["done"] == finished  # a block killed while being recorded does not count
    resumed = ecoflap([*args, "-o", "out", "--resume"], tmp_path)
    assert resumed.code == 0, resumed.stderr
    assert f"{finished} blocks finished" in resumed.stderr
    assert_bit_identical(tmp_path / "whole", tmp_path / "out")
    assert not state_dir(tmp_path / "out").exists()  # removed once the checkpoint is saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "whole"]


@pytest.mark.parametrize("blocks", [1, 3])  # inside the vision tower; inside the text tower
def test_killed_clip_prune_resumes_bit_identical(blocks, tmp_path, clip_case):
    model, captions = clip_case
    args = ["prune", "-m", model, "--calib", captions, *CLIP_ARGS]
    assert ecoflap([*args, "-o", "whole"], tmp_path).code == 0
    assert ecoflap([*args, "-o", "out"], tmp_path, {"KILL_AFTER_BLOCKS": str(blocks)}).code == -9
    resumed = ecoflap([*args, "-o", "out", "--resume"], tmp_path)
    assert resumed.code == 0, resumed.stderr
    assert_bit_identical(tmp_path / "whole", tmp_path / "out")


def test_resume_refuses_a_state_of_other_settings_and_keeps_it(tmp_path, tiny_llama, calib_text):
    args = ["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "-o", "out"]
    assert ecoflap(args, tmp_path, {"KILL_AFTER_BLOCKS": "2"}).code == -9
    state = state_dir(tmp_path / "out")
    before = sorted(p.name for p in state.rglob("*"))
    for change, named in ((["--seed", "1"], "calibration batches, seed"), (["--solver", "magnitude"], "solver")):
        refused = ecoflap([*args, "--resume", *change], tmp_path)
        assert refused.code != 0
        line = error_line(refused.stderr)
        assert "cannot resume" in line and named in line, line
    other_plan = ecoflap([*args[:-2], "-s", "0.6", *args[-2:], "--resume"], tmp_path)
    assert "had another sparsity" in error_line(other_plan.stderr)
    assert sorted(p.name for p in state.rglob("*")) == before and not (tmp_path / "out").exists()


def test_a_corrupted_resume_state_is_refused_not_resumed(tmp_path, tiny_llama, calib_text):
    """A flipped byte in the saved block inputs used to resume silently, to other weights."""
    args = ["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "-o", "out"]
    assert ecoflap(args, tmp_path, {"KILL_AFTER_BLOCKS": "2"}).code == -9
    state = state_dir(tmp_path / "out")
    inputs = state / json.loads((state / "progress.json").read_text())["inputs"]
    data = bytearray(inputs.read_bytes())
    data[-5] ^= 0x40  # a data byte: the file still parses
    inputs.write_bytes(bytes(data))
    refused = ecoflap([*args, "--resume"], tmp_path)
    assert refused.code != 0
    line = error_line(refused.stderr)
    assert "corrupted" in line and inputs.name in line and "without --resume" in line, line
    assert "rerun with --resume" not in refused.stderr  # no advice to repeat what cannot work
    assert inputs.read_bytes() == bytes(data) and not (tmp_path / "out").exists()


def test_a_state_without_resume_is_reported_and_replaced(tmp_path, tiny_llama, calib_text):
    args = ["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "-o", "out"]
    assert ecoflap(args, tmp_path, {"KILL_AFTER_BLOCKS": "2"}).code == -9
    fresh = ecoflap(args, tmp_path)
    assert fresh.code == 0, fresh.stderr
    assert "interrupted run" in fresh.stderr and "--resume" in fresh.stderr
    assert not state_dir(tmp_path / "out").exists()
    again = ecoflap([*args[:-1], "out2", "--resume"], tmp_path)  # nothing to resume: starts over
    assert again.code == 0 and "nothing to resume" in again.stderr
    assert_bit_identical(tmp_path / "out", tmp_path / "out2")


def test_a_run_refused_after_the_lock_leaves_nothing(tmp_path, tiny_llama, calib_text):
    args = ["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "--compare-group", "vision=row"]
    refused = ecoflap([*args, "-o", "out"], tmp_path)  # refused by the driver, once the run has begun
    assert refused.code != 0 and "unknown tower" in error_line(refused.stderr)
    assert list(tmp_path.iterdir()) == []


# --- concurrency --------------------------------------------------------------------------------


def test_two_prunes_to_one_output_one_wins(tmp_path, tiny_llama, calib_text):
    args = [sys.executable, "-m", "ecoflap_cli", "prune", "-m", str(tiny_llama), "--calib", str(calib_text)]
    args += [*LLAMA_ARGS, "-o", "out"]
    runs = [subprocess.Popen(args, cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, err in results if code != 0)
    line = error_line(loser)
    assert "another ecoflap run" in line or "exists" in line, line
    load_pruned(tmp_path / "out")  # complete and loadable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_held_output_lock_refuses_a_second_run(tmp_path, tiny_llama, calib_text, monkeypatch):
    with atomic.output_lock(tmp_path / "out"):
        run = ecoflap(["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "-o", "out"], tmp_path)
    assert run.code != 0 and "another ecoflap run" in error_line(run.stderr)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_final_rename_never_replaces_an_output_that_appeared(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(Exception, match="appeared while this run was writing"), atomic.atomic_dir(target, False) as new:
        (new / "mine.txt").write_text("new")
        target.mkdir()  # another writer, between the first check and the rename
        (target / "theirs.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_json_output_that_appeared_is_not_replaced(tmp_path):
    """score/allocate/eval -o FILE without --overwrite: the final step is exclusive too."""
    target = tmp_path / "scores.json"
    with pytest.raises(Exception, match="appeared while this run"), atomic.atomic_file(target, False) as tmp:
        tmp.write_text("mine")
        target.write_text("theirs")  # another run, between the existence check and the rename
    assert target.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["scores.json"]
    atomic.write_atomic(tmp_path / "plan.json", b"{}", replace=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "scores.json"]


def test_the_fallback_rename_is_exclusive_too(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", lambda *_args: False)  # as where renameat2 is missing
    target = tmp_path / "out"
    with atomic.atomic_dir(target, False) as new:
        (new / "a.txt").write_text("1")
    with pytest.raises(Exception, match="appeared"), atomic.atomic_dir(target, False) as new:
        (new / "a.txt").write_text("2")
    with atomic.atomic_dir(target, True) as new:  # --overwrite: replaced once complete
        (new / "a.txt").write_text("3")
    assert (target / "a.txt").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_the_old_output_only_when_the_new_is_complete(tmp_path, tiny_llama, calib_text):
    args = ["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "-o", "out"]
    assert ecoflap(args, tmp_path).code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert ecoflap([*args, "--overwrite", "-s", "0.6"], tmp_path, {"KILL_IN_SAVE": "1"}).code == -9
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert ecoflap([*args, "--overwrite", "-s", "0.6"], tmp_path).code == 0
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["target_sparsity"] == 0.6


# --- stale temporaries --------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_killed_during_save_is_cleaned_by_the_next(tmp_path, tiny_llama, calib_text):
    args = ["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "-o", "out"]
    assert ecoflap(args, tmp_path, {"KILL_IN_SAVE": "1"}).code == -9
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].is_dir() and (left[0] / "model.safetensors").is_file()
    assert ecoflap(args, tmp_path).code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_dead_owners_temporaries_are_removed(tmp_path):
    host = atomic._host()
    dead = tmp_path / f".out.ecoflap-{dead_pid()}@{host}.abc.tmp"
    live = tmp_path / f".out.ecoflap-{os.getpid()}@{host}.abc.tmp"
    foreign = tmp_path / f".out.ecoflap-{dead_pid()}@another-host.abc.tmp"
    unowned = tmp_path / ".out.abc.tmp"
    other_output = tmp_path / f".other.ecoflap-{dead_pid()}@{host}.abc.tmp"
    for path in (dead, live, foreign, unowned, other_output):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
    assert atomic.clean_stale(tmp_path / "out") == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, foreign, unowned, other_output))


# --- refused outputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, flags, message",
    [
        ("{model}", ["--overwrite"], "is the input model"),
        ("{model}/pruned", [], "inside the input model"),
        ("{parent}", ["--overwrite"], "contains the input model"),
        (".", ["--overwrite"], "current directory"),
        ("..", ["--overwrite"], "current directory"),
        ("afile/out", [], "is a file"),
    ],
)
def test_refused_outputs(output, flags, message, tmp_path, calib_text):
    from tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "models" / "llama", "llama")
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("a regular file")
    snapshot = {p: p.read_bytes() for p in model.iterdir()}
    out = output.format(model=model, parent=model.parent)
    run = ecoflap(["prune", "-m", model, "--calib", calib_text, *LLAMA_ARGS, "-o", out, *flags], work)
    assert run.code != 0 and message in error_line(run.stderr)
    assert {p: p.read_bytes() for p in model.iterdir()} == snapshot
    assert sorted(p.name for p in work.iterdir()) == ["afile"] and sorted(model.parent.iterdir()) == [model]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_refused(tmp_path, tiny_llama, calib_text):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        run = ecoflap(["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "-o", locked / "out"], tmp_path)
    finally:
        locked.chmod(0o755)
    assert run.code != 0 and "read-only" in error_line(run.stderr)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_not_enough_free_space_is_refused_before_the_work(packed, tmp_path, tiny_llama, calib_text, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 1000, 1000))
    from ecoflap_cli.stages import driver

    def no_scoring(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("scored before the free space was checked")

    monkeypatch.setattr(driver, "one_shot_plan", no_scoring)  # (progress bars are off under CliRunner)
    flags = ["--packed"] if packed else []
    run = ecoflap(["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "-o", "out", *flags], tmp_path)
    assert run.code != 0
    line = error_line(run.stderr)
    assert "not enough free space" in line and ("packed" if packed else "dense") in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_the_output_size_estimate_is_close(packed, tmp_path, tiny_llama, calib_text):
    args = ["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS, "-o", "out"]
    assert ecoflap([*args, *(["--packed"] if packed else [])], tmp_path).code == 0
    out = tmp_path / "out"
    plan = json.loads((out / "plan.json").read_text())
    counts = {t["name"]: t["zeros"] for g in plan["groups"] for t in g["tensors"]}
    model = load_model(str(tiny_llama), LoadOptions()).model
    written = weight_bytes(out)
    weights_estimate = estimate_checkpoint_bytes(model, counts, packed, None) - 32 * 10**6
    assert written <= weights_estimate <= 1.1 * written  # errs high, by little
    total = sum(p.stat().st_size for p in out.iterdir())
    assert estimate_checkpoint_bytes(model, counts, packed, tiny_llama) >= total


# --- --packed writes packed directly ------------------------------------------------------------


def test_packed_prune_writes_no_dense_copy_and_matches_convert(tmp_path, tiny_llama, calib_text, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    dense_writes: list[str] = []
    original = modeling_utils.safe_save_file

    def spy(tensors, filename, metadata=None):
        dense_writes.append(filename)
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", spy)
    args = ["prune", "-m", tiny_llama, "--calib", calib_text, *LLAMA_ARGS]
    assert ecoflap([*args, "-o", "dense/ckpt"], tmp_path).code == 0
    assert dense_writes  # the spy sees what save_pretrained writes ...
    dense_writes.clear()
    assert ecoflap([*args, "--packed", "-o", "direct/ckpt"], tmp_path).code == 0
    assert dense_writes == []  # ... and --packed writes no dense weights
    converted = ecoflap(["convert", "dense/ckpt", "--to", "packed", "-o", "converted/ckpt"], tmp_path)
    assert converted.code == 0, converted.stderr
    direct, via = tmp_path / "direct" / "ckpt", tmp_path / "converted" / "ckpt"
    assert sorted(p.name for p in direct.iterdir()) == sorted(p.name for p in via.iterdir())
    for path in direct.iterdir():
        if path.name in ("ecoflap_report.json", "scores.json", "plan.json"):
            continue  # timings and creation times differ between runs
        assert path.read_bytes() == (via / path.name).read_bytes(), path.name
    loaded_direct, loaded_via = load_pruned(direct).state_dict(), load_pruned(via).state_dict()
    assert all(torch.equal(loaded_direct[k], loaded_via[k]) for k in loaded_via)


def _reseal(path: Path, doc: dict) -> None:
    """Write ``doc`` with a valid seal, as an editor that knows the format would."""
    from ecoflap_cli.io.resume import _sealed

    path.write_bytes(_sealed(doc))


@pytest.mark.parametrize("edit", ["state-json", "progress-json", "no-checksums", "one-weight"])
def test_resume_state_edits_are_refused(edit, tmp_path, tiny_llama, calib_text):
    """An edited state file, a state whose checksum map is gone, or a model with one changed weight
    value is refused with one line, never resumed from."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    args = ["prune", "-m", model, "--calib", calib_text, *LLAMA_ARGS, "-o", "out"]
    assert ecoflap(args, tmp_path, {"KILL_AFTER_BLOCKS": "2"}).code == -9
    state = state_dir(tmp_path / "out")
    if edit == "state-json":
        doc = json.loads((state / "state.json").read_text())
        doc["fingerprint"]["seed"] = "0000"
        (state / "state.json").write_text(json.dumps(doc))
    elif edit == "progress-json":
        doc = json.loads((state / "progress.json").read_text())
        doc["done"] = 1
        (state / "progress.json").write_text(json.dumps(doc))
    elif edit == "no-checksums":
        doc = json.loads((state / "progress.json").read_text())
        doc.pop("seal"), doc.pop("sha256")
        _reseal(state / "progress.json", doc)
    else:  # a value deep inside one tensor, where a strided sample would not look
        weights = load_file(model / "model.safetensors")
        name = next(n for n in weights if n.endswith("mlp.down_proj.weight"))
        weights[name].view(-1)[weights[name].numel() // 2 + 1] += 1.0
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
        (model / "ecoflap_checksums.json").unlink(missing_ok=True)
    refused = ecoflap([*args, "--resume"], tmp_path)
    line = error_line(refused.stderr)
    assert refused.code != 0 and not (tmp_path / "out").exists()
    expected = {"state-json": "changed", "progress-json": "changed", "no-checksums": "no checksums"}
    assert expected.get(edit, "had another model") in line, line
