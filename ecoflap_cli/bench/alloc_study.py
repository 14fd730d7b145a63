"""The allocation study on two real models (issue: quality that holds on every model), in one command:

    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.alloc_study --model smollm2 [--stage valid|test|tables]
    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.alloc_study --model qwen [--stage valid|test|tables]
    python -m ecoflap_cli.bench.alloc_study --stage tables        # both models' tables and the choice

SmolLM2-135M (LLaMA, 30 blocks) and Qwen2.5-Coder-0.5B (Qwen2, 24 blocks), pruned with Wanda;
calibration from the Wikipedia calib split (seed 0); block scores from 32 x 128 tokens. The
data sizes per model are in ``bench.models.SIZES`` (Qwen's are smaller: it costs about four times as much per
token on the same CPU).

1. ``valid``: the candidate allocators at 0.6 and 0.7, perplexity on the Wikipedia *validation*
   split. The default is chosen here, on both models together: the candidate with the lowest
   mean log perplexity ratio to uniform Wanda over both models and both sparsities.
2. ``test``: the baselines, the candidates worth showing and the chosen default, perplexity on
   the Wikipedia *test* split and on the other-domain text (six Shakespeare tragedies; never used
   to choose anything).
3. ``peer`` (optional, ``--sparsity P``): llm-compressor's Wanda and SparseGPT beside ecoflap's
   uniform runs, on the test stage's windows and cache (its venv is created once).
4. ``tables``: markdown tables from the cached runs (what docs/allocation.md shows), the default
   against uniform / OWL / depth, the choice, the search's cost, and the leave-one-model-out
   check (the choice made on one model alone, scored on the other).

Every run is cached under CACHE/bench/, so each stage resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Collection
from typing import Any

from ecoflap_cli.bench.models import MODELS, SIZES, model_config

G = "metric=gradnorm"
#: the search as this study ran it (its defaults then; today's default search refines the
#: ECoFLaP plan with fewer, smaller fitness measurements: docs/allocation.md)
SEARCH = "search:wanda@start=best,offspring=6,quick=4,full=8"
#: the default until this study (mix, lam 0.15, alpha 0.5, on exact gradient norms)
OLD_DEFAULT = f"mix-first:wanda@{G},lam=0.15,alpha=0.5"
VALID_METHODS = [
    "uniform:wanda",
    "owl:wanda@m=5,lam=0.08",
    "depth:wanda@step=0.01",
    f"ecoflap-first:wanda@{G}",
    OLD_DEFAULT,
    f"mix-first:wanda@{G},lam=0.15,alpha=0.75",
    f"mix-first:wanda@{G},lam=0.15,alpha=1",
    SEARCH,
]
#: the test stage: baselines and candidates (the chosen default is added to them)
TEST_METHODS = [
    "uniform:wanda",
    "owl:wanda@m=5,lam=0.08",
    "depth:wanda@step=0.01",
    f"ecoflap-first:wanda@{G}",
    OLD_DEFAULT,
    SEARCH,
    "uniform:sparsegpt",
]
VALID_SPARSITIES = [0.6, 0.7]
#: the time budget of a default: its scoring may cost at most this many Wanda prunes (median)
BUDGET = 3.0
#: the peer stage: llm-compressor's solvers beside ours, in the test stage's cache (same windows)
PEER_METHODS = ["uniform:wanda", "llmc:wanda", "uniform:sparsegpt", "llmc:sparsegpt"]
#: what the default must beat at 0.6 and 0.7 on every model and text (the issue's bar)
BASELINES = {"uniform": "uniform:wanda", "OWL": "owl:wanda@m=5,lam=0.08", "depth": "depth:wanda@step=0.01"}


def configs(model: str, default: str | None = None, llmc_python: str | None = None) -> dict[str, Any]:
    """The validation and test stages' sweep configurations; with ``llmc_python`` the test stage
    runs ``PEER_METHODS`` (llm-compressor beside ecoflap) instead of the allocators."""
    size = SIZES[model]
    common = {"samples": size["samples"], "threads": 1}
    valid = model_config(model, VALID_METHODS, VALID_SPARSITIES, "valid", eval_windows=size["valid_windows"], **common)
    methods = list(TEST_METHODS) if llmc_python is None else list(PEER_METHODS)
    if llmc_python is not None:
        common["llmc_python"] = llmc_python
    elif default is not None:
        for extra in (default, default.replace(":wanda", ":sparsegpt", 1)):
            if extra not in methods:
                methods.append(extra)
    test = model_config(
        model,
        methods,
        size["sparsities"],
        "test",
        extra_texts=["shakespeare"],
        eval_windows=size["test_windows"],
        **common,
    )
    return {"valid": valid, "test": test}


def _ppl(runner: Any, method: str, sparsity: float, extra: str | None = None) -> float | None:
    record = runner.load_record(method, sparsity) or {}
    value = record.get("ppl") if extra is None else (record.get("ppl_extra") or {}).get(extra)
    return value if isinstance(value, float) and math.isfinite(value) else None


def valid_scores(models: list[str]) -> dict[str, dict[str, float]]:
    """model -> method -> mean log(ppl / uniform ppl) over the validation sparsities (complete only)."""
    from ecoflap_cli.bench.sweep_report import runner as sweep_runner
    from ecoflap_cli.stages.sweep import parse_method

    out: dict[str, dict[str, float]] = {}
    for model in models:
        runner = sweep_runner(configs(model)["valid"])
        rows: dict[str, float] = {}
        for method in VALID_METHODS:
            name = parse_method(method).name
            ratios = []
            for p in VALID_SPARSITIES:
                base, value = _ppl(runner, parse_method("uniform:wanda").name, p), _ppl(runner, name, p)
                if base is None or value is None:
                    break
                ratios.append(math.log(value / base))
            else:
                rows[method] = sum(ratios) / len(ratios)
        out[model] = rows
    return out


def scoring_costs(models: list[str]) -> dict[str, list[float]]:
    """Candidate -> its scoring time / the Wanda prune's time, for every run (valid and test
    stages) that computed its scores and pruned in the same process (the search: every run)."""
    from ecoflap_cli.bench.sweep_report import runner as sweep_runner
    from ecoflap_cli.stages.sweep import parse_method

    out: dict[str, list[float]] = {}
    for model in models:
        for cfg in configs(model).values():
            runner = sweep_runner(cfg)
            for method in VALID_METHODS:
                for p in sorted(set(VALID_SPARSITIES) | set(SIZES[model]["sparsities"])):
                    times = (runner.load_record(parse_method(method).name, p) or {}).get("times") or {}
                    if times.get("score_reused") is False and times.get("prune_s"):
                        out.setdefault(method, []).append(times["score_s"] / statistics.median(times["prune_s"]))
    return out


def over_budget(models: list[str]) -> dict[str, float]:
    """Candidates whose median scoring cost is over ``BUDGET`` prunes (-> that median)."""
    medians = {m: statistics.median(r) for m, r in scoring_costs(models).items()}
    return {m: v for m, v in medians.items() if v > BUDGET}


def choose(scores: dict[str, dict[str, float]], models: list[str], excluded: Collection[str] = ()) -> str | None:
    """The candidate with the lowest mean score over ``models`` (among those measured on all and
    not ``excluded``)."""
    common = [m for m in VALID_METHODS if m not in excluded and all(m in scores.get(model, {}) for model in models)]
    if not common:
        return None
    return min(common, key=lambda m: sum(scores[model][m] for model in models) / len(models))


def verdicts(models: list[str], default: str) -> list[str]:
    """Markdown: the default against uniform, OWL and depth (Wanda) at 0.6 and 0.7, test stage."""
    from ecoflap_cli.bench.sweep_report import runner as sweep_runner
    from ecoflap_cli.stages.sweep import parse_method

    lines = ["", "#### The default against uniform, OWL and depth (all with Wanda), test stage", ""]
    lines.append(
        "| model | text | sparsity | default | " + " | ".join(BASELINES) + " | the default against the best of them |"
    )
    lines.append("|---|---|---:|---:|" + "---:|" * len(BASELINES) + "---|")
    for model in models:
        cfg = configs(model, default)["test"]
        runner = sweep_runner(cfg)
        for label, extra in [("Wikipedia test", None)] + [(t, t) for t in cfg.extra_names()]:
            for p in VALID_SPARSITIES:
                mine = _ppl(runner, parse_method(default).name, p, extra)
                theirs = {k: _ppl(runner, parse_method(m).name, p, extra) for k, m in BASELINES.items()}
                cells = " | ".join("-" if v is None else f"{v:.2f}" for v in [mine, *theirs.values()])
                known = {k: v for k, v in theirs.items() if v is not None}
                if mine is None or not known:
                    verdict = "not run"
                else:
                    best = min(known, key=lambda k: known[k])
                    if mine < known[best]:
                        verdict = f"**{100 * (1 - mine / known[best]):.1f}% lower**"
                    else:
                        verdict = f"{100 * (mine / known[best] - 1):.1f}% higher ({best} better)"
                    if len(known) < len(BASELINES):
                        verdict += " (not all run)"
                lines.append(f"| {MODELS[model][0]} | {label} | {p:g} | {cells} | {verdict} |")
    return lines


def tables(models: list[str]) -> str:
    """The docs' tables from the cached runs, the choice and the leave-one-model-out check."""
    from ecoflap_cli.bench.sweep_report import runner as sweep_runner
    from ecoflap_cli.stages.sweep import parse_method

    scores = valid_scores(list(MODELS))
    dear = over_budget(list(MODELS))
    default = choose(scores, list(MODELS), dear)
    lines = []
    for model in models:
        title = MODELS[model][0]
        for stage, cfg in configs(model, default).items():
            runner = sweep_runner(cfg)
            dense = runner.load_record("dense", 0.0) or {}
            texts = [(f"Wikipedia {stage}", None)] + [(t, t) for t in cfg.extra_names()]
            sparsities = sorted(cfg.sparsities)
            for label, extra in texts:
                lines += ["", f"#### {title}, {label}" + (" (the choice)" if stage == "valid" else ""), ""]
                lines.append("| allocator (scores):solver | " + " | ".join(f"{p:g}" for p in sparsities) + " |")
                lines.append("|---|" + "---:|" * len(sparsities))
                d = dense.get("ppl") if extra is None else (dense.get("ppl_extra") or {}).get(extra)
                lines.append(f"| dense | {d:.2f} |" + " |" * (len(sparsities) - 1) if d else "| dense | - |")
                for method in cfg.methods:
                    name = parse_method(method).name
                    cells = []
                    for p in sparsities:
                        v = _ppl(runner, name, p, extra)
                        cells.append(f"{v:.2f}" if v is not None else "-")
                    mark = " (default)" if method == default else ""
                    lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
                for name in [m for m in PEER_METHODS if m.startswith("llmc")] if stage == "test" else []:
                    values = [_ppl(runner, name, p, extra) for p in sparsities]
                    if any(v is not None for v in values):  # llm-compressor, where the peer stage ran
                        lines.append(
                            f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |"
                        )
    if default is not None:
        lines += verdicts(models, default)
    lines += ["", "#### The choice (mean log perplexity ratio to uniform Wanda, validation split, 0.6 and 0.7)", ""]
    lines.append("| candidate | " + " | ".join(MODELS[m][0] for m in MODELS) + " | both |")
    lines.append("|---|" + "---:|" * (len(MODELS) + 1))
    for method in VALID_METHODS:
        cells = [f"{scores[m][method]:+.3f}" if method in scores.get(m, {}) else "-" for m in MODELS]
        both = [scores[m][method] for m in MODELS if method in scores.get(m, {})]
        total = f"{sum(both) / len(both):+.3f}" if len(both) == len(MODELS) else "-"
        lines.append(f"| {parse_method(method).name} | " + " | ".join(cells) + f" | {total} |")
    lines += ["", "#### What the search costs beside one prune (the same run: search, then the Wanda prune)", ""]
    lines.append("| model | stage | sparsity | search s | prune s | search / prune |")
    lines.append("|---|---|---:|---:|---:|---:|")
    ratios = []
    for model in models:
        for stage, cfg in configs(model, default).items():
            runner = sweep_runner(cfg)
            for p in sorted(cfg.sparsities):
                record = runner.load_record(parse_method(SEARCH).name, p) or {}
                times = record.get("times") or {}
                if times.get("score_reused") is False and times.get("prune_s"):
                    prune_s = statistics.median(times["prune_s"])
                    ratios.append(times["score_s"] / prune_s)
                    lines.append(
                        f"| {MODELS[model][0]} | {stage} | {p:g} | {times['score_s']:.0f} | {prune_s:.0f} | "
                        f"{ratios[-1]:.1f} |"
                    )
    if ratios:
        lines.append(f"| median | | | | | {statistics.median(ratios):.1f} |")
    lines += ["", f"Chosen on both models: {default}"]
    for method, ratio in dear.items():
        lines.append(f"Not eligible: {method} (its scoring costs {ratio:.1f} prunes, median; the budget is {BUDGET:g})")
    for held in MODELS:
        others = [m for m in MODELS if m != held]
        pick = choose(scores, others, dear)
        if pick is not None and pick in scores.get(held, {}):
            best = choose(scores, [held], dear)
            assert best is not None  # pick itself qualifies on the held-out model
            lines.append(
                f"Leave-one-model-out: chosen on {', '.join(MODELS[m][0] for m in others)} alone: {pick}; "
                f"on {MODELS[held][0]} it scores {scores[held][pick]:+.3f} (the best there, {best}: "
                f"{scores[held][best]:+.3f})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=(*MODELS, "both"), default="both")
    parser.add_argument("--stage", choices=("valid", "test", "peer", "tables", "all"), default="all")
    parser.add_argument(
        "--only",
        action="append",
        metavar="METHOD@SPARSITY",
        help="valid stage: run just these runs, in this order (e.g. 'uniform:wanda@0.7'; repeat)",
    )
    parser.add_argument(
        "--sparsity",
        type=float,
        action="append",
        help="test stage: only this sparsity (repeat; two processes can split a model's sparsities)",
    )
    args = parser.parse_args(argv)
    models = list(MODELS) if args.model == "both" else [args.model]

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    from ecoflap_cli.bench.sweep_report import run as run_sweep

    for model in models:
        if args.stage in ("valid", "all"):
            if args.only:  # a chosen subset, in order, one model load (the cache is the full stage's)
                from ecoflap_cli.bench.sweep_report import runner as sweep_runner
                from ecoflap_cli.stages.sweep import parse_method

                runs = []
                for item in args.only:
                    method, _, sparsity = item.rpartition("@")
                    if method not in VALID_METHODS or float(sparsity) not in VALID_SPARSITIES:
                        parser.error(f"--only takes a validation method and sparsity, got {item!r}")
                    runs.append((parse_method(method), float(sparsity)))
                runner = sweep_runner(configs(model)["valid"], log)
                runner.dense()
                for spec, sparsity in runs:
                    record = runner.run(spec, sparsity)
                    log(f"{spec.name} at {sparsity:g}: ppl {record.get('ppl', record.get('error'))}")
            else:
                run_sweep(configs(model)["valid"], log)
    if args.stage in ("test", "all"):
        default = choose(valid_scores(list(MODELS)), list(MODELS), over_budget(list(MODELS)))
        for model in models:
            cfg = configs(model, default)["test"]
            if args.sparsity:
                unknown = sorted(set(args.sparsity) - set(cfg.sparsities))
                if unknown:
                    parser.error(f"--sparsity {unknown[0]:g} is not a test sparsity ({cfg.sparsities})")
                cfg.sparsities = [p for p in cfg.sparsities if p in args.sparsity]
            run_sweep(cfg, log)
    if args.stage == "peer":  # llm-compressor beside ecoflap, in the test stage's cache
        from ecoflap_cli.bench.llmc_env import default_root, ensure_llmc_venv
        from ecoflap_cli.bench.sweep_report import runner as sweep_runner

        python = str(ensure_llmc_venv(default_root(), log))
        for model in models:
            cfg = configs(model, llmc_python=python)["test"]
            if args.sparsity:
                cfg.sparsities = [p for p in cfg.sparsities if p in args.sparsity]
            sweep_runner(cfg, log).run_pass(cfg.specs(), 0)
    if args.stage in ("tables", "all"):
        print(tables(models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
