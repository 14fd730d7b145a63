"""Smoke tests of the benchmark and study scripts (ecoflap_cli/bench): each runs as documented
(``python -m ecoflap_cli.bench.NAME --help``), and its real code path runs on a tiny random model
with the SmolLM2 / Wikipedia assets replaced by tiny stand-ins: no network, no real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_text

SCRIPTS = (
    "alloc_study",
    "calib_size",
    "calib_sources",
    "clip_study",
    "cuda_check",
    "estimator_study",
    "hybrid_blip2",
    "journal_cost",
    "llmc_env",
    "llmc_runner",
    "offload_memory",
    "packed_size",
    "quality",
    "reconstruction",
    "scoring_cost",
    "sparsegpt_sensitivity",
    "stage_cost",
    "tiny_clip",
    "travel",
)


def _env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ECOFLAP_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ECOFLAP_CACHE: nothing is read from (or written to) the user's cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ECOFLAP_CACHE", str(path))
    return path


@pytest.fixture
def fake_assets(
    cache: Path, tiny_llama: Path, calib_text: Path, eval_text: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Path]:
    """SmolLM2, the Wikipedia splits and the Shakespeare text replaced by tiny local stand-ins."""
    from ecoflap_cli.data import assets

    other = cache.parent / "other.txt"
    other.write_text(make_text(100, seed=7))
    splits = {"calib": calib_text, "valid": eval_text, "test": eval_text}
    monkeypatch.setattr(assets, "smollm2", lambda: tiny_llama)
    monkeypatch.setattr(assets, "wikipedia_splits", lambda: dict(splits))
    monkeypatch.setattr(assets, "shakespeare", lambda: other)
    monkeypatch.setattr(assets, "shakespeare_splits", lambda: {"valid": other, "test": other})
    code = cache.parent / "code.txt"
    code.write_text(make_text(100, seed=9))
    monkeypatch.setattr(assets, "python_code", lambda: {"valid": code, "test": code})
    return {"model": tiny_llama, **splits, "other": other}


def _tiny_batch(model_dir: Path, samples: int = 4, seqlen: int = 16):
    from ecoflap_cli.bench.smollm import smollm2_batches

    loaded, adapter, batches = smollm2_batches(
        "calib", samples, seqlen, batch_size=samples, model=str(model_dir), text=str(_text_file(model_dir))
    )
    return loaded, adapter, batches


def _text_file(model_dir: Path) -> Path:
    path = model_dir.parent / "text.txt"
    if not path.is_file():
        path.write_text(make_text(300, seed=4))
    return path


# --- every script runs as documented ----------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", f"ecoflap_cli.bench.{script}", "--help"],
        capture_output=True,
        text=True,
        env=_env(tmp_path / "cache"),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()  # --help fetches nothing


def test_every_script_is_covered() -> None:
    import ecoflap_cli.bench

    root = Path(ecoflap_cli.bench.__file__).parent
    # smollm, models: shared setup; sweep_report: the sweep's comparisons and tables, used by the scripts
    found = {p.stem for p in root.glob("*.py")} - {"__init__", "smollm", "models", "sweep_report"}
    assert found == set(SCRIPTS)


DOCS = [
    Path(__file__).resolve().parents[1] / "README.md",
    *sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md")),
]
#: placeholders the docs use in command lines, and a value that parses in their place
PLACEHOLDERS = {"P": "0.5"}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """Every `python -m ecoflap_cli.bench.NAME ARGS` in README.md and docs/*.md: (file, NAME, ARGS).

    ARGS end at a backtick, line end, comment, or a closing parenthesis or quote (``"$(python -m ...)"``);
    a placeholder module name (``bench.NAME``, upper case) is not a command.
    """
    import re
    import shlex

    found = []
    for doc in DOCS:
        if not doc.is_file():
            continue
        for m in re.finditer(r"python -m\s+ecoflap_cli\.bench\.([a-z_][a-z0-9_]*)\b([^`\n#)\"']*)", doc.read_text()):
            args = [PLACEHOLDERS.get(a, a) for a in shlex.split(m.group(2))]
            found.append((doc.name, m.group(1), args))
    return found


class _Parsed(Exception):
    pass


def test_documented_command_lines_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command line the docs give is accepted by its script (stopped right after parsing)."""
    import argparse
    import importlib

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    commands = documented_commands()
    assert len(commands) >= 10 and {name for _, name, _ in commands} <= set(SCRIPTS)
    for doc, name, args in commands:
        module = importlib.import_module(f"ecoflap_cli.bench.{name}")
        try:
            module.main(args)
        except _Parsed:
            continue
        except SystemExit as exc:
            pytest.fail(f"{doc}: python -m ecoflap_cli.bench.{name} {' '.join(args)}: rejected (exit {exc.code})")
        pytest.fail(f"{doc}: python -m ecoflap_cli.bench.{name} did not parse its arguments")


# --- the shared SmolLM2 setup -----------------------------------------------------------------


def test_smollm2_config(fake_assets: dict[str, Path], cache: Path) -> None:
    from ecoflap_cli.bench.smollm import METHODS, SETTINGS, SPARSITIES, smollm2_config

    cfg = smollm2_config(peer=False)
    assert cfg.model == str(fake_assets["model"]) and cfg.calib == str(fake_assets["calib"])
    assert cfg.text == str(fake_assets["test"])
    assert cfg.methods == METHODS and cfg.sparsities == SPARSITIES and cfg.llmc_python is None
    assert cfg.samples == SETTINGS["samples"] and cfg.score_seqlen == SETTINGS["score_seqlen"]
    assert Path(cfg.output) == cache / "bench" / "smollm2-test"
    assert cfg.title == "SmolLM2-135M, Wikipedia test split"
    cfg.check()
    # llm-compressor methods with a given venv Python: nothing is created
    peer = smollm2_config(
        "out", "valid", ["llmc:wanda", "uniform:wanda"], [0.5], llmc_python="/venv/bin/python", samples=4, seed=None
    )
    assert peer.llmc_python == "/venv/bin/python" and peer.text == str(fake_assets["valid"])
    assert peer.timing_methods == ["uniform:wanda", "llmc:wanda"] and peer.samples == 4 and peer.seed == 0
    with pytest.raises(ValueError):
        smollm2_config(split="train")


def test_smollm2_config_takes_other_model_and_data(
    tiny_llama: Path, calib_text: Path, eval_text: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecoflap_cli.bench.smollm import smollm2_config
    from ecoflap_cli.data import assets

    def no_network():
        raise AssertionError("assets fetched although replaced")

    monkeypatch.setattr(assets, "smollm2", no_network)
    monkeypatch.setattr(assets, "wikipedia_splits", no_network)
    cfg = smollm2_config(peer=False, model=str(tiny_llama), calib=str(calib_text), text=str(eval_text))
    assert (cfg.model, cfg.calib, cfg.text) == (str(tiny_llama), str(calib_text), str(eval_text))


# --- alloc_study ------------------------------------------------------------------------------


def test_alloc_study_tables(
    fake_assets: dict[str, Path], cache: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecoflap_cli.bench import alloc_study
    from ecoflap_cli.data import assets

    monkeypatch.setattr(assets, "qwen25_coder", lambda: fake_assets["model"])
    cfgs = alloc_study.configs("qwen")
    assert cfgs["test"].extra_texts == [str(fake_assets["other"])]
    assert cfgs["valid"].text == str(fake_assets["valid"]) and cfgs["valid"].sparsities == [0.6, 0.7]
    assert alloc_study.main(["--stage", "tables"]) == 0
    out = capsys.readouterr().out
    assert "#### SmolLM2-135M, Wikipedia valid (the choice)" in out
    assert "#### Qwen2.5-Coder-0.5B, Wikipedia test" in out and "#### Qwen2.5-Coder-0.5B, other" in out
    assert "| uniform:wanda | - | - |" in out  # nothing run yet: every cell empty
    assert "Chosen on both models: None" in out


def test_alloc_study_verdicts_name_each_shortfall(
    fake_assets: dict[str, Path], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecoflap_cli.bench import alloc_study
    from ecoflap_cli.bench.models import DEFAULT_WANDA
    from ecoflap_cli.data import assets

    monkeypatch.setattr(assets, "qwen25_coder", lambda: fake_assets["model"])
    values = {"uniform:wanda": 100.0, "owl:wanda@lam=0.08,m=5": 80.0, "depth:wanda@step=0.01": 90.0}

    def ppl(runner, name, sparsity, extra=None):  # the default: better at 0.6, worse at 0.7
        if name == DEFAULT_WANDA:
            return 72.0 if sparsity == 0.6 else 88.0
        return values.get(name) if extra is None else None  # the other text: baselines not run

    monkeypatch.setattr(alloc_study, "_ppl", ppl)
    rows = [line for line in alloc_study.verdicts(["smollm2"], DEFAULT_WANDA) if line.startswith("| SmolLM2")]
    assert rows[0].endswith("| 72.00 | 100.00 | 80.00 | 90.00 | **10.0% lower** |")
    assert rows[1].endswith("| 88.00 | 100.00 | 80.00 | 90.00 | 10.0% higher (OWL better) |")
    assert rows[2].endswith("| not run |") and len(rows) == 4


def test_alloc_study_chooses_on_both_models_and_leaves_one_out() -> None:
    from ecoflap_cli.bench.alloc_study import VALID_METHODS, choose

    a, b, c = VALID_METHODS[:3]
    scores = {"smollm2": {a: 0.0, b: -0.30, c: -0.20}, "qwen": {a: 0.0, b: 0.05, c: -0.10}}
    assert choose(scores, ["smollm2", "qwen"]) == c  # -0.15 beats b's -0.125
    assert choose(scores, ["smollm2"]) == b and choose(scores, ["qwen"]) == c
    assert choose(scores, ["smollm2", "qwen"], excluded={c}) == b  # over the time budget: not eligible
    del scores["qwen"][c]  # a candidate not measured on every model is not chosen
    assert choose(scores, ["smollm2", "qwen"]) == b


# --- cuda_check -------------------------------------------------------------------------------


def test_cuda_check_dry_run_on_cpu(tmp_path: Path) -> None:
    from ecoflap_cli.bench import cuda_check

    out = tmp_path / "cuda_check.json"
    with pytest.raises(SystemExit) as exit_info:
        cuda_check.main(["--device", "cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    assert exit_info.value.code == 0, report
    assert report["passed"] and set(report["checks"]) == {"cpu", "cpu-sequential"}


# --- estimator_study --------------------------------------------------------------------------


def test_estimator_study_on_a_tiny_model(tiny_llama: Path, tmp_path: Path) -> None:
    from ecoflap_cli.bench import estimator_study

    torch.manual_seed(0)
    _, adapter, (batch,) = _tiny_batch(tiny_llama)
    result = estimator_study.study(adapter, batch, directions=2, eps=1e-3)
    assert set(result["blocks"]) == {b.name for b in adapter.blocks()}
    for row in result["blocks"].values():
        assert row["exact_norm"] > 0
        for kind in estimator_study.KINDS:
            assert len(row[kind]) == 2
            for rec in row[kind]:  # the central difference estimates the exact directional derivative
                central = (rec["plus"] - rec["minus"]) / 2e-3
                assert abs(central - rec["exact"]) <= 0.05 * row["exact_norm"] + 1e-3
    summary = estimator_study.summarise(result)
    assert set(summary) == {*estimator_study.KINDS, "cost"}
    # the script's --summary-only path on the saved study
    out = tmp_path / "study.json"
    out.write_text(json.dumps(result))
    estimator_study.main(["--summary-only", "--out", str(out)])
    assert json.loads(out.read_text())["summary"]["cost"]["central_passes_per_direction_per_block"] == 2


def test_estimator_study_uses_only_public_scoring_helpers() -> None:
    from ecoflap_cli.bench import estimator_study
    from ecoflap_cli.engine import scoring

    for name in ("batch_loss", "block_linears", "perturbed", "replays", "seeded_direction"):
        assert getattr(estimator_study, name) is getattr(scoring, name)


# --- hybrid_blip2 -----------------------------------------------------------------------------


def _tiny_smol_like(directory: Path) -> Path:
    """A tiny LLaMA whose tokenizer has SmolLM2's ``<empty_output>`` special token (the image slot)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from ecoflap_cli.testing import tiny_config

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=160,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<empty_output>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([make_text(50, seed=1)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_hybrid_blip2_builds_and_scores_on_a_tiny_language_model(tmp_path: Path, cache: Path) -> None:
    from ecoflap_cli.bench import hybrid_blip2 as hb
    from ecoflap_cli.io.loading import LoadOptions, load_model

    quiet = lambda _m: None  # noqa: E731
    language = load_model(str(_tiny_smol_like(tmp_path / "lm")), LoadOptions(dtype="float32", device="cpu"))
    model = hb.build_hybrid(tmp_path / "hybrid", language=language, log=quiet)
    assert (model / "config.json").is_file() and (model / "processor_config.json").is_file()
    data = hb.make_caption_data(tmp_path / "data", calib=6, held_out=2, source="drawn", log=quiet)
    assert data["source"] == "drawn" and (data["calib_pairs"], data["eval_pairs"]) == (6, 2)
    losses = hb.caption_losses(model, data["eval"], max_records=2)
    assert set(losses) == {"matched", "rolled", "blank"}
    assert all(v == v and v > 0 for v in losses.values())


# --- llmc_env ---------------------------------------------------------------------------------


def test_llmc_env_locates_a_finished_venv(tmp_path: Path) -> None:
    from ecoflap_cli.bench.llmc_env import MARKER, venv_python

    root = tmp_path / "llmc-venv"
    python = venv_python(root)
    python.parent.mkdir(parents=True)
    python.write_text("")
    (root / MARKER).write_text("{}")
    cmd = [sys.executable, "-m", "ecoflap_cli.bench.llmc_env", "--root", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path / "cache"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(python)  # stdout is only the path: usable as $(...)


def test_llmc_env_no_create_creates_nothing(tmp_path: Path, cache: Path) -> None:
    from ecoflap_cli.bench import llmc_env

    root = tmp_path / "none"
    assert llmc_env.main(["--root", str(root), "--no-create"]) == 1
    assert not root.exists()
    assert llmc_env.default_root() == cache / "llmc-venv"
    assert llmc_env.main(["--no-create"]) == 1  # the default root: CACHE/llmc-venv, not there either


# --- llmc_runner (its real path needs llm-compressor's venv) ----------------------------------


def test_llmc_runner_helpers(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ecoflap_cli.bench import llmc_runner

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    state = llmc_runner._targeted_state(model)
    layers = model.config.num_hidden_layers
    assert len(state) == 7 * layers and not any("lm_head" in k for k in state)  # q k v o gate up down
    assert all(v.dtype == torch.float32 for v in state.values())
    assert llmc_runner._peak_rss_mib() > 0
    assert llmc_runner._jsonable({"a": [1, 2.0]}) and not llmc_runner._jsonable({"a": object()})


def test_llmc_runner_imports_no_ecoflap() -> None:
    import ast

    from ecoflap_cli.bench import llmc_runner

    tree = ast.parse(Path(llmc_runner.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("ecoflap")]  # it runs in llm-compressor's venv


# --- offload_memory ---------------------------------------------------------------------------


def test_offload_memory_samples_the_cli_in_a_child_process() -> None:
    from ecoflap_cli.bench.offload_memory import run_child, status_kib

    wall, peaks, code, _ = run_child(["--help"], interval=0.001)
    assert code == 0 and wall > 0
    assert peaks["anon_kib"] > 0 and peaks["hwm_kib"] >= peaks["anon_kib"]
    got = status_kib(os.getpid())
    assert got["RssAnon"] > 0 and got["VmHWM"] > 0
    assert status_kib(2**31 - 1) == {}  # no such process


@pytest.mark.slow  # no assets needed, but two `ecoflap prune` processes: 10-30 s
def test_offload_memory_on_a_tiny_model(tiny_llama: Path, calib_text: Path, tmp_path: Path, cache: Path) -> None:
    from ecoflap_cli.bench import offload_memory

    out = tmp_path / "offload.json"
    code = offload_memory.main(
        [
            "--model",
            str(tiny_llama),
            "--calib",
            str(calib_text),
            "--samples",
            "4",
            "--seqlen",
            "32",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "runs"),
        ]
    )
    summary = json.loads(out.read_text())
    assert code == 0 and summary["pruned_weights_bit_identical"]
    for run in summary["runs"].values():
        assert run["peak_anon_mib"][0] > 0 and run["peak_hwm_mib"][0] > 0 and run["wall_s"][0] > 0


# --- packed_size ------------------------------------------------------------------------------


def test_packed_size_measures_a_dense_and_packed_pair(tiny_llama: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ecoflap_cli.bench.packed_size import measure
    from ecoflap_cli.cli.app import app

    dense, packed = tmp_path / "dense", tmp_path / "packed"
    runner = CliRunner()
    for args in (
        [
            "prune",
            "-m",
            str(tiny_llama),
            "--sparsity",
            "0.7",
            "--allocator",
            "uniform",
            "--solver",
            "magnitude",
            "--dtype",
            "float16",
            "-o",
            str(dense),
        ],
        ["convert", str(dense), "-o", str(packed), "--to", "packed"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    row = measure(dense, packed, "float16", 0.7, repeats=1)
    assert row["pruned_tensors_dense_bytes"] > 0 and row["packed_file_bytes"] > 0
    assert 0 < row["pruned_tensors_ratio"] < 1  # packed is smaller at 0.7
    assert set(row["load_s_median"]) == {"dense", "packed"}


@pytest.mark.slow  # no assets needed, but `ecoflap prune` and `ecoflap convert` processes: 8-15 s
def test_packed_size_on_a_tiny_model(tiny_llama: Path, tmp_path: Path, cache: Path) -> None:
    from ecoflap_cli.bench import packed_size

    out = tmp_path / "packed.json"
    assert (
        packed_size.main(
            [
                "--model",
                str(tiny_llama),
                "--dtype",
                "float16",
                "--sparsity",
                "0.7",
                "--repeats",
                "1",
                "--out",
                str(out),
                "--work",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    (row,) = json.loads(out.read_text())
    assert row["dtype"] == "float16" and row["sparsity"] == 0.7
    assert row["packed_file_bytes"] > 0 and row["pruned_tensors_dense_bytes"] > 0


# --- quality ----------------------------------------------------------------------------------


def test_quality_on_a_tiny_model(fake_assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ecoflap_cli.bench import quality

    out = tmp_path / "sweep"
    args = [
        "--no-peer",
        "--method",
        "uniform:magnitude",
        "--method",
        "owl:wanda@m=5,lam=0.08",
        "-s",
        "0.5",
        "--samples",
        "4",
        "--seqlen",
        "32",
        "--score-samples",
        "4",
        "--score-seqlen",
        "32",
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--no-plot",
        "-o",
        str(out),
    ]
    assert quality.main(args) == 0
    summary = json.loads((out / "sweep.json").read_text())
    runs = {(r["method"], r["sparsity"]) for r in summary["runs"] if "error" not in r}
    assert {("uniform:magnitude", 0.5), ("owl:wanda@lam=0.08,m=5", 0.5)} <= runs
    assert (out / "sweep.md").is_file() and str(out / "sweep.md") in capsys.readouterr().out
    (out / "sweep.md").unlink()
    assert quality.main([*args, "--report-only"]) == 0  # the tables again, from the cache
    assert (out / "sweep.md").is_file()


# --- reconstruction ---------------------------------------------------------------------------


def test_reconstruction_on_a_tiny_model(fake_assets: dict[str, Path], tmp_path: Path, capsys) -> None:
    from ecoflap_cli.bench import reconstruction

    out = tmp_path / "recon"
    args = ["--model", "smollm2", "--sparsities", "0.5", "--split", "test", "--split", "shakespeare",
            "--repeats", "2", "--recon-param", "steps=2", "--method", "uniform:wanda", "--threads", "1",
            "--samples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2",
            "-o", str(out)]  # fmt: skip
    assert reconstruction.main(args) == 0
    text = (out / "results-reconstruction.md").read_text()
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| 0.5 |")]
    # uniform SparseGPT (the reference, always run), uniform Wanda, and Wanda with reconstruction
    assert [r.split(" | ")[1] for r in rows] == [
        "uniform:sparsegpt",
        "uniform:wanda",
        "uniform:wanda+sublayer@batch=1,bias=True,inputs_from=pruned,lr=0.015,steps=2",
    ]
    assert all(r.split(" | ")[4].endswith("(2)") for r in rows)  # two timings each
    assert rows[0].split(" | ")[5].startswith("1.00")


def test_reconstruction_target_table(fake_assets: dict[str, Path], tmp_path: Path, capsys) -> None:
    from ecoflap_cli.bench import reconstruction
    from ecoflap_cli.bench.models import DEFAULT_SPARSEGPT, DEFAULT_WANDA

    out = tmp_path / "recon"
    args = ["--model", "smollm2", "--sparsities", "0.6", "--split", "test", "--split", "shakespeare",
            "--recon-param", "steps=2", "--recon-param", "lr=0.001", "--method", DEFAULT_WANDA,
            "--method", DEFAULT_SPARSEGPT, "--threads", "1", "--samples", "4", "--seqlen", "32",
            "--eval-seqlen", "32", "--eval-windows", "2", "--score-samples", "4", "--score-seqlen", "16",
            "-o", str(out)]  # fmt: skip
    assert reconstruction.main(args) == 0
    text = (out / "results-reconstruction.md").read_text()
    rows = [line.split(" | ") for line in text.split("The target")[1].splitlines() if line.startswith("| 0.6 |")]
    assert [r[1] for r in rows] == ["eval", "other"]  # each text at 0.6 (the fake assets' file names)
    for row in rows:  # the verdict follows the numbers in the row
        mine, *rivals = (float(v) for v in row[2:5])
        assert row[5].startswith("**yes**") == all(mine < v for v in rivals)
    assert "default + Wanda + reconstruction / uniform SparseGPT (pooled medians)" in text
    # a second call reports from the cache without running anything
    assert reconstruction.main([*args, "--report-only"]) == 0
    assert (out / "results-reconstruction.md").read_text() == text


def test_reconstruction_block_study(fake_assets: dict[str, Path], capsys) -> None:
    from ecoflap_cli.bench import reconstruction

    args = ["--block-study", "1", "--setting", "wanda", "--setting", "wanda+sublayer@steps=8,lr=0.001,batch=0",
            "--sparsities", "0.5", "--samples", "4", "--seqlen", "16"]  # fmt: skip
    assert reconstruction.main(args) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    assert [r[1] for r in rows] == ["wanda", "wanda+sublayer@steps=8,lr=0.001,batch=0"]
    assert float(rows[1][3]) < float(rows[0][3])  # the fit lowers the block's error on its calibration data


def test_reconstruction_block_study_measures_each_block_in_the_dense_model(
    fake_assets: dict[str, Path], capsys
) -> None:
    from ecoflap_cli.bench import reconstruction

    def block_rows(*blocks: str) -> dict[str, str]:
        args = ["--block-study", *blocks, "--setting", "wanda", "--sparsities", "0.5", "--samples", "4",
                "--seqlen", "16"]  # fmt: skip
        assert reconstruction.main(args) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if line[:3] in ("| 0", "| 1")]
        return {r.split(" | ")[0]: r.rsplit(" | ", 1)[0] for r in rows}  # without the time

    # block 1 alone and after block 0: the same inputs (block 0 is dense again before block 1)
    assert block_rows("0", "1")["| 1"] == block_rows("1")["| 1"]


# --- scoring_cost -----------------------------------------------------------------------------


def test_scoring_cost_modes_on_a_tiny_model(tiny_llama: Path) -> None:
    from ecoflap_cli.bench import scoring_cost as sc
    from ecoflap_cli.engine.scoring import ZerothOrderSettings, zeroth_order_scores

    _, adapter, batches = _tiny_batch(tiny_llama)
    names = [b.name for b in adapter.blocks()]
    _, seconds, peak = sc.measure(lambda: sc.plain_forward(adapter, batches))
    assert seconds > 0 and peak >= 0
    for mode, fn in sc.MODES.items():
        scores = fn(adapter, batches, 0)
        assert list(scores) == names and all(v >= 0 for v in scores.values()), mode
    sub = sc.SubsetAdapter(adapter, {names[0], names[-1]})
    ref = zeroth_order_scores(
        sub, batches, ZerothOrderSettings(granularity="tensor", reuse_activations=False, head="exact")
    )
    assert list(ref) == [names[0], names[-1]]
    assert sc.spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert sc.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_scoring_cost_quality_stage_on_a_tiny_model(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The perplexity-after-pruning stage, with SmolLM2 and its 512-token windows swapped for the tiny model."""
    from ecoflap_cli.bench import scoring_cost as sc

    _, adapter, batches = _tiny_batch(tiny_llama)
    mode = "zeroth block+reuse central (default)"
    out = tmp_path / "scoring_cost.json"
    out.write_text(json.dumps({"scores": {mode: sc.MODES[mode](adapter, batches, 0)}}))
    valid = tmp_path / "valid.txt"
    valid.write_text(make_text(600, seed=6))
    monkeypatch.setattr(sc, "smollm2_batches", lambda *a, **k: _tiny_batch(tiny_llama))
    monkeypatch.setattr(sc, "wikipedia_splits", lambda: {"valid": valid})
    sc.quality(out, [mode], 0.5, 4, 1)
    ppl = json.loads(out.read_text())["valid_ppl_ecoflap_wanda"]
    assert set(ppl) == {"uniform", mode} and all(v > 1 for v in ppl.values())


def test_journal_cost_on_a_tiny_model(tiny_llama: Path, calib_text: Path, cache: Path) -> None:
    """The three modes run, interleaved, and the table reports each one's median."""
    proc = subprocess.run(
        [sys.executable, "-m", "ecoflap_cli.bench.journal_cost", "--model", str(tiny_llama), "--calib",
         str(calib_text), "--repeats", "1", "--samples", "2", "--seqlen", "16"],
        capture_output=True, text=True, env=_env(cache), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "median" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["off", "default", "every-block"], proc.stdout


# --- calibration size -------------------------------------------------------------------------


def test_calib_size_on_a_tiny_model(fake_assets: dict[str, Path], capsys) -> None:
    """The cells run at the asked size into that size's own folder and the table gives each one
    its three texts and its prune time against uniform SparseGPT's."""
    from ecoflap_cli.bench import calib_size
    from ecoflap_cli.data import assets

    args = ["--model", "smollm2", "-s", "0.5", "--method", "uniform:wanda", "--method", "uniform:sparsegpt",
            "--samples", "3", "--seqlen", "32", "--eval-seqlen", "32", "--score-samples", "2",
            "--score-seqlen", "16"]  # fmt: skip
    assert calib_size.main(args) == 0
    out = capsys.readouterr().out
    assert (assets.cache_dir() / "bench" / "smollm2-calib-3x32" / "runs").is_dir()
    rows = {line.split(" | ")[1]: line.split(" | ") for line in out.splitlines() if line.startswith("| 3 x 32 |")}
    assert set(rows) == {"dense", "uniform:wanda", "uniform:sparsegpt"}
    for row in rows.values():
        assert all(float(cell) > 1 for cell in row[3:6])  # Wikipedia test, Shakespeare, code
    assert rows["uniform:sparsegpt"][7].strip(" |") == "1.00"
    assert float(rows["uniform:wanda"][7].strip(" |")) > 0


# --- choosing a default that travels ---------------------------------------------------------


def _travel_run(model: str, calib: str, method: str, sparsity: float, ppl: list[float], prune_s: float, **times):
    """One cached run of bench.travel: six perplexities (three validation, three test texts)."""
    from ecoflap_cli.bench import travel

    runs = travel.folder(model, calib) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    names = ["shakespeare_valid", "code_valid", "test", "shakespeare", "code"]
    record = {"method": method, "sparsity": sparsity, "ppl": ppl[0], "ppl_extra": dict(zip(names, ppl[1:])),
              "times": {"prune_s": [prune_s], "score_s": 0.0, **times}}  # fmt: skip
    (runs / f"{method.replace(':', '_')}-{sparsity:g}.json").write_text(json.dumps(record))


def test_travel_report_chooses_on_validation_within_the_budget(cache: Path) -> None:
    """Gap ratios are against today's default; the choice uses validation texts only and drops a
    candidate over the cost budget (self-generation counted), however good; leave-one-out lines."""
    from ecoflap_cli.bench import travel
    from ecoflap_cli.bench.models import DEFAULT_SPARSEGPT, DEFAULT_WANDA

    for model in ("smollm2", "qwen"):
        _travel_run(model, "wiki", "dense", 0.0, [10.0] * 6, 0.0)
        for p in travel.SPARSITIES:
            _travel_run(model, "wiki", DEFAULT_WANDA, p, [30.0] * 6, 40.0)  # gap 20 everywhere
            _travel_run(model, "wiki", "uniform:sparsegpt", p, [25.0] * 6, 100.0)
            # better on validation than the default, worse on test: the choice must not see test
            _travel_run(model, "wiki", DEFAULT_SPARSEGPT, p, [20.0, 20.0, 20.0, 90.0, 90.0, 90.0], 90.0)
            # the best of all, but its self-generation puts it over budget
            _travel_run(model, "mix", DEFAULT_WANDA, p, [12.0] * 6, 40.0, calib_s=70.0)
    out = travel.report(["smollm2", "qwen"])
    row = next(line for line in out.splitlines() if line.startswith(f"| wiki | {DEFAULT_WANDA} | 0.6 |"))
    assert row.count("(1.00)") == 6
    mix = next(line for line in out.splitlines() if line.startswith(f"| mix | {DEFAULT_WANDA} | 0.6 |"))
    assert "12.00 (0.10)" in mix and mix.rstrip(" |").endswith("1.10")  # (40 + 70) / 100
    assert f"- all validation cells: {DEFAULT_SPARSEGPT} with wiki calibration" in out
    assert "geometric mean 0.50" in out  # (20 - 10) / (30 - 10) on every validation cell
    assert out.count("- without ") == 5  # three domains and two models left out in turn
    assert "on code_valid: 0.50" in out and "on qwen: 0.50" in out
    # the target's line: the best test-text ratio at any cost, whatever chose it
    assert f"- qwen 0.7: test 0.10 ({DEFAULT_WANDA}, mix)" in out


def test_travel_budget_judged_side_by_side_near_prune_size(cache: Path) -> None:
    """A candidate over the budget in its single benchmark-size timing is eligible where the
    side-by-side cost at the largest measured calibration size (bench.stage_cost) is within it;
    settings in any order name the same method."""
    from ecoflap_cli.bench import travel
    from ecoflap_cli.bench.models import DEFAULT_WANDA

    search = "search:wanda@start=ecoflap,gens=8"
    for model in ("smollm2", "qwen"):
        _travel_run(model, "wiki", "dense", 0.0, [10.0] * 6, 0.0)
        for p in travel.SPARSITIES:
            _travel_run(model, "wiki", DEFAULT_WANDA, p, [30.0] * 6, 40.0)
            _travel_run(model, "wiki", "uniform:sparsegpt", p, [40.0] * 6, 100.0)
            _travel_run(model, "wiki", travel.canonical(search), p, [28.0] * 6, 150.0)  # 1.5x at this size
        bench = travel.folder(model, "wiki").parent
        small = [{"model": model, "repeat": 0, "sparsity": 0.6, "method": "uniform:sparsegpt", "total_s": 10.0},
                 {"model": model, "repeat": 0, "sparsity": 0.6, "method": search, "total_s": 20.0}]  # fmt: skip
        (bench / f"{model}-stage-cost-4x64.json").write_text(json.dumps(small))
        big = [{"model": model, "repeat": r, "sparsity": 0.6, "method": m, "total_s": t}
               for r, scale in enumerate((1.0, 1.2, 0.9))
               for m, t in (("uniform:sparsegpt", 100.0 * scale), (search, 80.0 * scale))]  # fmt: skip
        (bench / f"{model}-stage-cost-8x64.json").write_text(json.dumps(big))
        (bench / f"{model}-stage-cost-16x64-score64.json").write_text(json.dumps(small))  # scored otherwise
    assert travel.prune_size_costs("qwen") == (
        "8x64",
        {"uniform:sparsegpt": 1.0, travel.canonical(search): 0.8},
    )
    out = travel.report(["smollm2", "qwen"])
    before, _, after = out.partition("judged side by side near prune's size")
    assert f"- all validation cells: {DEFAULT_WANDA} with wiki calibration" in before  # 1.5x: over budget
    assert f"- all validation cells: {travel.canonical(search)} with wiki calibration" in after
    assert after.count("- without ") == 5


# --- a candidate's cost, side by side ----------------------------------------------------------


def test_stage_cost_times_each_method_and_gives_per_repeat_ratios(fake_assets: dict[str, Path]) -> None:
    """Every method's scoring (the search included) and prune are timed on one runner; the
    summary divides each repeat by uniform SparseGPT's seconds in the same repeat."""
    from ecoflap_cli.bench import stage_cost
    from ecoflap_cli.bench.models import DEFAULT_WANDA, model_config
    from ecoflap_cli.stages.sweep import SweepRunner

    methods = [stage_cost.REFERENCE, DEFAULT_WANDA, "search:wanda@gens=1"]
    cfg = model_config("smollm2", methods, [0.5], "valid", samples=3, seqlen=32, score_samples=4, score_seqlen=16)
    runner = SweepRunner(cfg)
    before = {k: v.clone() for k, v in runner.loaded.model.state_dict().items()}
    timed = {m: stage_cost.time_method(runner, m, 0.5) for m in methods}
    assert timed[stage_cost.REFERENCE]["score_s"] == 0.0  # a uniform plan needs no scores
    for seconds in timed.values():
        assert seconds["prune_s"] > 0 and seconds["total_s"] >= seconds["prune_s"]
    assert timed[DEFAULT_WANDA]["score_s"] > 0 and timed["search:wanda@gens=1"]["score_s"] > 0
    runner.restore()
    for name, value in runner.loaded.model.state_dict().items():
        assert value.equal(before[name]), name

    entries = [
        {"model": "m", "repeat": r, "sparsity": 0.6, "method": m, "score_s": 0.0, "prune_s": t, "total_s": t}
        for r, times in enumerate([(100.0, 50.0), (200.0, 50.0), (100.0, 90.0)])
        for m, t in zip((stage_cost.REFERENCE, DEFAULT_WANDA), times)
    ]
    row = next(line for line in stage_cost.summary(entries).splitlines() if f"| {DEFAULT_WANDA} |" in line)
    assert "0.50, 0.25, 0.90" in row and row.rstrip(" |").endswith("0.50")  # the median of the ratios


def test_stage_cost_at_another_calibration_size_keeps_its_own_file(fake_assets: dict[str, Path], capsys) -> None:
    """``--samples`` / ``--seqlen`` time the prune on that much calibration text, into a file of
    that size, beside (not over) the benchmark size's results."""
    from ecoflap_cli.bench import stage_cost
    from ecoflap_cli.data import assets

    args = ["--model", "smollm2", "--samples", "3", "--seqlen", "32", "--repeats", "1", "--method", "uniform:wanda"]
    assert stage_cost.main(args) == 0
    saved = json.loads((assets.cache_dir() / "bench" / "smollm2-stage-cost-3x32.json").read_text())
    assert {e["method"] for e in saved} == {stage_cost.REFERENCE, "uniform:wanda"}  # the reference is always run
    assert not (assets.cache_dir() / "bench" / "smollm2-stage-cost.json").exists()
    assert "| 0.6 | uniform:wanda | 1 |" in capsys.readouterr().out
    # --score-seqlen: the scoring samples' length too (prune's defaults), in a file of its own
    args = ["--model", "smollm2", "--samples", "3", "--seqlen", "32", "--score-seqlen", "24", "--repeats", "1"]
    assert stage_cost.main([*args, "--method", stage_cost.REFERENCE]) == 0
    assert (assets.cache_dir() / "bench" / "smollm2-stage-cost-3x32-score24.json").is_file()
    from ecoflap_cli.bench.travel import config

    assert config("smollm2", "wiki", [stage_cost.REFERENCE], [0.6], score_seqlen=24).score_seqlen == 24
