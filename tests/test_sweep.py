"""`ecoflap sweep` on tiny models: tables and plot written, reused stages computed once.

The real SmolLM2 benchmark (python -m ecoflap_cli.bench.quality) is not part of this suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ecoflap_cli.bench.sweep_report import run as bench_sweep
from ecoflap_cli.bench.sweep_report import write_outputs
from ecoflap_cli.engine import score_methods as pipeline
from ecoflap_cli.errors import PlanError
from ecoflap_cli.stages import sweep
from ecoflap_cli.stages.sweep import SweepConfig, parse_method, run_sweep

METHODS = [
    "uniform:magnitude",
    "uniform:wanda",
    "uniform:sparsegpt",
    "owl:wanda@m=5,lam=0.08",
    "ecoflap-zeroth:wanda",
    "ecoflap-first:wanda",
    "ecoflap-zeroth:sparsegpt",
    "depth:wanda@step=0.02",
]


def _config(
    model: Path, calib: Path, text: Path, out: Path, methods=METHODS, sparsities=(0.5, 0.7), **kw
) -> SweepConfig:
    values = dict(
        samples=4,
        seqlen=32,
        score_samples=4,
        score_seqlen=16,
        batch_size=2,
        eval_seqlen=32,
        eval_windows=4,
        eval_batch_size=2,
    )
    values.update(kw)
    return SweepConfig(
        model=str(model),
        calib=str(calib),
        text=str(text),
        methods=list(methods),
        sparsities=list(sparsities),
        output=str(out),
        **values,
    )


@pytest.fixture
def counted(monkeypatch):
    """Count calls of the scoring functions and model loads behind the sweep."""
    calls: Counter[str] = Counter()

    def wrap(module, name):
        original = getattr(module, name)

        def counting(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    for name in ("zeroth_order_scores", "first_order_scores", "owl_outlier_ratios"):
        wrap(pipeline, name)
    wrap(sweep, "load_model")
    wrap(sweep, "calibration_batches")
    wrap(sweep, "tokenize_documents")
    return calls


def test_parse_method_forms():
    assert parse_method("uniform:wanda").name == "uniform:wanda"
    assert parse_method("magnitude").name == "uniform:magnitude"
    # a scoring method left out is the allocator's default: what `ecoflap prune --allocator ecoflap`
    # runs (was zeroth here and auto there; issue "One driver" asks for one behaviour)
    eco = parse_method("ecoflap:wanda")
    assert (eco.allocator, eco.scoring, eco.solver) == ("ecoflap", "auto", "wanda")
    assert eco.name == "ecoflap-auto:wanda"
    assert parse_method("ecoflap-zeroth:wanda").name == "ecoflap-zeroth:wanda"
    owl = parse_method("owl:wanda")
    assert owl.param == {"m": 5, "lam": 0.08} and owl.name == "owl:wanda@lam=0.08,m=5"
    assert parse_method("owl:wanda@m=5,lam=0.08") == owl
    assert parse_method("ecoflap-first:sparsegpt@max=0.15").param == {"max": 0.15}
    assert parse_method("llmc:sparsegpt").peer
    # methods sharing a scoring method share one score key, whatever the solver
    assert parse_method("ecoflap-zeroth:wanda").score_key() == parse_method("ecoflap-zeroth:sparsegpt").score_key()
    assert parse_method("uniform:wanda").score_key() is None
    rank = parse_method("rank-first:wanda@metric=gradnorm,lam=0.15")
    assert (rank.allocator, rank.scoring) == ("rank", "first") and rank.score_key() == "first@metric=gradnorm"
    assert parse_method("mix:wanda@lam=0.2,alpha=0.25").param == {"lam": 0.2, "alpha": 0.25}
    assert parse_method("ecoflap-first:wanda@temp=2").name == "ecoflap-first:wanda@temp=2"
    for bad in (
        "wanda:uniform",
        "uniform",
        "uniform-zeroth:wanda",
        "ecoflap-owl:wanda",
        "owl:wanda@x=1",
        "llmc:magnitude",
        "ecoflap-zeroth:obs",
        "rank-owl:wanda",
        "mix:wanda@step=0.01",
        "depth:wanda@temp=2",
    ):
        with pytest.raises(PlanError):
            parse_method(bad)


def test_sweep_runs_writes_tables_and_reuses_stages(tiny_llama, calib_text, eval_text, tmp_path, counted):
    out = tmp_path / "sweep"
    cfg = _config(tiny_llama, calib_text, eval_text, out)
    summary = bench_sweep(cfg)  # the library's sweep plus the benchmark's tables and plot

    runs = summary["runs"]
    assert len(runs) == len(METHODS) * 2
    assert all("error" not in r for r in runs), [r.get("error") for r in runs]
    for r in runs:
        assert r["ppl"] > 1 and r["plan_matches"]
        assert abs(r["achieved_sparsity"] - r["sparsity"]) < 0.01
        t = r["times"]
        assert {"score_s", "allocate_s", "prune_s", "eval_s"} <= set(t) and len(t["prune_s"]) == 1
        assert r["peak_rss_mib"] > 0
    assert summary["dense"]["ppl"] > 1

    # once per scoring method across sparsities and solvers (zeroth: 2 solvers x 2 sparsities)
    assert counted["zeroth_order_scores"] == 1
    assert counted["first_order_scores"] == 1
    assert counted["owl_outlier_ratios"] == 1
    # the model is loaded once; calibration (prune + score) built once each; eval text tokenised once
    assert counted["load_model"] == 1
    assert counted["calibration_batches"] == 2
    assert counted["tokenize_documents"] == 1
    assert summary["counters"]["restore"] >= len(runs) - 1

    data = json.loads((out / "sweep.json").read_text())
    assert data["format"] == "ecoflap.sweep" and len(data["runs"]) == len(runs)
    table = (out / "sweep.md").read_text()
    for m in METHODS:
        assert f"| {parse_method(m).name} |" in table
    assert "| dense |" in table and "prune s (median, n)" in table
    pytest.importorskip("matplotlib")
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_restores_dense_weights_between_runs(tiny_llama, calib_text, eval_text, tmp_path):
    """Magnitude at 0.5 gives the same perplexity whether or not other methods ran before it."""
    alone = run_sweep(_config(tiny_llama, calib_text, eval_text, tmp_path / "a", ["uniform:magnitude"], [0.5]))
    after = run_sweep(
        _config(
            tiny_llama, calib_text, eval_text, tmp_path / "b", ["uniform:sparsegpt", "uniform:magnitude"], [0.7, 0.5]
        )
    )
    by = {(r["method"], r["sparsity"]): r["ppl"] for r in after["runs"]}
    assert by[("uniform:magnitude", 0.5)] == pytest.approx(alone["runs"][0]["ppl"], rel=1e-6)
    assert after["dense"]["ppl"] == pytest.approx(alone["dense"]["ppl"], rel=1e-6)


def test_sweep_resumes_from_cache_and_repeats_timings(tiny_llama, calib_text, eval_text, tmp_path, counted):
    out = tmp_path / "sweep"
    run_sweep(_config(tiny_llama, calib_text, eval_text, out, ["ecoflap-zeroth:wanda"], [0.5]))
    assert counted["zeroth_order_scores"] == 1
    # a second sweep in the same directory: runs and scores come from the cache
    summary = run_sweep(
        _config(
            tiny_llama,
            calib_text,
            eval_text,
            out,
            ["ecoflap-zeroth:wanda", "ecoflap-zeroth:sparsegpt"],
            [0.5],
            repeats=3,
        )
    )
    assert counted["zeroth_order_scores"] == 1
    for r in summary["runs"]:
        assert r["times"]["prune_n"] == 3 and len(r["times"]["prune_s"]) == 3


def test_plot_skipped_without_matplotlib(tiny_llama, calib_text, eval_text, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    messages: list[str] = []
    out = tmp_path / "sweep"
    bench_sweep(_config(tiny_llama, calib_text, eval_text, out, ["uniform:magnitude"], [0.5]), messages.append)
    assert (out / "sweep.md").is_file() and not (out / "sweep.png").exists()
    assert any("plot skipped" in m and "matplotlib" in m for m in messages)


def test_isolated_sweep_records_per_method_memory(tiny_llama, calib_text, eval_text, tmp_path):
    out = tmp_path / "sweep"
    summary = bench_sweep(
        _config(
            tiny_llama, calib_text, eval_text, out, ["uniform:magnitude", "ecoflap-zeroth:wanda"], [0.5], isolate=True
        )
    )
    assert summary["dense"]["ppl"] > 1
    assert all(r["isolated"] and r["peak_rss_mib"] > 0 and r["ppl"] > 1 for r in summary["runs"])


def test_peer_methods_need_llmc_python(tiny_llama, calib_text, eval_text, tmp_path):
    with pytest.raises(PlanError, match="llmc-python"):
        bench_sweep(_config(tiny_llama, calib_text, eval_text, tmp_path / "s", ["llmc:wanda"], [0.5]))


def test_the_library_sweep_leaves_other_tools_to_the_benchmarks(tiny_llama, calib_text, eval_text, tmp_path):
    """`ecoflap sweep` runs ecoflap's methods; llm-compressor's are a benchmark's comparison."""
    with pytest.raises(PlanError, match="from the benchmarks"):
        run_sweep(_config(tiny_llama, calib_text, eval_text, tmp_path / "s", ["llmc:wanda"], [0.5]))
    assert not (tmp_path / "s").exists()


def test_cli_sweep(tiny_llama, calib_text, eval_text, tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "ecoflap_cli",
        "sweep",
        "-m",
        str(tiny_llama),
        "--calib",
        str(calib_text),
        "--text",
        str(eval_text),
        "--method",
        "uniform:wanda",
        "--method",
        "ecoflap-zeroth:wanda",
        "-s",
        "0.5",
        "--samples",
        "4",
        "--seqlen",
        "32",
        "--score-samples",
        "4",
        "--score-seqlen",
        "16",
        "--batch-size",
        "2",
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "2",
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert {r["method"] for r in summary["runs"]} == {"uniform:wanda", "ecoflap-zeroth:wanda"}
    assert "ecoflap-zeroth:wanda" in proc.stderr and "dense" in proc.stderr  # the table, on stderr
    assert proc.stdout == "" and not (out / "sweep.md").exists()
    bad = subprocess.run(
        cmd[:6]
        + ["--method", "nope:wanda", "-s", "0.5", "--calib", str(calib_text), "--text", str(eval_text), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "unknown allocator" in bad.stderr and "Traceback" not in bad.stderr


def test_sweep_new_allocators_and_extra_text(tiny_llama, calib_text, eval_text, tmp_path, counted):
    """rank / mix / temperature runs keep the exact budget and record their settings in the plan;
    every pruned model is also evaluated on the extra text, tokenised once."""
    other = tmp_path / "other.txt"
    other.write_text(
        "\n\n".join(
            f"Enter the {w} and {v}, with drums and colours."
            for w in ("king", "queen", "ghost", "fool")
            for v in ("lords", "soldiers", "players")
        )
        * 8
    )
    methods = [
        "uniform:wanda",
        "rank-first:wanda@metric=gradnorm,lam=0.15",
        "mix-first:wanda@metric=gradnorm,lam=0.2,alpha=0.5",
        "ecoflap-first:wanda@metric=gradnorm,temp=3",
    ]
    summary = run_sweep(
        _config(tiny_llama, calib_text, eval_text, tmp_path / "s", methods, [0.6], extra_texts=[str(other)])
    )
    assert counted["first_order_scores"] == 1  # one score doc for three allocators
    assert counted["tokenize_documents"] == 2
    assert summary["dense"]["ppl_extra"]["other"] > 1
    by = {r["method"]: r for r in summary["runs"]}
    for r in by.values():
        assert "error" not in r, r.get("error")
        assert abs(r["achieved_sparsity"] - 0.6) < 0.01 and r["plan_matches"]
        assert r["ppl_extra"]["other"] > 1 and r["ppl_extra"]["other"] != r["ppl"]
    assert len(set(by["rank-first:wanda@lam=0.15,metric=gradnorm"]["block_sparsity"])) > 1
    write_outputs(summary, tmp_path / "s", plot=False)
    table = (tmp_path / "s" / "sweep.md").read_text()
    assert "## Perplexity on `" in table and "other.txt" in table


def test_sweep_calibrates_on_a_mix_with_self_and_keys_its_cache_by_each_source(
    tiny_llama, calib_text, eval_text, tmp_path
):
    """A sweep takes prune's --calib forms (self, SOURCE:WEIGHT mixes): the runs record the mix,
    the cache keys on every source (another weight is another run), a missing file is one error."""
    mix = f"{calib_text}:0.5,self:0.5"
    out = tmp_path / "sweep"
    summary = run_sweep(_config(tiny_llama, mix, eval_text, out, ["uniform:wanda"], [0.5]))
    sources = summary["runs"][0]["calibration"]["sources"]
    assert [s["source"].rsplit("/", 1)[-1] for s in sources] == [calib_text.name, "self"]
    assert [s["samples"] for s in sources] == [2, 2]
    alone = run_sweep(_config(tiny_llama, calib_text, eval_text, out, ["uniform:wanda"], [0.5]))
    assert alone["runs"][0]["ppl"] != summary["runs"][0]["ppl"]
    first = _config(tiny_llama, mix, eval_text, out).fingerprint()["calib"]
    other = _config(tiny_llama, f"{calib_text}:0.25,self:0.75", eval_text, out)
    assert other.fingerprint()["calib"] != first
    with pytest.raises(PlanError, match="--calib file not found: nowhere.txt"):
        _config(tiny_llama, "nowhere.txt:0.5,self:0.5", eval_text, out).validate()
