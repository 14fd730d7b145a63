"""Choosing a default that travels (issue 24): candidates on validation text from three domains.

    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.travel --model smollm2 --calib wiki
    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.travel --model qwen --calib mix --method DEFAULT_WANDA
    python -m ecoflap_cli.bench.travel --report

Each (model, calibration) runs its methods at 0.6 and 0.7 (the model's benchmark sizes,
``bench.models.SIZES``: 16 x 512 calibration tokens on SmolLM2, 8 x 512 on Qwen2.5-Coder, seed 0)
and evaluates every pruned model on six texts: the three **validation** texts that choose (the
Wikipedia valid split, three Shakespeare plays that are no tragedy, the code text's valid split)
and the three **test** texts that only report (the Wikipedia test split, the six tragedies, the
code test split). Calibrations: ``wiki`` (the Wikipedia calib split), ``self`` (the model's own
text) and ``mix`` (half and half). Each has its own cache folder
(``CACHE/bench/MODEL-travel-CALIB``), so two processes can run at once.

``--report`` reads every cached cell and prints:

- the gap table: each candidate's perplexity gap to dense, ``ppl - dense``, as a fraction of
  today's default's gap (default allocation + Wanda, Wikipedia calibration), per model, sparsity
  and text; the issue's target is 0.5 or less everywhere at 0.6 and 0.7;
- its cost: score + calibration (self-generation) + prune seconds, as a ratio to uniform
  SparseGPT's prune on Wikipedia at the same model and sparsity; the budget (1.0) holds a
  candidate's median ratio over the sparsities on each model;
- the choice made on validation text alone: the candidate with the lowest mean log gap ratio
  among those within the cost budget, and the same choice with one domain or one model left
  out, scored on what was left out;
- the same choices with the budget judged by the side-by-side costs of ``bench.stage_cost`` at
  the largest calibration size measured for each model (``prune`` itself calibrates on far more
  than these cells, and the scoring's share of the time shrinks as the prune grows).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ecoflap_cli.bench.models import DEFAULT_SPARSEGPT, DEFAULT_WANDA, MODELS, SIZES, model_config

#: calibration name -> --calib spec (WIKI: the Wikipedia calib split)
CALIBS = {"wiki": "WIKI", "self": "self", "mix": "WIKI:0.5,self:0.5"}
VALID = ("valid", "shakespeare_valid", "code_valid")
TEST = ("test", "shakespeare", "code")
#: the texts a run measures beside its main one (the Wikipedia valid split), in the runs' order
EXTRA = [t for t in (*VALID, *TEST) if t != "valid"]
#: methods run by default for every calibration (names as in the sweep)
METHODS = [DEFAULT_WANDA, DEFAULT_SPARSEGPT, "uniform:wanda", "uniform:sparsegpt"]
SPARSITIES = [0.6, 0.7]
#: today's default, the reference of every gap ratio, and the cost reference
BASELINE = ("wiki", DEFAULT_WANDA)
COST_REFERENCE = ("wiki", "uniform:sparsegpt")
#: the sweep's timings of building the calibration data (pruning, scoring)
DATA_TIMES = ("calib_s", "score_calib_s")
#: the issue's budget: no more than uniform SparseGPT's prune time
BUDGET = 1.0


def folder(model: str, calib: str) -> Path:
    from ecoflap_cli.data import assets

    return assets.cache_dir() / "bench" / f"{model}-travel-{calib}"


def config(model: str, calib: str, methods: list[str], sparsities: list[float], log: Any = None, **sizes: Any) -> Any:
    """The study's sweep configuration; ``sizes`` (``samples``, ``seqlen``) replace the benchmark
    sizes of the pruning calibration (``bench.stage_cost`` at ``prune``'s size)."""
    from ecoflap_cli.data import assets

    spec = CALIBS[calib].replace("WIKI", str(assets.wikipedia_splits()["calib"]))
    data = {"samples": SIZES[model]["samples"], "seqlen": 512, **{k: v for k, v in sizes.items() if v is not None}}
    return model_config(
        model,
        methods,
        sparsities,
        "valid",
        extra_texts=EXTRA,
        output=str(folder(model, calib)),
        eval_windows=SIZES[model]["valid_windows"],
        threads=1,
        calib=spec,
        log=log,
        **data,
    )


# --- reading the cells --------------------------------------------------------------------------


def cells(model: str) -> dict[tuple[str, str, float], dict[str, Any]]:
    """Every cached run of a model: (calibration, method, sparsity) -> {text: ppl, "cost_s": s}."""
    out: dict[tuple[str, str, float], dict[str, Any]] = {}
    names = ("valid", *EXTRA)
    for calib in CALIBS:
        runs = folder(model, calib) / "runs"
        records = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))] if runs.is_dir() else []
        records = [r for r in records if "error" not in r and "ppl" in r]
        # building the calibration data (self-generation) is timed in the process that built it; a
        # run whose process reused cached scores did not build the scoring data, and is charged
        # the folder's time for it (every run of a folder uses the same data)
        data_s = {k: max(((r.get("times") or {}).get(k, 0.0) for r in records), default=0.0) for k in DATA_TIMES}
        for record in records:
            ppl = [record["ppl"], *(record.get("ppl_extra") or {}).values()]
            cell: dict[str, Any] = dict(zip(names, ppl))
            times = record.get("times") or {}
            if record["method"] != "dense":
                prune = statistics.median(times.get("prune_s") or [math.nan])
                cell["prune_s"] = prune
                scored = record.get("scoring") is not None  # uniform allocations need no scores
                data = times.get("calib_s", data_s["calib_s"])
                data += times.get("score_calib_s", data_s["score_calib_s"]) if scored else 0.0
                cell["cost_s"] = prune + data + (times.get("score_s") or 0.0)
            out[(calib, record["method"], record["sparsity"])] = cell
    return out


def gap_ratios(model: str, table: dict[tuple[str, str, float], dict[str, Any]]) -> dict[Any, dict[str, float]]:
    """(calibration, method, sparsity) -> {text: gap / today's default's gap, "cost": x uniform SparseGPT}."""
    dense = next((c for (cal, m, _), c in table.items() if m == "dense"), None)
    if dense is None:
        return {}
    out = {}
    for (calib, method, sparsity), cell in table.items():
        base = table.get((*BASELINE, sparsity))
        ref = table.get((*COST_REFERENCE, sparsity))
        if method == "dense" or base is None:
            continue
        ratios = {t: (cell[t] - dense[t]) / (base[t] - dense[t]) for t in (*VALID, *TEST) if t in cell and t in base}
        ratios["cost"] = cell["cost_s"] / ref["prune_s"] if ref else math.nan
        out[(calib, method, sparsity)] = ratios
    return out


def canonical(method: str) -> str:
    """A sweep method with its settings in sorted order (as the runs record them)."""
    head, _, settings = method.partition("@")
    return f"{head}@{','.join(sorted(settings.split(',')))}" if settings else head


def prune_size_costs(model: str) -> tuple[str, dict[str, float]] | None:
    """The side-by-side costs (``bench.stage_cost``) at the largest pruning calibration measured
    for ``model`` with 128-token scoring samples (the cells' and ``prune``'s one-shot default):
    (its size, method -> median per-repeat ratio to uniform SparseGPT), Wikipedia calibration;
    None when nothing was measured beyond the benchmark size."""
    import re

    pattern = re.compile(rf"{re.escape(model)}-stage-cost-(\d+)x(\d+)(?:-score(\d+))?\.json$")
    found = []
    for path in folder(model, "wiki").parent.glob(f"{model}-stage-cost-*.json"):
        match = pattern.match(path.name)
        if match:
            samples, seqlen, score = (int(g) if g else 128 for g in match.groups())
            if score == 128:  # the cells' scoring length (and prune's one-shot default)
                found.append((samples * seqlen, path))
    if not found:
        return None
    _, path = max(found)
    entries = [e for e in json.loads(path.read_text()) if e.get("model") == model]
    ref = {(e["repeat"], e["sparsity"]): e["total_s"] for e in entries if e["method"] == COST_REFERENCE[1]}
    ratios: dict[str, list[float]] = {}
    for e in entries:
        if (e["repeat"], e["sparsity"]) in ref:
            ratios.setdefault(canonical(e["method"]), []).append(e["total_s"] / ref[(e["repeat"], e["sparsity"])])
    size = path.name.removeprefix(f"{model}-stage-cost-").removesuffix(".json")
    return size, {m: statistics.median(v) for m, v in ratios.items()}


def model_cost(
    ratios: dict[Any, dict[str, float]], cand: tuple[str, str], measured: dict[str, float] | None = None
) -> float:
    """A candidate's cost on one model: its side-by-side ratio near ``prune``'s size where
    ``measured`` has it (Wikipedia calibration), else the median over the sparsities of its cost
    ratio (single timings on a shared machine move by tens of percent; the budget judges the
    typical run)."""
    if measured and cand[0] == "wiki" and canonical(cand[1]) in measured:
        return measured[canonical(cand[1])]
    values = [ratios[(*cand, p)]["cost"] for p in SPARSITIES if (*cand, p) in ratios]
    return statistics.median(values) if values else math.nan


def _mean_log(values: list[float]) -> float:
    return statistics.fmean(math.log(max(v, 1e-9)) for v in values) if values else math.inf


def choose(
    ratios: dict[str, dict[Any, dict[str, float]]],
    models: list[str],
    texts: tuple[str, ...],
    budget: float = BUDGET,
    measured: dict[str, dict[str, float]] | None = None,
) -> tuple[Any, float] | None:
    """The candidate with the lowest mean log gap ratio over ``models`` x 0.6/0.7 x ``texts``, among
    those measured in every such cell and within the cost budget on every model (today's default
    is always eligible: the budget is for a new default, and it is the status quo). ``measured``
    (model -> method -> ratio) judges the budget by side-by-side costs where it has them."""
    candidates = set.intersection(*(set((c, m) for c, m, _ in ratios[x]) for x in models)) if models else set()
    best = None
    for cand in sorted(candidates):
        rows = [ratios[x].get((*cand, p)) for x in models for p in SPARSITIES]
        if any(r is None or any(t not in r for t in texts) for r in rows):
            continue
        if cand != BASELINE and any(
            not (model_cost(ratios[x], cand, (measured or {}).get(x)) <= budget) for x in models
        ):
            continue
        score = _mean_log([r[t] for r in rows if r is not None for t in texts])
        if best is None or score < best[1]:
            best = (cand, score)
    return best


# --- the report -------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def report(models: list[str]) -> str:
    tables = {m: cells(m) for m in models}
    ratios = {m: gap_ratios(m, tables[m]) for m in models}
    lines = []
    for model in models:
        dense = next((c for (_, m, _), c in tables[model].items() if m == "dense"), {})
        lines += [
            f"**{MODELS[model][0]}** (dense: " + ", ".join(f"{t} {_fmt(dense.get(t))}" for t in (*VALID, *TEST)) + ")",
            "",
            "| calibration | method | sparsity | "
            + " | ".join(f"{t} ppl (gap ratio)" for t in (*VALID, *TEST))
            + " | cost / uniform SparseGPT |",
            "|---|---|---:|" + "---:|" * (len(VALID) + len(TEST) + 1),
        ]
        for key in sorted(ratios[model], key=lambda k: (k[2], k[0] != "wiki", k[0], k[1])):
            cell, r = tables[model][key], ratios[model][key]
            texts = [f"{_fmt(cell.get(t))} ({_fmt(r.get(t))})" for t in (*VALID, *TEST)]
            lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | " + " | ".join(texts) + f" | {_fmt(r['cost'])} |")
        lines.append("")
    lines += ["Choice on validation text (mean log gap ratio; below 0 beats today's default):", ""]
    if all(ratios[m] for m in models):
        lines += _choices(ratios, models, None)
        lines.append(f"- all validation cells, at any cost: {_describe(choose(ratios, models, VALID, math.inf))}")
        for model in models if len(models) > 1 else []:
            lines.append(f"- {model} alone, at any cost: {_describe(choose(ratios, [model], VALID, math.inf))}")
        sizes = {m: prune_size_costs(m) for m in models}
        measured = {m: found[1] for m, found in sizes.items() if found is not None}
        if measured:
            where = ", ".join(f"{m} {found[0]}" for m, found in sizes.items() if found is not None)
            lines += [
                "",
                f"The same choice with the budget judged side by side near prune's size (bench.stage_cost: {where}; "
                "Wikipedia calibration; the other cells keep their own cost):",
                "",
                *(f"  - {m}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.items())) for m, c in measured.items()),
                *_choices(ratios, models, measured),
            ]
    lines += ["", "The target on the test texts: the lowest gap ratio any candidate reached (at any cost):", ""]
    for model in models:
        for p in SPARSITIES:
            best = []
            for t in TEST:
                found = [(r[t], m, c) for (c, m, q), r in ratios[model].items() if q == p and t in r]
                if found:
                    value, method, calib = min(found)
                    best.append(f"{t} {value:.2f} ({method}, {calib})")
            lines.append(f"- {model} {p:g}: " + "; ".join(best))
    return "\n".join(lines)


def _choices(ratios: dict[str, Any], models: list[str], measured: dict[str, dict[str, float]] | None) -> list[str]:
    """The choice within the budget over every validation cell, then with each domain and each
    model left out in turn (scored on what was left out)."""
    lines = [f"- all validation cells: {_describe(choose(ratios, models, VALID, measured=measured))}"]
    for left in VALID:
        kept = tuple(t for t in VALID if t != left)
        pick = choose(ratios, models, kept, measured=measured)
        lines.append(
            f"- without {left}: {_describe(pick)}; on {left}: {_fmt(_held_out(ratios, models, pick, (left,)))}"
        )
    for left in models if len(models) > 1 else []:
        pick = choose(ratios, [m for m in models if m != left], VALID, measured=measured)
        lines.append(f"- without {left}: {_describe(pick)}; on {left}: {_fmt(_held_out(ratios, [left], pick, VALID))}")
    return lines


def _describe(picked: tuple[Any, float] | None) -> str:
    if picked is None:
        return "no candidate measured everywhere within the budget"
    (calib, method), score = picked
    return f"{method} with {calib} calibration (mean log ratio {score:.3f}, geometric mean {math.exp(score):.2f})"


def _held_out(ratios: dict[str, Any], models: list[str], picked: Any, texts: tuple[str, ...]) -> float | None:
    if picked is None:
        return None
    rows = [ratios[m].get((*picked[0], p)) for m in models for p in SPARSITIES]
    values = [r[t] for r in rows if r is not None for t in texts if t in r]
    return math.exp(_mean_log(values)) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), action="append")
    parser.add_argument("--calib", choices=tuple(CALIBS), default="wiki")
    parser.add_argument("--method", action="append", help="a sweep method (repeat; default: " + ", ".join(METHODS))
    parser.add_argument("-s", "--sparsity", type=float, action="append", help="repeat (default 0.6 and 0.7)")
    parser.add_argument("--report", action="store_true", help="print the cached cells and the choice, and stop")
    args = parser.parse_args(argv)
    models = args.model or list(MODELS)
    if args.report:
        print(report(models))
        return 0

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    from ecoflap_cli.bench.sweep_report import runner

    names = {"DEFAULT_WANDA": DEFAULT_WANDA, "DEFAULT_SPARSEGPT": DEFAULT_SPARSEGPT}
    methods = [names.get(m, m) for m in args.method or METHODS]
    for model in models:
        cfg = config(model, args.calib, methods, args.sparsity or SPARSITIES, log)
        runner(cfg, log).run_pass(cfg.specs(), 0)
    print(report(models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
