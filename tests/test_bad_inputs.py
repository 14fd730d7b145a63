"""Bad input and faults, as a careless or unlucky user meets them (issue 14).

Every case runs one command on tiny models and asserts what the user relies on:

- a non-zero exit code (2 for bad input, 3 out of memory, 4 an operating-system error, 130 Ctrl-C);
- exactly one line of stderr starts with ``error:``, and it is the last line (progress and the
  plan table may come before it), with no ``Traceback`` anywhere;
- nothing is left behind: the working directory holds exactly what it held before, hidden
  temporaries included;
- the message names the refusal (for the cases that used to pass silently, the refusal itself).

Most cases run in-process (CliRunner: fast); Ctrl-C runs real processes.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.errors import DataError
from ecoflap_cli.io import artifacts

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
}
SMALL = "--calib {calib} --samples 2 --seqlen 16"


# --- the shared artifacts: one tiny model's scores, plan and pruned checkpoint per module ---------


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_llama, tiny_opt, calib_text, eval_text) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("bad_inputs_base")
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for command in (
            f"score -m {tiny_llama} --calib {calib_text} --samples 2 --seqlen 16 -o scores.json",
            "allocate scores.json -s 0.5 -o plan.json --no-show",
            f"prune -m {tiny_llama} --plan plan.json --calib {calib_text} --samples 2 --seqlen 16 -o pruned",
        ):
            result = runner.invoke(app, shlex.split(command))
            assert result.exit_code == 0, result.stderr
    finally:
        os.chdir(cwd)
    return {
        "llama": tiny_llama,
        "opt": tiny_opt,
        "calib": calib_text,
        "evaltext": eval_text,
        "scores": work / "scores.json",
        "plan": work / "plan.json",
        "pruned": work / "pruned",
    }


def tree(root: Path) -> set[str]:
    """Every path under ``root``, hidden ones included."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def left_behind(root: Path, output: str = "out") -> set[str]:
    """What a failed run left in ``root`` besides the resume state of its output, which a fault
    after the pruning started keeps on purpose (``prune --resume`` continues from it)."""
    state = f".{output}.ecoflap-resume"
    return {p for p in tree(root) if p != state and not p.startswith(state + os.sep)}


def run_cli(args: list[str], cwd: Path, monkeypatch) -> tuple[int, str, str, BaseException | None]:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.stdout, result.stderr, exception


def assert_one_error_line(code: int, out: str, err: str, exception: BaseException | None, expect: str) -> str:
    assert exception is None, f"uncaught {type(exception).__name__}: {exception}"
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], f"the error line is not the last one:\n{err}"
    assert expect in errors[0], f"expected {expect!r} in {errors[0]!r}"
    return errors[0]


# --- building bad inputs ----------------------------------------------------------------------


Setup = Callable[[Path, dict[str, Path]], None]


def edited(kind: str, change: Callable[[dict[str, Any]], Any], name: str | None = None) -> Setup:
    """Write ``edited_<kind>.json``: the shared plan or scores with ``change`` applied."""

    def setup(cwd: Path, base: dict[str, Path]) -> None:
        doc = json.loads(base[kind].read_text())
        change(doc)
        (cwd / (name or f"edited_{kind}.json")).write_text(json.dumps(doc))

    return setup


def raw(name: str, data: bytes) -> Setup:
    def setup(cwd: Path, base: dict[str, Path]) -> None:
        (cwd / name).write_bytes(data)

    return setup


def copy_of(key: str, name: str, change: Callable[[Path], None] | None = None) -> Setup:
    """A copy of a shared model or checkpoint directory, changed by ``change``."""

    def setup(cwd: Path, base: dict[str, Path]) -> None:
        shutil.copytree(base[key], cwd / name)
        if change is not None:
            change(cwd / name)

    return setup


def both(*setups: Setup) -> Setup:
    def setup(cwd: Path, base: dict[str, Path]) -> None:
        for one in setups:
            one(cwd, base)

    return setup


def set_tensor(field: str, value: Any, group: int = 0, tensor: int = 0) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["groups"][group]["tensors"][tensor][field] = value

    return change


def set_key(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc[key] = value

    return change


def consistent(doc: dict[str, Any]) -> None:
    """Restate a plan's totals from its counts (an edit a careful user would make)."""
    for g in doc["groups"]:
        g["zeros"] = sum(t["zeros"] for t in g["tensors"])
        g["params"] = sum(t["numel"] for t in g["tensors"])
        g["sparsity"] = g["zeros"] / g["params"]
        for t in g["tensors"]:
            t["sparsity"] = t["zeros"] / t["numel"]
    doc["achieved_sparsity"] = sum(g["zeros"] for g in doc["groups"]) / sum(g["params"] for g in doc["groups"])
    doc["towers"] = artifacts.tower_summary(doc["groups"])


def drop_group(keep_totals: bool) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        del doc["groups"][1]
        if keep_totals:
            consistent(doc)

    return change


def duplicate_tensor(doc: dict[str, Any]) -> None:
    doc["groups"][1]["tensors"].append(dict(doc["groups"][0]["tensors"][0]))


def duplicate_group(doc: dict[str, Any]) -> None:
    doc["groups"].append(json.loads(json.dumps(doc["groups"][0])))


def resize_tensor(doc: dict[str, Any]) -> None:
    t = doc["groups"][0]["tensors"][0]
    t["numel"] += 32
    consistent(doc)


def scores_change(field: str, value: Any, group: int = 0) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["groups"][group][field] = value

    return change


def scores_duplicate_block(doc: dict[str, Any]) -> None:
    doc["groups"].append(json.loads(json.dumps(doc["groups"][-1])))


def scores_duplicate_tensor(doc: dict[str, Any]) -> None:
    g = doc["groups"][0]
    g["tensors"].append(dict(g["tensors"][0]))
    g["params"] += g["tensors"][0]["numel"]


def non_utf8_plan(cwd: Path, base: dict[str, Path]) -> None:
    edited = base["plan"].read_bytes().replace(b'"target_sparsity"', b'"target_sp\xe9rsity"', 1)
    (cwd / "edited_plan.json").write_bytes(edited)


def truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)


def pickle_only(directory: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def edit_checkpoint_plan(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        doc = json.loads((directory / "plan.json").read_text())
        change(doc)
        (directory / "plan.json").write_text(json.dumps(doc))

    return edit


def corrupt_checkpoint_plan_bytes(directory: Path) -> None:
    plan = directory / "plan.json"
    plan.write_bytes(plan.read_bytes().replace(b'"target_sparsity"', b'"target_sp\xe9rsity"', 1))


ENGLISH = b"the cat sat on the mat and the dog ran to the big red house. " * 40


def text_file(name: str, data: bytes) -> Setup:
    return raw(name, data)


GREEK = ("η γάτα κάθεται στο χαλί και ο σκύλος τρέχει στο σπίτι. " * 60).encode()


def word_tokenizer_model(directory: Path) -> None:
    """The tiny model with a word-level tokenizer that maps words it does not know to <unk>."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    _word_tokenizer().save_pretrained(directory)


def binary_bytes() -> bytes:
    return bytes((i * 97 + 13) % 256 for i in range(4000))


def captions_latin1(cwd: Path, base: dict[str, Path]) -> None:
    (cwd / "img.png").write_bytes(png_header(8, 8))
    (cwd / "caps.jsonl").write_bytes('{"image": "img.png", "caption": "un café crème"}\n'.encode("latin-1"))


def a_file(cwd: Path, base: dict[str, Path]) -> None:
    (cwd / "afile").write_text("not a directory")


def a_dir(cwd: Path, base: dict[str, Path]) -> None:
    (cwd / "adir").mkdir()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header states ``width`` x ``height`` (its pixel data is not needed to open it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1) * min(height, 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# --- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    expect: str
    setup: Setup | None = None


P = "prune -m {llama} " + SMALL
CASES = [
    # click's own errors: one line, not the boxed usage text
    Case("float-abc", "prune -m {llama} -s abc -o out", "Invalid value for '--sparsity'"),
    Case("unknown-option", "prune -m {llama} --bogus -o out", "No such option: --bogus"),
    Case("missing-model", "prune -s 0.5 -o out", "Missing option '--model'"),
    Case("unknown-allocator", "allocate {scores} -s 0.5 --allocator nope -o p.json", "unknown allocator 'nope'"),
    Case("unknown-solver", P + " -s 0.5 --solver nope -o out", "unknown solver 'nope'"),
    Case("int-option-float", P + " -s 0.5 --batch-size 2.5 -o out", "Invalid value for '--batch-size'"),
    # every float option: NaN and infinity
    Case("sparsity-nan", P + " --sparsity nan -o out", "--sparsity must be in [0, 1)"),
    Case("sparsity-inf", P + " --sparsity inf -o out", "--sparsity must be in [0, 1)"),
    Case("sparsity-negative", P + " --sparsity -0.1 -o out", "--sparsity must be in [0, 1)"),
    Case("sparsity-one", P + " --sparsity 1.0 -o out", "--sparsity must be in [0, 1)"),
    Case("lam-nan", P + " -s 0.5 --allocator rank --lam nan -o out", "lam must be a finite number"),
    Case("lam-inf", "allocate {scores} -s 0.5 --allocator owl --lam inf -o p.json", "lam must be a finite number"),
    Case("depth-step-inf", P + " -s 0.5 --allocator depth --depth-step inf -o out", "step must be a finite"),
    Case("eps-nan", "score -m {llama} " + SMALL + " --method zeroth --eps nan -o s.json", "eps must be a finite"),
    Case("eps-inf", "score -m {llama} " + SMALL + " --method zeroth --eps inf -o s.json", "eps must be a finite"),
    Case("temperature-nan", "allocate {scores} -s 0.5 --allocator ecoflap --temperature nan -o p.json", "finite"),
    Case("alpha-nan", "allocate {scores} -s 0.5 --allocator mix --alpha nan -o p.json", "alpha must be a finite"),
    Case("max-sparsity-nan", "allocate {scores} -s 0.5 --allocator ecoflap --max-sparsity nan -o p.json", "finite"),
    Case("threshold-nan", "score -m {llama} " + SMALL + " --method owl --threshold nan -o s.json", "m must be a fin"),
    Case("damp-nan", P + " -s 0.5 --solver sparsegpt --solver-param damp=nan -o out", "damp must be a finite"),
    # values out of range, and settings that would prune whole blocks
    Case("lam-5", "allocate {scores} -s 0.5 --allocator rank --lam 5 -o p.json", "lam must be in [0, 0.5]"),
    Case("lam-reaches-1", "allocate {scores} -s 0.5 --allocator rank --lam 0.5 -o p.json", "prunes whole blocks"),
    Case(
        "mix-default-empties-a-block",
        "allocate {scores} -s 0.9 --allocator mix -o p.json",
        "prunes block model.layers.3 entirely",
    ),
    Case(
        "depth-step-empties-blocks",
        "allocate {scores} -s 0.9 --allocator depth --depth-step 0.2 -o p.json",
        "2 of 4 blocks",
    ),
    Case("lam-reaches-1-owl", P + " -s 0.6 --allocator owl --lam 0.45 -o out", "use --lam below 0.4"),
    Case("param-lam-bool", "allocate {scores} -s 0.5 --allocator mix -p lam=true -o p.json", "lam takes a number"),
    Case("param-unknown", "allocate {scores} -s 0.5 --allocator mix -p foo=1 -o p.json", "takes no parameter 'foo'"),
    Case("param-no-value", "allocate {scores} -s 0.5 -p lam -o p.json", "--param takes NAME=VALUE"),
    Case("max-sparsity-below", "allocate {scores} -s 0.6 --allocator ecoflap --max-sparsity 0.5 -o p.json", "below"),
    Case("alpha-2", "allocate {scores} -s 0.5 --allocator mix --alpha 2 -o p.json", "alpha must be in [0, 1]"),
    Case("block-size-float", P + " -s 0.5 --solver sparsegpt --solver-param block_size=2.5 -o out", "whole number"),
    Case("perturbations-0", "score -m {llama} " + SMALL + " --method zeroth --perturbations 0 -o s.json", "[1, 1024]"),
    Case("scoring-mismatch", P + " -s 0.5 --allocator owl --score-method first -o out", "takes scoring owl"),
    # N:M
    Case("nm-not-pair", P + " -s 0.5 --nm 4 -o out", "--nm takes N:M"),
    Case("nm-reversed", P + " -s 0.5 --nm 4:2 -o out", "0 < N < M"),
    Case("nm-wrong-sparsity", P + " -s 0.5 --allocator uniform --nm 2:5 -o out", "use --sparsity 0.6"),
    Case("nm-width", P + " -s 0.6 --allocator uniform --nm 2:5 -o out", "multiples of 5"),
    Case("nm-plan-not-uniform", "prune -m {llama} --plan {plan} " + SMALL + " --nm 2:4 -o out", "N:M 2:4"),
    # lengths and counts
    Case("seqlen-past-context-llama", "prune -m {llama} --calib {calib} --samples 2 --seqlen 500 -s 0.5 -o out", "128"),
    Case("seqlen-past-context-opt", "prune -m {opt} --calib {calib} --samples 2 --seqlen 500 -s 0.5 -o out", "128"),
    Case("score-seqlen-past-context-opt", "score -m {opt} --calib {calib} --samples 2 --seqlen 129 -o s.json", "129"),
    Case("score-seqlen-option", P + " -s 0.5 --score-seqlen 1000 -o out", "--score-seqlen 1000 is longer"),
    Case("eval-seqlen-past-context", "eval {opt} --text {evaltext} --seqlen 500", "context length (128 tokens)"),
    Case("eval-seqlen-0", "eval {llama} --text {evaltext} --seqlen 0", "--seqlen must be at least 2"),
    Case("eval-seqlen-1", "eval {llama} --text {evaltext} --seqlen 1", "--seqlen must be at least 2"),
    Case("eval-max-windows-negative", "eval {llama} --text {evaltext} --seqlen 16 --max-windows -1", "at least 1"),
    Case("eval-max-windows-0", "eval {llama} --text {evaltext} --seqlen 16 --max-windows 0", "at least 1"),
    Case("eval-batch-size-0", "eval {llama} --text {evaltext} --seqlen 16 --batch-size 0", "at least 1"),
    Case("prune-seqlen-0", "prune -m {llama} --calib {calib} --samples 2 --seqlen 0 -s 0.5 -o out", "at least 2"),
    Case("prune-seqlen-1", "prune -m {llama} --calib {calib} --samples 2 --seqlen 1 -s 0.5 -o out", "at least 2"),
    Case("prune-samples-0", "prune -m {llama} --calib {calib} --samples 0 --seqlen 16 -s 0.5 -o out", "at least 1"),
    Case("prune-batch-size-0", P + " -s 0.5 --batch-size 0 -o out", "--batch-size must be"),
    Case("prune-score-samples-0", P + " -s 0.5 --score-samples 0 -o out", "--score-samples must be"),
    Case("score-samples-negative", "score -m {llama} --calib {calib} --samples -3 --seqlen 16 -o s.json", "at least"),
    Case("shard-size-huge", P + " -s 0.5 --max-shard-size 99999999999999999999999TB -o out", "cannot read size"),
    Case("shard-size-0", P + " -s 0.5 --max-shard-size 0 -o out", "cannot read size '0'"),
    Case("shard-size-nan", P + " -s 0.5 --max-shard-size nanGB -o out", "cannot read size"),
    Case("convert-shard-size-abc", "convert {pruned} -o conv --to packed --max-shard-size abc", "cannot read size"),
    Case("convert-to-unknown", "convert {pruned} -o conv --to sparse", "--to takes packed or dense"),
    Case("plan-and-sparsity", "prune -m {llama} --plan {plan} -s 0.5 -o out", "exactly one of"),
    # error text is text, not rich markup
    Case("markup-in-path", "prune -m ./no[/]such[bold] -s 0.5 -o out", "model path not found: ./no[/]such[bold]"),
    Case("markup-hub-in-name", "allocate 'scores[hub].json' -s 0.5 -o p.json", "file not found: scores[hub].json"),
    # plans: exact types, every number in range, each tensor exactly once
    Case("plan-zeros-float", "inspect edited_plan.json", "zeros 2.7", edited("plan", set_tensor("zeros", 2.7))),
    Case("plan-zeros-string", "inspect edited_plan.json", "zeros '100'", edited("plan", set_tensor("zeros", "100"))),
    Case("plan-zeros-bool", "inspect edited_plan.json", "zeros True", edited("plan", set_tensor("zeros", True))),
    Case("plan-zeros-negative", "inspect edited_plan.json", "zeros -1", edited("plan", set_tensor("zeros", -1))),
    Case(
        "plan-zeros-too-many", "inspect edited_plan.json", "zeros 999999", edited("plan", set_tensor("zeros", 999999))
    ),
    Case("plan-target-5", "inspect edited_plan.json", "target_sparsity", edited("plan", set_key("target_sparsity", 5))),
    Case(
        "plan-target-bool",
        "inspect edited_plan.json",
        "target_sparsity",
        edited("plan", set_key("target_sparsity", True)),
    ),
    Case(
        "plan-achieved-misstated",
        "inspect edited_plan.json",
        "states achieved_sparsity",
        edited("plan", set_key("achieved_sparsity", 0.3)),
    ),
    Case(
        "plan-group-deleted",
        "prune -m {llama} --plan edited_plan.json " + SMALL + " -o out",
        "states achieved_sparsity",
        edited("plan", drop_group(keep_totals=False)),
    ),
    Case(
        "plan-group-deleted-restated",
        "prune -m {llama} --plan edited_plan.json " + SMALL + " -o out",
        "misses block model.layers.1",
        edited("plan", drop_group(keep_totals=True)),
    ),
    Case(
        "plan-tensor-twice",
        "prune -m {llama} --plan edited_plan.json " + SMALL + " -o out",
        "is listed twice",
        edited("plan", duplicate_tensor),
    ),
    Case(
        "plan-group-twice",
        "inspect edited_plan.json",
        "group model.layers.0 is listed twice",
        edited("plan", duplicate_group),
    ),
    Case(
        "plan-tensor-resized",
        "prune -m {llama} --plan edited_plan.json " + SMALL + " -o out",
        "does not match the model's tensors",
        edited("plan", resize_tensor),
    ),
    Case(
        "plan-sparsity-misstated",
        "inspect edited_plan.json",
        "states sparsity",
        edited("plan", set_tensor("sparsity", 0.9)),
    ),
    Case("plan-version-2", "inspect edited_plan.json", "unsupported version 2", edited("plan", set_key("version", 2))),
    Case(
        "plan-no-fingerprint", "inspect edited_plan.json", "no model fingerprint", edited("plan", set_key("model", {}))
    ),
    Case("plan-not-json", "prune -m {llama} --plan bad.json -o out", "not valid JSON", raw("bad.json", b"{not json")),
    Case("plan-empty", "prune -m {llama} --plan empty.json -o out", "is empty", raw("empty.json", b"")),
    Case("plan-is-scores", "prune -m {llama} --plan {scores} -o out", "is a scores file, expected a plan"),
    Case("plan-non-utf8", "prune -m {llama} --plan edited_plan.json -o out", "not UTF-8", non_utf8_plan),
    Case("plan-other-model", "prune -m {opt} --plan {plan} " + SMALL + " -o out", "was made for model"),
    # scores
    Case(
        "scores-block-twice",
        "allocate edited_scores.json -s 0.5 -o p.json",
        "listed twice",
        edited("scores", scores_duplicate_block),
    ),
    Case(
        "scores-tensor-twice",
        "allocate edited_scores.json -s 0.5 -o p.json",
        "listed twice",
        edited("scores", scores_duplicate_tensor),
    ),
    Case(
        "scores-string",
        "allocate edited_scores.json -s 0.5 -o p.json",
        "score '1.5'",
        edited("scores", scores_change("score", "1.5")),
    ),
    Case(
        "scores-nan",
        "allocate edited_scores.json -s 0.5 -o p.json",
        "score nan",
        edited("scores", scores_change("score", float("nan"))),
    ),
    Case(
        "scores-negative",
        "allocate edited_scores.json -s 0.5 -o p.json",
        "score -1",
        edited("scores", scores_change("score", -1)),
    ),
    Case(
        "scores-bool",
        "allocate edited_scores.json -s 0.5 -o p.json",
        "score True",
        edited("scores", scores_change("score", True)),
    ),
    Case(
        "scores-some-missing",
        "allocate edited_scores.json -s 0.5 -o p.json",
        "some groups",
        edited("scores", scores_change("score", None)),
    ),
    Case(
        "scores-params-bool",
        "allocate edited_scores.json -s 0.5 -o p.json",
        "positive integer",
        edited("scores", scores_change("params", True)),
    ),
    Case(
        "scores-numel-float",
        "allocate edited_scores.json -s 0.5 -o p.json",
        "malformed tensor",
        edited("scores", set_tensor("numel", 2.5)),
    ),
    Case("scores-is-plan", "allocate {plan} -s 0.5 -o p.json", "is a plan, expected a scores file"),
    # checkpoints and models
    Case(
        "checkpoint-plan-edited",
        "eval ckpt --text {evaltext} --seqlen 16",
        "zeros '100'",
        copy_of("pruned", "ckpt", edit_checkpoint_plan(set_tensor("zeros", "100"))),
    ),
    Case(
        "checkpoint-plan-non-utf8",
        "inspect ckpt",
        "not UTF-8",
        copy_of("pruned", "ckpt", corrupt_checkpoint_plan_bytes),
    ),
    Case(
        "truncated-safetensors-prune",
        "prune -m model -s 0.5 " + SMALL + " -o out",
        "model.safetensors",
        copy_of("llama", "model", truncate_weights),
    ),
    Case(
        "truncated-safetensors-eval",
        "eval model --text {evaltext} --seqlen 16",
        "model.safetensors",
        copy_of("llama", "model", truncate_weights),
    ),
    Case(
        "truncated-safetensors-inspect",
        "inspect ckpt",
        "model.safetensors",
        copy_of("pruned", "ckpt", truncate_weights),
    ),
    Case(
        "truncated-safetensors-checkpoint",
        "eval ckpt --text {evaltext} --seqlen 16",
        "model.safetensors",
        copy_of("pruned", "ckpt", truncate_weights),
    ),
    Case(
        "pickle-only-prune",
        "prune -m model -s 0.5 " + SMALL + " -o out",
        "pickle weights only",
        copy_of("llama", "model", pickle_only),
    ),
    Case(
        "pickle-only-eval",
        "eval model --text {evaltext} --seqlen 16",
        "pickle weights only",
        copy_of("llama", "model", pickle_only),
    ),
    Case("model-missing", "prune -m ./no/such/model -s 0.5 -o out", "model path not found"),
    Case("output-exists", P + " -s 0.5 -o existing", "exists", lambda cwd, base: (cwd / "existing").mkdir()),
    # outputs that cannot be written, refused before the work
    Case("score-output-under-file", "score -m {llama} " + SMALL + " -o afile/s.json", "afile is a file", a_file),
    Case("allocate-output-under-file", "allocate {scores} -s 0.5 -o afile/p.json", "afile is a file", a_file),
    Case("eval-output-under-file", "eval {llama} --text {evaltext} --seqlen 16 -o afile/r.json", "is a file", a_file),
    Case("chart-under-file", "inspect {plan} --chart afile/c.png", "afile is a file", a_file),
    Case("prune-output-under-file", P + " -s 0.5 -o afile/out", "is a file", a_file),
    Case("allocate-output-is-directory", "allocate {scores} -s 0.5 -o adir --overwrite", "is a directory", a_dir),
    Case(
        "prune-output-is-input",
        "prune -m model --plan {plan} " + SMALL + " -o model --overwrite",
        "input model",
        copy_of("llama", "model"),
    ),
    Case("prune-output-dot", "prune -m {llama} --plan {plan} " + SMALL + " -o . --overwrite", "current directory"),
    Case(
        "convert-output-inside-input",
        "convert ckpt -o ckpt/sub --to packed",
        "lies inside the input model",
        copy_of("pruned", "ckpt"),
    ),
    Case(
        "convert-output-contains-input",
        "convert work/ckpt -o work --to packed --overwrite",
        "contains the input model",
        copy_of("pruned", "work/ckpt"),
    ),
    Case(
        "prune-fails-new-parents-removed",
        "prune -m {llama} --calib bin.txt --samples 2 --seqlen 16 -s 0.5 -o new/dir/out",
        "not UTF-8",
        text_file("bin.txt", binary_bytes()),
    ),
    # calibration and evaluation text
    Case(
        "calib-binary",
        "prune -m {llama} --calib bin.txt --samples 2 --seqlen 16 -s 0.5 -o out",
        "not UTF-8",
        text_file("bin.txt", binary_bytes()),
    ),
    Case(
        "calib-utf16-bom",
        "prune -m {llama} --calib u16.txt --samples 2 --seqlen 16 -s 0.5 -o out",
        "UTF-16",
        text_file("u16.txt", ENGLISH.decode().encode("utf-16")),
    ),
    Case(
        "calib-utf16-no-bom",
        "score -m {llama} --calib u16.txt --samples 2 --seqlen 16 -o s.json",
        "NUL bytes",
        text_file("u16.txt", ENGLISH.decode().encode("utf-16-le")),
    ),
    Case(
        "calib-latin1",
        "score -m {llama} --calib l1.txt --samples 2 --seqlen 16 -o s.json",
        "byte 0xe9",
        text_file("l1.txt", ENGLISH + "café".encode("latin-1")),
    ),
    Case(
        "calib-jsonl-latin1",
        "score -m {llama} --calib l1.jsonl --samples 2 --seqlen 16 -o s.json",
        "not UTF-8",
        text_file("l1.jsonl", b'{"text": "' + ENGLISH + 'caf\xe9"}\n'.encode("latin-1")),
    ),
    Case(
        "calib-empty",
        "prune -m {llama} --calib empty.txt --samples 2 --seqlen 16 -s 0.5 --allocator uniform -o out",
        "contains no text",
        text_file("empty.txt", b""),
    ),
    Case(
        "calib-unknown-to-tokenizer",
        "score -m wordmodel --calib greek.txt --samples 2 --seqlen 16 -o s.json",
        "unknown to the model's tokenizer",
        both(copy_of("llama", "wordmodel", word_tokenizer_model), text_file("greek.txt", GREEK)),
    ),
    Case(
        "eval-text-unknown-to-tokenizer",
        "eval wordmodel --text greek.txt --seqlen 16",
        "unknown to the model's tokenizer",
        both(copy_of("llama", "wordmodel", word_tokenizer_model), text_file("greek.txt", GREEK)),
    ),
    Case(
        "eval-text-binary", "eval {llama} --text bin.txt --seqlen 16", "not UTF-8", text_file("bin.txt", binary_bytes())
    ),
    Case(
        "eval-text-utf16",
        "eval {llama} --text u16.txt --seqlen 16",
        "UTF-16",
        text_file("u16.txt", ENGLISH.decode().encode("utf-16")),
    ),
    Case("captions-latin1", "eval {llama} --captions caps.jsonl", "not UTF-8", captions_latin1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, base, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case.setup is not None:
        case.setup(tmp_path, base)
    before = tree(tmp_path)
    command = case.command.format(**{k: str(v) for k, v in base.items()})
    code, out, err, exception = run_cli(shlex.split(command), tmp_path, monkeypatch)
    assert_one_error_line(code, out, err, exception, case.expect)
    assert tree(tmp_path) == before, "something was left behind"


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# --- faults while writing: disk full, read-only, out of memory, Ctrl-C ----------------------------


def _fail_writing(error: BaseException):
    """Make the weight writer write a little, then fail as the disk would."""

    def write(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise error

    return write


@pytest.mark.parametrize(
    ("error", "code", "expect"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 4, "the disk is full"),
        (OSError(errno.EROFS, "Read-only file system"), 4, "the file system is read-only"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), 4, "the disk quota is exceeded"),
        (MemoryError(), 3, "out of memory"),
        (KeyboardInterrupt(), 130, "interrupted: nothing half-written was left behind"),
    ],
    ids=["disk-full", "read-only", "quota", "out-of-memory", "ctrl-c-while-saving"],
)
def test_fault_while_saving_leaves_nothing(error, code, expect, base, tmp_path, monkeypatch):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _fail_writing(error))
    command = f"prune -m {base['llama']} --plan {base['plan']} --calib {base['calib']} --samples 2 --seqlen 16 -o out"
    command += " --resume-interval 0"  # a checkpoint of the state after every block
    got, out, err, exception = run_cli(shlex.split(command), tmp_path, monkeypatch)
    assert_one_error_line(got, out, err, exception, expect)
    assert got == code
    assert left_behind(tmp_path) == set(), "a partial or temporary output was left behind"


def test_ctrl_c_while_pruning_leaves_nothing(base, tmp_path, monkeypatch):
    from ecoflap_cli.engine import pruning

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pruning, "prune_block", interrupted)
    command = f"prune -m {base['llama']} --plan {base['plan']} --calib {base['calib']} --samples 2 --seqlen 16 -o out"
    command += " --resume-interval 0"  # a checkpoint of the state after every block
    code, out, err, exception = run_cli(shlex.split(command), tmp_path, monkeypatch)
    assert_one_error_line(code, out, err, exception, "interrupted")
    assert code == 130 and left_behind(tmp_path) == set()


def test_ctrl_c_after_finished_blocks_keeps_them_and_says_so(base, tmp_path, monkeypatch):
    """Ctrl-C once two blocks are finished: no checkpoint, the finished blocks kept for --resume and
    named in a note line, and the error line does not claim that nothing was written."""
    from ecoflap_cli.io import resume

    done, calls = resume.ResumeState.block_done, []

    def block_done(self: Any, *args: Any, **kwargs: Any) -> None:
        done(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.ResumeState, "block_done", block_done)
    command = f"prune -m {base['llama']} --plan {base['plan']} --calib {base['calib']} --samples 2 --seqlen 16 -o out"
    command += " --resume-interval 0"  # a checkpoint of the state after every block
    code, out, err, exception = run_cli(shlex.split(command), tmp_path, monkeypatch)
    assert_one_error_line(code, out, err, exception, "interrupted: nothing half-written was left behind")
    assert code == 130 and "nothing was written" not in err
    assert "2 finished blocks are kept in .out.ecoflap-resume" in err and "--resume" in err
    assert left_behind(tmp_path) == set() and (tmp_path / ".out.ecoflap-resume").is_dir()


def _recursion_error() -> Exception:
    return RecursionError("maximum recursion depth exceeded")


def _interrupted_import() -> Exception:
    from ecoflap_cli.errors import ModelError

    return ModelError("cannot load model 'm': Could not import module 'LlamaConfig'.")


def _shown_as_it_is(code: int, out: str, err: str, exception: BaseException | None) -> None:
    assert isinstance(exception, RecursionError)  # a bug, not an interrupt: shown as it is


def _the_model_error(code: int, out: str, err: str, exception: BaseException | None) -> None:
    assert_one_error_line(code, out, err, exception, "cannot load model")
    assert code == 2


@pytest.mark.parametrize(
    ("error", "without_ctrl_c"),
    [(_recursion_error, _shown_as_it_is), (_interrupted_import, _the_model_error)],
    ids=["library-broken-by-the-interrupt", "library-turned-it-into-a-model-error"],
)
def test_an_error_after_ctrl_c_is_reported_as_the_interrupt(base, tmp_path, monkeypatch, error, without_ctrl_c):
    """A library interrupted halfway through an import fails on its next use with another error (a
    real SIGINT during accelerate's import left numpy recursing in its __getattr__), or turns the
    Ctrl-C into an error of its own (transformers' lazy import of a config class: "Could not import
    module 'LlamaConfig'", which the loader reports as a ModelError). After Ctrl-C either is one
    `interrupted` line and exit code 130; without Ctrl-C the error is not hidden."""
    from ecoflap_cli.stages import orchestrator

    module = sys.modules["ecoflap_cli.cli.app"]

    def broken(*args: Any, **kwargs: Any) -> None:
        raise error()

    monkeypatch.setattr(orchestrator, "allocate", broken)
    command = ["allocate", str(base["scores"]), "-s", "0.5", "-o", "p.json"]
    without_ctrl_c(*run_cli(command, tmp_path, monkeypatch))
    monkeypatch.setattr(module, "_SIGINT", {"seen": True})
    code, out, err, exception = run_cli(command, tmp_path, monkeypatch)
    assert_one_error_line(code, out, err, exception, "interrupted")
    assert code == 130 and tree(tmp_path) == set()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_refused(base, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        command = f"prune -m {base['llama']} --plan {base['plan']} --calib {base['calib']} --samples 2 -o locked/out"
        code, out, err, exception = run_cli(shlex.split(command), tmp_path, monkeypatch)
        assert_one_error_line(code, out, err, exception, "locked")
        assert tree(locked) == set()
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("delay", [0.6, 2.5], ids=["while-starting", "while-working"])
def test_ctrl_c_in_a_real_process(delay, base, tmp_path):
    """SIGINT while Python imports the command line, and while the model loads or prunes: one
    line, exit code 130, nothing in the output location."""
    command = [
        sys.executable, "-m", "ecoflap_cli", "prune", "-m", str(base["llama"]), "-s", "0.5", "--allocator", "uniform",
        "--calib", str(base["calib"]), "--samples", "64", "--seqlen", "64", "-o", "out",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal")
    if "error:" not in err and "ecoflap_cli" not in err:  # timing on a loaded machine
        pytest.skip("the signal arrived while Python itself was starting, before any ecoflap code ran")
    # 130, or killed by the re-raised SIGINT (-2; the shell shows 130 for both): CPython re-raises it at
    # exit when the interrupt escaped code a C extension ran through PyRun_*, even if it was then handled
    assert process.returncode in (130, -signal.SIGINT), err
    assert_one_error_line(process.returncode, out, err, None, "interrupted")
    assert left_behind(tmp_path) == set(), "something was left behind"


def test_usage_error_in_a_real_process_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ecoflap_cli", "prune", "-m", "x", "-s", "abc"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: Invalid value for '--sparsity'")


# --- below the command line: images and text the tokenizer does not understand -------------------


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (12_000, 12_000)], ids=["bomb-error", "bomb-warning"])
def test_decompression_bomb_image_is_refused(width, height, tmp_path):
    """Pillow raises over 2x MAX_IMAGE_PIXELS (~179 M) and only warns between 1x and 2x: both refused."""
    from ecoflap_cli.data.multimodal import load_image

    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(width, height))
    with pytest.raises(DataError, match="too large to decode safely"):
        load_image(path)


def _word_tokenizer():
    """A word-level tokenizer that knows a few English words and maps the rest to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "big", "red", "house", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize(("foreign", "refused"), [(0, False), (8, False), (12, True), (60, True)])
def test_text_the_tokenizer_mostly_does_not_know_is_refused(foreign, refused):
    """Both sides of MAX_UNKNOWN_SHARE (10 %): 0 and 8 unknown words in 100 pass, 12 and 60 do not."""
    from ecoflap_cli.data.text import MAX_UNKNOWN_SHARE, check_understood, tokenize_documents

    assert MAX_UNKNOWN_SHARE == 0.10
    known = ("the cat sat on the mat and the dog ran to the big red house " * 8).split()[: 100 - foreign]
    text = " ".join(known + ["ζωή"] * foreign)
    tokenizer = _word_tokenizer()
    ids = tokenize_documents(tokenizer, [text])  # no EOS: the word tokenizer has none
    assert ids.numel() == 100
    if refused:
        with pytest.raises(DataError, match="unknown to the model's tokenizer"):
            check_understood(tokenizer, ids, "the text")
    else:
        check_understood(tokenizer, ids, "the text")


def test_byte_fallback_pieces_count_as_unknown():
    from ecoflap_cli.data.text import unknown_token_ids

    class Vocab:
        unk_token_id = 0

        def get_vocab(self) -> dict[str, int]:
            return {"<unk>": 0, "<0x41>": 1, "<0xFF>": 2, "the": 3, "<0x>": 4}

    assert unknown_token_ids(Vocab()) == {0, 1, 2}


# --- reported sparsity is counted from the weights written ----------------------------------------


def test_reported_sparsity_is_counted_from_the_written_weights(base):
    """The prune report, `inspect` of the checkpoint and a count of zeros in the written file agree,
    over every prunable tensor of the model."""
    from safetensors.torch import load_file

    report = json.loads((base["pruned"] / "ecoflap_report.json").read_text())
    plan = json.loads((base["pruned"] / "plan.json").read_text())
    weights = load_file(base["pruned"] / "model.safetensors")
    names = [t["name"] for g in plan["groups"] for t in g["tensors"]]
    assert len(names) == 4 * 7  # every linear of the tiny LLaMA's four blocks
    counted = sum(int((weights[n] == 0).sum()) for n in names) / sum(weights[n].numel() for n in names)
    assert report["achieved_sparsity"] == pytest.approx(counted, abs=1e-12)
    result = CliRunner().invoke(app, ["inspect", str(base["pruned"]), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["achieved_sparsity"] == pytest.approx(counted, abs=1e-12)
