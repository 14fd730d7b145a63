"""Rich tables for plans and evaluation results (always on stderr)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

BAR_WIDTH = 20


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "·" * (width - filled)


def _fmt_score(score: Any) -> str:
    return "-" if score is None else f"{score:.4g}"


def render_plan(console: Console, plan: dict[str, Any]) -> None:
    """One row per block (tower, parameters, score, sparsity, bar), then the per-tower budget."""
    alloc = plan["allocator"]
    title = (
        f"plan: {alloc['name']} allocator, target {plan['target_sparsity']:.4f}, "
        f"achieved {plan['achieved_sparsity']:.6f}"
    )
    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("block", "left"),
        ("tower", "left"),
        ("params", "right"),
        ("score", "right"),
        ("sparsity", "right"),
        ("", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for g in plan["groups"]:
        table.add_row(
            g["name"],
            g["tower"],
            f"{g['params']:,}",
            _fmt_score(g["score"]),
            f"{g['sparsity']:.4f}",
            bar(g["sparsity"]),
        )
    console.print(table)
    towers = Table(title="budget per tower", title_justify="left")
    for col in ("tower", "params", "pruned", "sparsity"):
        towers.add_column(col, justify="left" if col == "tower" else "right")
    for name, t in plan["towers"].items():
        towers.add_row(name, f"{int(t['params']):,}", f"{int(t['zeros']):,}", f"{t['sparsity']:.4f}")
    console.print(towers)
    if alloc.get("chosen"):
        console.print(f"allocator {alloc['name']}, chosen by {alloc['chosen']}", highlight=False, markup=False)


def render_sparsity(console: Console, results: dict[str, Any], per_tensor: bool = False) -> None:
    """Achieved against planned sparsity per block (or tensor), and perplexities if measured."""
    rows = results["tensors"] if per_tensor else results["blocks"]
    method = results.get("pruning")
    if method:
        console.print(f"pruned with: {describe_pruning(method)}", highlight=False)
    table = Table(title=f"sparsity of {results['checkpoint']}", title_justify="left")
    for col in ("name", "tower", "params", "planned", "achieved", "", "ok"):
        table.add_column(col, justify="left" if col in ("name", "tower", "") else "right")
    for r in rows:
        planned = "-" if r["planned"] is None else f"{r['planned']:.4f}"
        ok = {True: "[green]yes[/]", False: "[red]NO[/]", None: "-"}[r["matches_plan"]]
        table.add_row(
            r["name"], r["tower"], f"{r['params']:,}", planned, f"{r['achieved']:.4f}", bar(r["achieved"]), ok
        )
    console.print(table)
    summary = results["summary"]
    console.print(
        f"global sparsity of prunable tensors: {summary['achieved']:.6f}"
        + ("" if summary["planned"] is None else f" (planned {summary['planned']:.6f})")
    )
    ppl = results.get("perplexity")
    if ppl:
        ptable = Table(title=f"perplexity ({ppl['windows']} x {ppl['seqlen']} tokens)", title_justify="left")
        for col in ("model", "sparsity", "perplexity"):
            ptable.add_column(col, justify="left" if col == "model" else "right")
        if ppl.get("dense") is not None:
            ptable.add_row(f"dense: {ppl['dense_model']}", "0", f"{ppl['dense']:.3f}")
        ptable.add_row(
            f"{model_label(results)}: {results['checkpoint']}", f"{summary['achieved']:.4f}", f"{ppl['pruned']:.3f}"
        )
        console.print(ptable)


def describe_pruning(method: dict[str, Any]) -> str:
    """``wanda (2:4) + sublayer reconstruction (steps=16, lr=0.0001, ...)`` from a report's method."""
    settings = ", ".join(f"{k}={v}" for k, v in (method.get("solver_settings") or {}).items())
    text = f"{method.get('solver')}" + (f" ({settings})" if settings else "")
    if method.get("nm"):
        text += f" {method['nm'][0]}:{method['nm'][1]}"
    recon = method.get("reconstruction")
    if recon:
        rest = ", ".join(f"{k}={v}" for k, v in recon.items() if k != "name")
        text += f" + {recon['name']} reconstruction ({rest})"
    return text


def _fmt_fraction(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_bytes(size: float) -> str:
    if size < 1000:
        return f"{int(size)} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def _settings(doc: dict[str, Any]) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in doc.items() if k != "name" and v is not None)
    return f"{doc.get('name')}" + (f" ({rest})" if rest else "")


def render_inspect(console: Console, summary: dict[str, Any]) -> None:
    """What an artifact is, then one row per block and one per tower (sparsity with a bar)."""
    art, model = summary["artifact"], summary["model"]
    version = "" if art["version"] is None else f" v{art['version']}"
    console.print(
        f"[bold]{summary['kind']}[/] {escape(str(summary['source']))}: {art['format']}{version}", highlight=False
    )
    console.print(
        f"model: {model.get('id') or '-'} (type {model.get('model_type') or '-'}, "
        f"fingerprint {model.get('fingerprint') or '-'})",
        highlight=False,
        markup=False,
    )
    made = [
        f"{what}: {_settings(summary[key])}"
        for what, key in (("scores", "method"), ("allocator", "allocator"))
        if summary[key]
    ]
    if made:
        console.print("; ".join(made), highlight=False, markup=False)
    if summary["target_sparsity"] is not None or summary["achieved_sparsity"] is not None:
        label = "planned" if summary["kind"] == "plan" else "achieved"
        console.print(
            f"sparsity: target {_fmt_fraction(summary['target_sparsity'])}, "
            f"{label} {_fmt_fraction(summary['achieved_sparsity'], 6)}",
            highlight=False,
        )
    storage = summary.get("storage")
    if storage:
        layouts = ", ".join(f"{n} {k}" for k, n in storage["packed_tensors"].items()) or "none packed"
        console.print(
            f"weights: {storage['layout']}, {len(storage['files'])} file(s), "
            f"{_fmt_bytes(storage['bytes'])} ({layouts})",
            highlight=False,
        )
    console.print(_inspect_table("blocks", "block", summary["blocks"], ("score",)))
    console.print(_inspect_table("towers", "tower", summary["towers"], ("blocks",)))


def _inspect_table(title: str, first: str, rows: list[dict[str, Any]], extra: tuple[str, ...]) -> Table:
    """Name, (tower,) params, extra columns, then planned / achieved sparsity where any row has them."""
    fractions = [k for k in ("planned", "achieved") if any(r[k] is not None for r in rows)]
    columns = [first, *(["tower"] if first == "block" else []), "params", *extra, *fractions]
    table = Table(title=title, title_justify="left")
    for col in columns + [""] * bool(fractions):
        table.add_column(col, justify="left" if col in (first, "tower", "") else "right")
    for r in rows:
        cells = {
            "tower": r.get("tower"),
            "params": f"{r['params']:,}",
            "score": _fmt_score(r.get("score")),
            "blocks": str(r.get("blocks")),
            "planned": _fmt_fraction(r["planned"]),
            "achieved": _fmt_fraction(r["achieved"]),
            first: r["name"],
        }
        shown = [r[k] for k in fractions if r[k] is not None]
        table.add_row(*(cells[c] for c in columns), *([bar(shown[-1]) if shown else ""] if fractions else []))
    return table


TASK_TITLES = {"zero_shot": "zero-shot", "retrieval": "retrieval", "vqa": "VQA",
               "captioning": "captioning"}  # fmt: skip
METRIC_LABELS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy",
                 "vqa_accuracy": "VQAv2 soft accuracy", "exact_match": "exact match",
                 "cider_d": "CIDEr-D"}  # fmt: skip
_METRIC_ORDER = ["top1", "top5", *(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
                 "vqa_accuracy", "exact_match", "cider_d"]  # fmt: skip
_COUNTS = (("n_images", "images"), ("n_texts", "texts"), ("n_classes", "classes"),
           ("n_questions", "questions"))  # fmt: skip


def _metric_label(key: str) -> str:
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    direction, _, k = key.partition("_r")
    if direction in ("i2t", "t2i") and k.isdigit():
        return f"{'image->text' if direction == 'i2t' else 'text->image'} R@{k}"
    return key


def render_tasks(console: Console, results: dict[str, Any]) -> None:
    """One table of vision-language task metrics (percent): dense, pruned and the difference."""
    tasks = results.get("tasks")
    if not tasks:
        return
    dense_model = results.get("dense_model")
    achieved = results.get("summary", {}).get("achieved")
    label = model_label(results)
    title = "vision-language tasks (percent)"
    if achieved is not None:
        title += f", {'pruned to ' if label == 'pruned' else ''}sparsity {achieved:.4f}"
    table = Table(title=title, title_justify="left")
    columns = [
        "task",
        "data",
        "metric",
        *(["dense"] if dense_model else []),
        label,
        *(["change"] if dense_model else []),
    ]
    for col in columns:
        table.add_column(col, justify="left" if col in ("task", "data", "metric") else "right")
    for name, task in tasks.items():
        pruned, dense = task["pruned"], task.get("dense")
        counts = ", ".join(f"{int(pruned[k])} {word}" for k, word in _COUNTS if k in pruned)
        metrics_ = sorted(
            (k for k, v in pruned.items() if isinstance(v, (int, float)) and not k.startswith("n_") and k != "time_s"),
            key=lambda k: _METRIC_ORDER.index(k) if k in _METRIC_ORDER else len(_METRIC_ORDER),
        )
        for i, key in enumerate(metrics_):
            task_label, data = (TASK_TITLES.get(name, name), counts) if i == 0 else ("", "")
            metric_label = _metric_label(key)
            if key == "cider_d" and task.get("cider_tokenizer"):
                metric_label += f" ({task['cider_tokenizer']} tokens)"
            cells = [task_label, data, metric_label]
            value = None if dense is None else dense.get(key)
            if dense_model:
                cells.append("-" if value is None else f"{value:.2f}")
            cells.append(f"{pruned[key]:.2f}")
            if dense_model:
                cells.append("-" if value is None else f"{pruned[key] - value:+.2f}")
            table.add_row(*cells)
    console.print(table)
    if dense_model:
        console.print(f"dense: {dense_model}; {label}: {results['checkpoint']}", highlight=False, markup=False)


def model_label(results: dict[str, Any]) -> str:
    """What eval's tables call the evaluated model: "pruned" for a checkpoint ecoflap pruned
    (it carries a report or plan), "model" for any other."""
    return "pruned" if results.get("pruned_checkpoint", True) else "model"


def render_lm_eval(console: Console, results: dict[str, Any]) -> None:
    """One table of lm-eval task metrics as lm-eval reports them (accuracies as fractions), with
    their standard errors: dense, pruned and the difference."""
    section = results.get("lm_eval")
    if not section:
        return
    label = model_label(results)
    dense_model = results.get("dense_model")
    title = "lm-eval tasks" + ("" if section.get("limit") is None else f" (at most {section['limit']} documents each)")
    table = Table(title=title, title_justify="left")
    columns = ["task", "docs", "shots", "metric", *(["dense"] if dense_model else []), label]
    for col in columns + (["change"] if dense_model else []):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, task in section["tasks"].items():
        mine, dense = task.get("pruned", {}), task.get("dense")
        keys = [k for k in mine if k not in ("n_samples", "n_shot") and not k.split(" ")[0].endswith("_stderr")]
        for i, key in enumerate(keys):
            first = i == 0
            cells = [name if first else "", str(mine.get("n_samples", "-")) if first else ""]
            cells += [str(mine.get("n_shot", "-")) if first else "", key]
            if dense_model:
                cells.append(_with_stderr(dense, key))
            cells.append(_with_stderr(mine, key))
            if dense_model:
                other = None if dense is None else dense.get(key)
                cells.append("-" if other is None else _number(mine[key] - other, signed=True))
            table.add_row(*cells)
    console.print(table)
    if dense_model:
        console.print(f"dense: {dense_model}; {label}: {results['checkpoint']}", highlight=False, markup=False)


def _number(value: float, signed: bool = False) -> str:
    """Four decimals for fractions and small values, four significant digits for large ones."""
    sign = "+" if signed else ""
    return f"{value:{sign}.4f}" if abs(value) < 1000 else f"{value:{sign}.4g}"


def _with_stderr(metrics: dict[str, Any] | None, key: str) -> str:
    if metrics is None or metrics.get(key) is None:
        return "-"
    metric, _, rest = key.partition(" ")
    stderr = metrics.get(f"{metric}_stderr" + (f" {rest}" if rest else ""))
    text = _number(metrics[key])
    return text if stderr is None or stderr != stderr else f"{text} ± {_number(stderr)}"


def render_sweep(console: Console, summary: dict[str, Any]) -> None:
    """One row per (method, sparsity): perplexity, achieved sparsity and prune time (median)."""
    extra = sorted({k for r in summary["runs"] for k in (r.get("ppl_extra") or {})})
    table = Table(title="ecoflap sweep", title_justify="left")
    for column in ("method", "sparsity", "achieved", "ppl", *(f"ppl {e}" for e in extra), "prune s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    dense = summary.get("dense") or {}
    if dense.get("ppl") is not None:
        extras = [_number(v) for v in (dense.get("ppl_extra") or {}).values()]
        table.add_row("dense", "0", "0", _number(dense["ppl"]), *extras, "-")
    for run in summary["runs"]:
        times = run.get("times") or {}
        if "error" in run:
            table.add_row(escape(run["method"]), f"{run['sparsity']:g}", "-", escape(f"error: {run['error']}"))
            continue
        extras = [_number((run.get("ppl_extra") or {}).get(e, float("nan"))) for e in extra]
        table.add_row(
            escape(run["method"]),
            f"{run['sparsity']:g}",
            _fmt_fraction(run.get("achieved_sparsity")),
            _number(run["ppl"]),
            *extras,
            _number(times.get("prune_median_s") or float("nan")),
        )
    console.print(table)
