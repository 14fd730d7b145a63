"""Model cards: the README.md in every checkpoint ecoflap writes.

The card is rendered from the checkpoint's own documents (``ecoflap_report.json``, ``plan.json``,
``scores.json``) and from the evaluation results that ``ecoflap eval CKPT -o CKPT/NAME.json``
wrote into the directory: Hugging Face front matter (``base_model`` when the base is a hub id,
``tags``, ``library_name`` for dense weights), sparsity overall, per tower and per block, how the
plan was made (scores, allocator, solver, calibration), how to load the weights, and the measured
quality. The base model's own card is never copied: nothing in it describes the pruned weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ecoflap_cli.files import write_atomic
from ecoflap_cli.io.layout import is_eval_results

CARD_NAME = "README.md"
REPORT_NAME = "ecoflap_report.json"
PLAN_NAME = "plan.json"
SCORES_NAME = "scores.json"
TAGS = ("pruned", "sparse", "ecoflap")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DOCUMENTS = (REPORT_NAME, PLAN_NAME, SCORES_NAME)

Doc = Mapping[str, Any]


def hub_id(source: str | None) -> str | None:
    """``source`` when it names a hub repository (``owner/name``, not a local path or file)."""
    if not source or not _HUB_ID.match(source) or source.endswith((".gguf", ".json")):
        return None
    return None if Path(source).exists() else source


#: characters that make markdown out of plain text (and ``|``, which ends a table cell)
_MARKDOWN = re.compile(r"([\\`*\[\]<>|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def _line(value: Any) -> str:
    """One line: newlines, tabs and other control characters become single spaces."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in str(value)).split())


def _md(value: Any) -> str:
    """A user string as plain markdown text on one line: markdown characters escaped."""
    return _MARKDOWN.sub(lambda m: "\\" + m[0], _line(value))


def _code(value: Any) -> str:
    """A user string as inline code on one line (no backtick can close it; ``|`` escaped, which
    GitHub's tables need even inside code)."""
    return "`" + _line(value).replace("`", "'").replace("|", "\\|") + "`"


def display_source(value: Any, digest: str | None = None) -> str:
    """How a card names a model or data source: a hub id (or ``hub:NAME``) as it is; a local path
    by its base name only (never the absolute path of the machine that ran it), with its sha256
    when known."""
    text = _line(value)
    if not text:
        return "unknown"
    if hub_id(text.removeprefix("hub:")) or (text.startswith("hub:") and "/" not in text[4:].strip("/")):
        return text
    if "/" in text or "\\" in text or text.startswith("~") or Path(text).exists():
        text = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "unknown"
    return f"{text} (sha256 {digest})" if digest else text


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _pct(value: float | None) -> str:
    number = _number(value)
    return "-" if number is None else f"{100.0 * number:.2f}%"


def _settings(record: Mapping[str, Any] | None, skip: tuple[str, ...] = ("name",)) -> str:
    items = [f"{_md(k)}={_md(v)}" for k, v in (record or {}).items() if k not in skip and v is not None]
    return ", ".join(items) if items else "defaults"


# --- sparsity ---------------------------------------------------------------------------------


def block_rows(report: Doc, plan: Doc | None) -> list[dict[str, Any]]:
    """Per block: params, zeros and sparsity counted in the report's tensors (the weights
    written), with the plan's sparsity beside them. Without a plan, one row per tower."""
    tensors = {t["name"]: t for t in report.get("tensors", [])}
    rows = []
    groups = (plan or {}).get("groups") or []
    for g in groups:
        mine = [tensors[t["name"]] for t in g["tensors"] if t["name"] in tensors]
        params = sum(int(t["numel"]) for t in mine)
        zeros = sum(int(t["zeros"]) for t in mine)
        if params:
            rows.append(
                {
                    "name": g["name"],
                    "tower": g["tower"],
                    "params": params,
                    "zeros": zeros,
                    "sparsity": zeros / params,
                    "planned": g.get("sparsity"),
                }
            )
    return rows


def tower_rows(report: Doc) -> list[dict[str, Any]]:
    towers: dict[str, dict[str, Any]] = {}
    for t in report.get("tensors", []):
        row = towers.setdefault(t["tower"], {"tower": t["tower"], "params": 0, "zeros": 0})
        row["params"] += int(t["numel"])
        row["zeros"] += int(t["zeros"])
    for row in towers.values():
        row["sparsity"] = row["zeros"] / row["params"] if row["params"] else 0.0
    return list(towers.values())


def _sparsity_section(report: Doc, plan: Doc | None) -> list[str]:
    params = sum(int(t["numel"]) for t in report.get("tensors", []))
    zeros = sum(int(t["zeros"]) for t in report.get("tensors", []))
    lines = [
        "## Sparsity",
        "",
        f"Overall: **{_pct(report.get('achieved_sparsity'))}** of the {params:,} weights of the pruned linear layers "
        f"are zero ({zeros:,} zeros; target {_pct(report.get('target_sparsity'))}). Embeddings, norms, biases and "
        "heads stay dense, as the plan says.",
        "",
        "| tower | params | zeros | sparsity |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {_md(r['tower'])} | {r['params']} | {r['zeros']} | {_pct(r['sparsity'])} |" for r in tower_rows(report)
    ]
    rows = block_rows(report, plan)
    if rows:
        lines += ["", "Per block (zeros counted in the weights written; planned: the plan's sparsity):", ""]
        lines += ["| block | tower | params | zeros | sparsity | planned |", "|---|---|---:|---:|---:|---:|"]
        lines += [
            f"| {_md(r['name'])} | {_md(r['tower'])} | {r['params']} | {r['zeros']} | {_pct(r['sparsity'])} | "
            f"{_pct(r['planned'])} |"
            for r in rows
        ]
    return lines


# --- provenance -------------------------------------------------------------------------------


def _calibration(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "none (the solver reads no calibration data)"
    parts = [_code(display_source(record.get("source"), record.get("sha256")))]
    for key, label in (("samples", "samples"), ("seqlen", "tokens per sample"), ("tokens", "tokens in all")):
        if record.get(key) is not None:
            parts.append(f"{_md(record[key])} {label}")
    if record.get("seed") is not None:
        parts.append(f"seed {_md(record['seed'])}")
    return ", ".join(parts)


def _method_section(report: Doc, plan: Doc | None, scores: Doc | None) -> list[str]:
    allocator = dict((plan or {}).get("allocator") or {})
    score_method = (scores or {}).get("method") or (plan or {}).get("score_method") or {}
    # settings only: a search's fitness history, memory and the like stay in scores.json
    score_method = {k: v for k, v in score_method.items() if not isinstance(v, (dict, list))}
    solver = report.get("solver")
    solver_line = f"{_md(solver)} ({_settings(report.get('solver_settings'), ())})"
    if report.get("nm"):
        solver_line += f", {report['nm'][0]}:{report['nm'][1]} structured"
    if report.get("compare_groups"):
        solver_line += f", comparison groups {_settings(report['compare_groups'], ())}"
    lines = [
        "## How it was pruned",
        "",
        f"- Scores (coarse stage): {_md(score_method.get('name', 'unknown'))} ({_settings(score_method)})",
        f"- Allocator: {_md(allocator.get('name', 'unknown'))} ({_settings(allocator, ('name', 'chosen'))})"
        + (f"; {_md(allocator['chosen'])}" if allocator.get("chosen") else ""),
        f"- Solver (fine stage): {solver_line}",
        f"- Calibration for the solver: {_calibration(report.get('calibration'))}",
    ]
    if scores is not None and scores.get("calibration"):
        lines.append(f"- Calibration for the scores: {_calibration(scores['calibration'])}")
    versions = report.get("versions") or {}
    if versions:
        lines.append("- Versions: " + ", ".join(f"{_md(k)} {_md(v)}" for k, v in versions.items()))
    lines.append(
        "- Documents: `ecoflap_report.json` (per tensor), `plan.json`"
        + (", `scores.json`" if scores is not None else "")
        + " (`ecoflap inspect DIR` summarises them)"
    )
    return lines


def _loading_section(layout: str, model_info: Mapping[str, Any], name: str) -> list[str]:
    cls = model_info.get("class") or "AutoModel"
    if layout == "packed":
        return [
            "## How to load",
            "",
            "The weights are **packed** (bitmask or N:M values, docs/packed-format.md in ecoflap): transformers' "
            "`from_pretrained` cannot read them. Load them with ecoflap (`pip install ecoflap`):",
            "",
            "```python",
            "from ecoflap_cli.api import load_pruned",
            "",
            f'model = load_pruned("{name}")  # a {cls}, its zeros in place',
            "```",
            "",
            f"or write a plain transformers copy: `ecoflap convert {name} --to dense -o {name}-dense`.",
        ]
    return [
        "## How to load",
        "",
        "Dense safetensors (the zeros are stored, so the files have the base model's size): plain transformers "
        "loads them.",
        "",
        "```python",
        f"from transformers import AutoProcessor, AutoTokenizer, {cls}",
        "",
        f'model = {cls}.from_pretrained("{name}")',
        "```",
        "",
        f"`ecoflap convert {name} --to packed -o {name}-packed` writes a smaller packed copy.",
    ]


# --- quality ----------------------------------------------------------------------------------


def _metric_rows(results: Doc) -> list[tuple[str, Any, Any]]:
    rows: list[tuple[str, Any, Any]] = []
    ppl = results.get("perplexity")
    if isinstance(ppl, dict) and "pruned" in ppl:
        label = (
            f"perplexity on {_code(display_source(ppl.get('text'), ppl.get('text_sha256')))} "
            f"({_md(ppl.get('windows'))} x {_md(ppl.get('seqlen'))} tokens)"
        )
        rows.append((label, ppl.get("pruned"), ppl.get("dense")))
    lm_eval = results.get("lm_eval")
    lm_tasks = lm_eval.get("tasks") if isinstance(lm_eval, dict) else None
    sections = (("", results.get("tasks") or {}), ("lm-eval ", lm_tasks or {}))
    for prefix, tasks in sections:
        for task, entry in tasks.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("pruned"), dict):
                continue
            dense = entry.get("dense")
            dense = dense if isinstance(dense, dict) else {}
            for metric, value in entry["pruned"].items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if numeric and metric != "time_s" and not metric.startswith("n_"):
                    rows.append((f"{prefix}{_md(task)} {_md(metric)}", value, dense.get(metric)))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _md(value)
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _quality_section(evaluations: list[tuple[str, Doc]], name: str) -> list[str]:
    lines = ["## Quality", ""]
    if not evaluations:
        return lines + [
            "Not measured yet. `ecoflap eval " + name + " --text FILE --compare BASE -o " + name + "/eval.json` "
            "writes its results into this directory and fills in this section.",
        ]
    for file, results in evaluations:
        dense_model = results.get("dense_model")
        lines += [
            f"Measured by `ecoflap eval` ({_code(file)}; achieved sparsity {_pct(results['summary'].get('achieved'))}"
            + (f"; dense: {_code(display_source(dense_model))}" if dense_model else "")
            + "):",
            "",
            "| metric | pruned | dense |",
            "|---|---:|---:|",
        ]
        rows = _metric_rows(results)
        lines += [f"| {label} | {_fmt(p)} | {_fmt(d)} |" for label, p, d in rows] or ["| (sparsity only) | - | - |"]
        lines.append("")
    return lines[:-1]


# --- the card ---------------------------------------------------------------------------------


def render_card(
    documents: Mapping[str, Doc],
    layout: str,
    name: str,
    evaluations: list[tuple[str, Doc]] | None = None,
) -> str:
    """The README.md of a checkpoint directory named ``name`` holding ``documents``, with weights
    in ``layout`` (dense or packed), and the eval results found in it."""
    report = documents.get(REPORT_NAME) or {}
    plan = documents.get(PLAN_NAME)
    scores = documents.get(SCORES_NAME)
    model_info = dict(report.get("model") or (plan or {}).get("model") or {})
    source = model_info.get("id")
    base = hub_id(source)
    front = ["---"]
    if base:
        front.append(f"base_model: {base}")
    if layout == "dense":
        front.append("library_name: transformers")
    front += ["tags:", *(f"- {t}" for t in TAGS), "---", ""]
    shown = display_source(source) if source else _line(name)
    title = f"# {_md(shown)}, pruned to {_pct(_number(report.get('achieved_sparsity')))} sparsity"
    intro = (
        f"{('[`' + base + '`](https://huggingface.co/' + base + ')') if base else _code(shown)}"
        f" ({_md(model_info.get('class') or 'model')}) pruned with ecoflap {_md(report.get('ecoflap_version', ''))} "
        "(ECoFLaP: coarse-to-fine layer-wise pruning, Sung et al., ICLR 2024). "
        f"Weights: {layout} safetensors."
    )
    body = [title, "", intro, ""]
    body += _sparsity_section(report, plan) + [""]
    body += _method_section(report, plan, scores) + [""]
    body += _loading_section(layout, model_info, name) + [""]
    body += _quality_section(evaluations or [], name)
    return "\n".join(front + body).rstrip() + "\n"


def read_documents(directory: str | Path) -> dict[str, dict[str, Any]]:
    """The ecoflap documents present in a checkpoint directory (unreadable ones are skipped)."""
    docs = {}
    for file in _DOCUMENTS:
        path = Path(directory) / file
        try:
            doc = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict):
            docs[file] = doc
    return docs


#: the checkpoint's checksums file (``io.layout.CHECKSUMS_NAME``): weights, config, tokenizer
CHECKSUMS_FILE = "ecoflap_checksums.json"
#: the key of an eval results document naming the checkpoint it measured (:func:`checkpoint_identity`)
IDENTITY_KEY = "checkpoint_checksums"


def checkpoint_identity(directory: str | Path) -> str | None:
    """The sha256 of a checkpoint's checksums file, which records the sha256 of its weights,
    config and tokenizer: equal identities, equal model. None for no local checkpoint with one."""
    path = Path(directory) / CHECKSUMS_FILE
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    except OSError:
        return None


def evaluations_in(directory: str | Path) -> list[tuple[str, Doc]]:
    """``(file name, results)`` of every ``ecoflap eval`` output in the directory, by name, that
    measured this very checkpoint: its recorded :func:`checkpoint_identity` is the directory's
    (results copied from another checkpoint, or made before its weights or config changed, are
    left out of the card)."""
    identity = checkpoint_identity(directory)
    found: list[tuple[str, Doc]] = []
    for path in sorted(Path(directory).glob("*.json")):
        if path.name in _DOCUMENTS or path.name.startswith("."):
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if is_eval_results(doc) and identity is not None and doc.get(IDENTITY_KEY) == identity:
            found.append((path.name, doc))
    return found


def write_card(directory: str | Path, layout: str, name: str | None = None) -> Path | None:
    """Render and write (atomically) the card of a checkpoint directory from its own files;
    None, and nothing written, when the directory holds no ecoflap report."""
    directory = Path(directory)
    documents = read_documents(directory)
    if REPORT_NAME not in documents:
        return None
    card = render_card(documents, layout, name or directory.name, evaluations_in(directory))
    target = directory / CARD_NAME
    write_atomic(target, card.encode())
    return target


def refresh_after_eval(checkpoint: str, output: str) -> Path | None:
    """After ``ecoflap eval CHECKPOINT -o OUTPUT``: when OUTPUT lies in the checkpoint directory
    and that directory is an ecoflap checkpoint, rewrite its card with the new results."""
    if output == "-":
        return None
    directory = Path(checkpoint)
    if not directory.is_dir() or Path(output).resolve().parent != directory.resolve():
        return None
    from ecoflap_cli.io.layout import checkpoint_layout

    layout = checkpoint_layout(directory)
    return None if layout is None else write_card(directory, layout)
