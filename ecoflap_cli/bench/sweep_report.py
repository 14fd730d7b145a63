"""The sweep as a benchmark: llm-compressor's methods beside ecoflap's (``llmc:*``), every method
in its own process (``isolate``), and the markdown tables and plot of the results.

``ecoflap sweep`` (``stages.sweep``) runs ecoflap's methods in one process and writes
``sweep.json``; the benchmarks (``bench.quality``, ``bench.alloc_study``, ...) run the same
runner through :func:`run`, which adds what compares ecoflap with other tools:

- :class:`LlmcPeer` runs ``llmc:SOLVER`` / ``llmc-owl:SOLVER`` methods with llm-compressor in its
  own venv (``--llmc-python``; ``bench/llmc_runner.py``) on the very calibration windows ecoflap
  used, and reads its weights back to evaluate them alike;
- ``cfg.isolate`` runs every method (all its sparsities) in a fresh subprocess, so its peak
  memory is its own;
- ``sweep.md`` (tables, ours / peer time ratios) and ``sweep.png`` (perplexity against sparsity).

    python -m ecoflap_cli.bench.sweep_report --worker CONFIG METHOD PASS   # internal: one isolated method
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli.errors import EcoflapError, PlanError
from ecoflap_cli.evaluation.measure import perplexity, sparsity_report
from ecoflap_cli.io import artifacts
from ecoflap_cli.stages.sweep import (
    PEER_SOLVERS,
    Log,
    MethodSpec,
    SweepConfig,
    SweepRunner,
    collect,
    machine_info,
    parse_method,
    run_sweep,
    safe_name,
)


class LlmcPeer:
    """Runs llm-compressor's methods for a :class:`SweepRunner` (its ``peer``)."""

    def __init__(self) -> None:
        self._model: Path | None = None
        self._windows: Path | None = None

    def retime(self, runner: SweepRunner, spec: MethodSpec, sparsity: float, record: dict[str, Any]) -> None:
        result = self._call(runner, spec, sparsity, time_only=True)
        entry = result["runs"][0]
        if "error" in entry:
            record.setdefault("retime_errors", []).append(entry["error"])
        else:
            record["times"]["prune_s"].extend(entry["oneshot_s"])
            record["times"].setdefault("prune_cpu_s", []).extend(entry.get("oneshot_cpu_s", []))

    def _inputs(self, runner: SweepRunner) -> tuple[Path, Path]:
        if self._model is None or self._windows is None:
            root = runner.out / "peer"
            model_dir = root / f"model-{artifacts.content_hash(runner.cfg.fingerprint())}"
            windows_file = root / f"calib-windows-{artifacts.content_hash(runner.cfg.fingerprint())}.pt"
            batches, _ = runner.prune_data()
            windows = torch.cat([b["input_ids"] for b in batches])
            if not windows_file.is_file():
                tmp = windows_file.with_suffix(f".{os.getpid()}.part")
                tmp.parent.mkdir(parents=True, exist_ok=True)
                torch.save(windows, tmp)
                tmp.replace(windows_file)
            if not (model_dir / "config.json").is_file():
                runner.restore()
                runner.log(f"exporting the dense model for llm-compressor -> {model_dir}")
                tmp_dir = model_dir.with_name(f"{model_dir.name}.{os.getpid()}.part")
                model: Any = runner.loaded.model
                model.save_pretrained(tmp_dir)
                if runner.loaded.tokenizer is not None:
                    runner.loaded.tokenizer.save_pretrained(tmp_dir)
                try:
                    tmp_dir.replace(model_dir)
                except OSError:  # another sweep process exported it first
                    shutil.rmtree(tmp_dir, ignore_errors=True)
            self._model, self._windows = model_dir, windows_file
        return self._model, self._windows

    def _call(self, runner: SweepRunner, spec: MethodSpec, sparsity: float, time_only: bool = False) -> dict[str, Any]:
        model_dir, windows_file = self._inputs(runner)
        script = Path(__file__).parent / "llmc_runner.py"
        work = runner.out / "peer" / safe_name(spec.name)
        result_file = work / f"result-{sparsity:g}.json"
        cmd = [
            str(runner.cfg.llmc_python),
            str(script),
            "--model",
            str(model_dir),
            "--windows",
            str(windows_file),
            "--modifier",
            spec.solver,
            "--sparsity",
            f"{sparsity}",
            "--out",
            str(work),
            "--result",
            str(result_file),
            "--batch-size",
            str(runner.cfg.llmc_batch_size or runner.cfg.batch_size),
            "--threads",
            str(torch.get_num_threads()),
        ]
        if spec.allocator == "llmc-owl":
            cmd += ["--owl-m", str(int(spec.param["m"])), "--owl-lmbda", str(spec.param["lam"])]
        if time_only:
            cmd += ["--time-only"]
        work.mkdir(parents=True, exist_ok=True)
        runner.log(f"llm-compressor: {spec.name} at {sparsity}{' (timing)' if time_only else ''}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        (work / f"log-{sparsity:g}.txt").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-200000:])
        if not result_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"runs": [{"error": f"runner exited {proc.returncode}: {tail[0][:300]}"}], "wall_s": wall}
        result = json.loads(result_file.read_text())
        result["wall_s"] = round(wall, 3)
        return result

    def run(self, runner: SweepRunner, spec: MethodSpec, sparsity: float) -> dict[str, Any]:
        record = runner.record_of(spec, sparsity)
        result = self._call(runner, spec, sparsity)
        entry = result["runs"][0]
        record.update(
            peer={k: v for k, v in result.items() if k != "runs"},
            peer_settings=entry.get("settings"),
            peer_peak_rss_mib=entry.get("peak_rss_mib"),
        )
        if "error" in entry:
            record["error"] = entry["error"]
            record["peak_rss_mib"] = entry.get("peak_rss_mib")
            return runner.save(spec.name, sparsity, record)
        from safetensors.torch import load_file

        runner.restore()
        state = load_file(entry["weights"])
        runner.mark_dirty()
        missing, unexpected = runner.loaded.model.load_state_dict(state, strict=False)
        if unexpected:
            raise EcoflapError(f"llm-compressor returned weights this model does not have: {unexpected[:3]}")
        Path(entry["weights"]).unlink(missing_ok=True)
        windows = runner.eval_windows()
        start = time.perf_counter()
        ppl = perplexity(runner.loaded.model, windows, runner.cfg.eval_batch_size)
        eval_s = time.perf_counter() - start
        if runner.cfg.extra_texts:  # the other-domain texts, as for ecoflap's runs
            record["ppl_extra"] = runner.extra_perplexities()
        rows = sparsity_report(runner.adapter)
        zeros, total = sum(r.zeros for r in rows), sum(r.numel for r in rows)
        block_of = {t: b.name for b in runner.adapter.blocks() for t in b.tensor_names()}
        blocks: dict[str, tuple[int, int]] = {}
        for r in rows:
            z, n = blocks.get(block_of[r.name], (0, 0))
            blocks[block_of[r.name]] = (z + r.zeros, n + r.numel)
        record.update(
            ppl=ppl,
            achieved_sparsity=zeros / total,
            block_sparsity=[round(z / n, 5) for z, n in blocks.values()],
            times={
                "score_s": 0.0,
                "score_reused": True,
                "allocate_s": 0.0,
                "prune_s": list(entry["oneshot_s"]),
                "prune_cpu_s": list(entry.get("oneshot_cpu_s", [])),
                "eval_s": round(eval_s, 3),
            },
            # the runner's own process: what llm-compressor used
            peak_rss_mib=entry.get("peak_rss_mib"),
        )
        return runner.save(spec.name, sparsity, record)


def report(cfg: SweepConfig, log: Log | None = None) -> dict[str, Any]:
    """Write the tables and plot from the runs cached so far, running nothing (partial results)."""
    runner = SweepRunner(cfg, log, LlmcPeer())
    summary = collect(cfg, runner, cfg.specs())
    summary["machine"] = machine_info()
    summary["partial"] = any("error" in r for r in summary["runs"])
    write_outputs(summary, Path(cfg.output), cfg.plot, log)
    return summary


def _run_isolated(cfg: SweepConfig, specs: Sequence[MethodSpec], log: Log) -> None:
    """Every method (all sparsities) in its own subprocess, so its peak RSS is its own."""
    out = Path(cfg.output)
    config_file = out / "sweep-config.json"
    artifacts.write_atomic(config_file, json.dumps(cfg.to_dict(), indent=2).encode())
    names = ["dense"] + [s.name for s in specs]
    timed = None if cfg.timing_methods is None else {parse_method(m).name for m in cfg.timing_methods}
    for repeat in range(cfg.repeats):
        for name in names:
            if repeat > 0 and (name == "dense" or (timed is not None and name not in timed)):
                continue
            log(f"worker: {name} (pass {repeat + 1}/{cfg.repeats})")
            module = "ecoflap_cli.bench.sweep_report"
            cmd = [sys.executable, "-m", module, "--worker", str(config_file), name, str(repeat)]
            proc = subprocess.run(
                cmd, stderr=None if os.environ.get("ECOFLAP_SWEEP_VERBOSE") else subprocess.PIPE, text=True
            )
            if proc.returncode != 0:
                tail = (proc.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
                log(f"worker {name} failed (exit {proc.returncode}): {tail[0][:300]}")


def worker_main(config_file: str, method: str, repeat: int) -> int:
    cfg = SweepConfig.from_dict(json.loads(Path(config_file).read_text()))

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    worker = SweepRunner(cfg, log, LlmcPeer())
    if method == "dense":
        worker.dense()
    else:
        worker.run_pass([parse_method(method)], repeat, include_dense=False)
    return 0


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.{digits}f}"
    return str(value)


def render_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    sparsities = cfg["sparsities"]
    runs = summary["runs"]
    by = {(r["method"], r["sparsity"]): r for r in runs}
    methods = list(dict.fromkeys(r["method"] for r in runs))
    lines = [f"# {cfg.get('title') or 'ecoflap sweep'}", ""]
    lines.append(
        f"Model `{cfg['model']}`; calibration `{cfg['calib']}` ({cfg['samples']} x "
        f"{cfg['seqlen'] or 'context'} tokens for pruning, {cfg['score_samples']} x "
        f"{cfg['score_seqlen'] or cfg['seqlen'] or 'context'} for scoring); perplexity on `{cfg['text']}` "
        f"({summary['dense'].get('windows', '') if summary.get('dense') else ''}"
        f"{cfg['eval_windows'] or 'all'} x {cfg['eval_seqlen']} tokens)."
    )
    lines.append("")
    dense = summary.get("dense") or {}
    lines += [
        "## Perplexity (lower is better)",
        "",
        "| method | " + " | ".join(f"{p:g}" for p in sparsities) + " |",
        "|---|" + "---:|" * len(sparsities),
    ]
    if dense.get("ppl") is not None:
        lines.append(f"| dense | {_fmt(dense['ppl'])} |" + " |" * (len(sparsities) - 1))
    for m in methods:
        cells = []
        for p in sparsities:
            r = by.get((m, p), {})
            cells.append(_fmt(r.get("ppl")) if r.get("ppl") is not None else ("error" if r.get("error") else "-"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for name, path in zip([Path(t).stem for t in cfg.get("extra_texts") or []], cfg.get("extra_texts") or []):
        lines += [
            "",
            f"## Perplexity on `{path}` (same pruned models)",
            "",
            "| method | " + " | ".join(f"{p:g}" for p in sparsities) + " |",
            "|---|" + "---:|" * len(sparsities),
        ]
        if (dense.get("ppl_extra") or {}).get(name) is not None:
            lines.append(f"| dense | {_fmt(dense['ppl_extra'][name])} |" + " |" * (len(sparsities) - 1))
        for m in methods:
            cells = [_fmt((by.get((m, p), {}).get("ppl_extra") or {}).get(name)) for p in sparsities]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every run",
        "",
        "| method | sparsity | achieved | perplexity | score s | allocate s | prune s (median, n) | eval s "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        t = r.get("times", {})
        score = "-" if not t.get("score_s") else f"{t['score_s']:.1f}" + (" (reused)" if t.get("score_reused") else "")
        prune = "-" if t.get("prune_median_s") is None else f"{t['prune_median_s']:.1f} ({t['prune_n']})"
        ppl = _fmt(r.get("ppl")) if r.get("ppl") is not None else f"error: {str(r.get('error', ''))[:80]}"
        lines.append(
            f"| {r['method']} | {r['sparsity']:g} | {_fmt(r.get('achieved_sparsity'), 4)} | {ppl} | {score} | "
            f"{_fmt(t.get('allocate_s'), 3)} | {prune} | {_fmt(t.get('eval_s'), 1)} | "
            f"{_fmt(r.get('peak_rss_mib'), 0)} |"
        )
    if summary.get("ratios"):
        lines += [
            "",
            "## Prune time, ecoflap / llm-compressor (same calibration windows)",
            "",
            "| solver | sparsity | ecoflap wall s (n) | llm-compressor wall s (n) | wall ratio | "
            "ecoflap CPU s | llm-compressor CPU s | CPU ratio | ecoflap ppl | llm-compressor ppl |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for q in summary["ratios"]:
            lines.append(
                f"| {q['solver']} | {q['sparsity']:g} | {_fmt(q['ours_s'], 1)} ({q['ours_n']}) | "
                f"{_fmt(q['peer_s'], 1)} ({q['peer_n']}) | {_fmt(q['ratio'], 2)} | "
                f"{_fmt(q.get('ours_cpu_s'), 1)} | {_fmt(q.get('peer_cpu_s'), 1)} | "
                f"{_fmt(q.get('cpu_ratio'), 2)} | {_fmt(q['ours_ppl'])} | {_fmt(q['peer_ppl'])} |"
            )
    machine = summary.get("machine", {})
    lines += [
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs, "
        f"{machine.get('memory_gib', '?')} GiB, torch {machine.get('torch', '?')} with "
        f"{machine.get('torch_threads', '?')} threads. Times are medians over n runs. Peak RSS is the "
        + (
            "method's own process (isolated)."
            if cfg.get("isolate")
            else "process high-water mark so far (one process: it only grows; use --isolate for per-method peaks)."
        ),
        "",
    ]
    return "\n".join(lines)


def write_plot(summary: dict[str, Any], path: Path) -> bool:
    """Perplexity (log scale) against sparsity, one line per method; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = [r for r in summary["runs"] if r.get("ppl") is not None]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for m in methods:
        pts = sorted((r["sparsity"], r["ppl"]) for r in runs if r["method"] == m)
        style = "--" if m.startswith("llmc") else "-"
        ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", label=m)
    dense = (summary.get("dense") or {}).get("ppl")
    if dense:
        ax.axhline(dense, color="grey", linestyle=":", label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(summary["config"].get("title") or "ecoflap sweep")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(summary: dict[str, Any], out: Path, plot: bool = True, log: Log | None = None) -> None:
    log = log or (lambda message: None)
    artifacts.write_atomic(out / "sweep.json", (json.dumps(summary, indent=2) + "\n").encode())
    artifacts.write_atomic(out / "sweep.md", render_markdown(summary).encode())
    log(f"tables -> {out / 'sweep.md'}, {out / 'sweep.json'}")
    if plot:
        if write_plot(summary, out / "sweep.png"):
            log(f"plot -> {out / 'sweep.png'}")
        else:
            log("plot skipped: matplotlib is not installed (pip install 'ecoflap[plot]')")


def runner(cfg: SweepConfig, log: Log | None = None) -> SweepRunner:
    """A sweep runner that also runs llm-compressor's methods."""
    return SweepRunner(cfg, log, LlmcPeer())


def check_peers(cfg: SweepConfig) -> None:
    if any(s.peer for s in cfg.specs()) and not cfg.llmc_python:
        raise PlanError(
            "llmc:* methods need llm-compressor's Python: pass --llmc-python PATH "
            "(`python -m ecoflap_cli.bench.llmc_env` creates one and prints its path)"
        )


def run(cfg: SweepConfig, log: Log | None = None) -> dict[str, Any]:
    """The whole benchmark sweep: every (method, sparsity), llm-compressor's methods included, in
    one process or (``cfg.isolate``) one per method; writes sweep.json, sweep.md and sweep.png."""
    check_peers(cfg)
    log = log or (lambda message: None)
    if cfg.isolate:
        cfg.check()
        started = time.time()
        load_before = machine_info().get("load_average")
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        _run_isolated(cfg, cfg.specs(), log)
        sweep_runner = runner(cfg, log)
        summary = collect(cfg, sweep_runner, cfg.specs())
        summary["machine"] = machine_info()
        summary["machine"]["load_average_at_start"] = load_before
        summary["wall_s"] = round(time.time() - started, 1)
    else:
        summary = run_sweep(cfg, log, LlmcPeer())
    summary["ratios"] = peer_ratios(cfg, summary)
    write_outputs(summary, Path(cfg.output), cfg.plot, log)
    return summary


def peer_ratios(cfg: SweepConfig, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Ours / llm-compressor's prune time (wall and CPU medians) per solver and sparsity."""
    by = {(r["method"], r["sparsity"]): r for r in summary["runs"]}
    ratios = []
    for solver in PEER_SOLVERS:
        for p in cfg.sparsities:
            ours, peer = by.get((f"uniform:{solver}", p)), by.get((f"llmc:{solver}", p))
            if not ours or not peer:
                continue
            a, b = (r.get("times", {}).get("prune_median_s") for r in (ours, peer))
            ca, cb = (r.get("times", {}).get("prune_cpu_median_s") for r in (ours, peer))
            ratios.append(
                {
                    "solver": solver,
                    "sparsity": p,
                    "ours_s": a,
                    "peer_s": b,
                    "ours_cpu_s": ca,
                    "peer_cpu_s": cb,
                    "cpu_ratio": round(ca / cb, 3) if ca and cb else None,
                    "threads": [ours.get("threads"), peer.get("threads")],
                    "ours_n": ours.get("times", {}).get("prune_n"),
                    "peer_n": peer.get("times", {}).get("prune_n"),
                    "ratio": round(a / b, 3) if a and b else None,
                    "ours_ppl": ours.get("ppl"),
                    "peer_ppl": peer.get("ppl"),
                }
            )
    return ratios


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    print("usage: python -m ecoflap_cli.bench.sweep_report --worker CONFIG METHOD PASS (internal)", file=sys.stderr)
    sys.exit(2)
