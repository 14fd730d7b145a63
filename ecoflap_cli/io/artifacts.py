"""Artifacts on disk: score and plan documents (versioned, validated on read, written atomically).

A score document lists the model's groups (blocks) with their tensors and one score each; a plan
document gives every group and tensor an exact number of weights to prune. Both carry the model's
structural fingerprint so that a plan made for another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ecoflap_cli import __version__
from ecoflap_cli.core import allocation
from ecoflap_cli.errors import ArtifactError, PlanError
from ecoflap_cli.models.base import Block
from ecoflap_cli.core.solvers import split_count

SCORES_FORMAT = "ecoflap.scores"
PLAN_FORMAT = "ecoflap.plan"
VERSION = 1


# --- atomic I/O -------------------------------------------------------------------------------


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename: never a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def emit_json(doc: dict[str, Any], output: str, overwrite: bool = False) -> None:
    """Write a document to a file (atomically) or to stdout when ``output`` is ``-``."""
    text = json.dumps(doc, indent=2) + "\n"
    if output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    if Path(output).exists() and not overwrite:
        raise ArtifactError(f"{output} exists (pass --overwrite to replace it)")
    write_atomic(output, text.encode())


def read_json(source: str) -> dict[str, Any]:
    """Read a JSON document from a path, or from stdin when ``source`` is ``-``."""
    if source == "-":
        text = sys.stdin.read()
        where = "stdin"
    else:
        path = Path(source)
        if path.is_dir():
            for name in ("plan.json", "scores.json"):
                if (path / name).is_file():
                    path = path / name
                    break
        if not path.is_file():
            raise ArtifactError(f"file not found: {source}")
        text = path.read_text(encoding="utf-8", errors="replace")
        where = str(path)
    if not text.strip():
        raise ArtifactError(f"{where} is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{where} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where} is not an ecoflap artifact")
    return doc


def doc_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- scores -----------------------------------------------------------------------------------


def group_records(blocks: Sequence[Block], scores: dict[str, float] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "name": b.name,
            "tower": b.tower,
            "index": b.index,
            "params": b.num_params,
            "tensors": [{"name": f"{p}.weight", "numel": m.weight.numel()} for p, m in b.linears.items()],
            "score": None if scores is None else float(scores[b.name]),
        }
        for b in blocks
    ]


def scores_document(
    model_info: dict[str, Any],
    blocks: Sequence[Block],
    scores: dict[str, float] | None,
    method: dict[str, Any],
    calibration: dict[str, Any] | None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "format": SCORES_FORMAT,
        "version": VERSION,
        "created": _now(),
        "ecoflap_version": __version__,
        "model": model_info,
        "method": method,
        "calibration": calibration,
        "timings": timings or {},
        "groups": group_records(blocks, scores),
    }


def _check_format(doc: dict[str, Any], expected: str, where: str) -> None:
    fmt = doc.get("format")
    if fmt != expected:
        kind = {SCORES_FORMAT: "a scores file", PLAN_FORMAT: "a plan"}.get(str(fmt), f"format {fmt!r}")
        want = {SCORES_FORMAT: "a scores file", PLAN_FORMAT: "a plan"}[expected]
        raise ArtifactError(f"{where} is {kind}, expected {want}")
    if doc.get("version") != VERSION:
        raise ArtifactError(f"{where} has unsupported version {doc.get('version')!r} (this ecoflap reads {VERSION})")


def validate_scores(doc: dict[str, Any], where: str = "scores") -> dict[str, Any]:
    _check_format(doc, SCORES_FORMAT, where)
    groups = doc.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ArtifactError(f"{where} lists no groups")
    for g in groups:
        try:
            ok = isinstance(g["name"], str) and int(g["params"]) > 0 and isinstance(g["tensors"], list)
            ok = ok and sum(int(t["numel"]) for t in g["tensors"]) == int(g["params"])
            score = g["score"]
            ok = ok and (score is None or (isinstance(score, (int, float)) and score >= 0))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ArtifactError(f"{where}: malformed group record {str(g)[:80]}")
    if "fingerprint" not in doc.get("model", {}):
        raise ArtifactError(f"{where} has no model fingerprint")
    return doc


# --- plans ------------------------------------------------------------------------------------


def _allocate(groups: list[dict[str, Any]], allocator: str, target: float, settings: dict[str, Any]) -> list[int]:
    sizes = [int(g["params"]) for g in groups]
    if allocator == "uniform":
        return list(allocation.uniform(sizes, target).keep_counts)
    if allocator == "depth":
        return list(allocation.depth(sizes, target, settings.get("step", 0.01)).keep_counts)
    scores = [g["score"] for g in groups]
    if any(s is None for s in scores):
        raise PlanError(f"allocator {allocator!r} needs scores; this scores file has none (run `ecoflap score`)")
    if allocator == "ecoflap":
        return list(allocation.ecoflap(sizes, scores, target, settings.get("max_sparsity"),
                                       settings.get("temperature", 1.0)).keep_counts)
    if allocator == "rank":
        return list(allocation.rank(sizes, scores, target, settings.get("lam", 0.1)).keep_counts)
    if allocator == "mix":
        return list(allocation.mix(sizes, scores, depth_positions(groups), target, settings.get("lam", 0.15),
                                   settings.get("alpha", 0.5)).keep_counts)
    if allocator == "owl":
        return list(allocation.owl(sizes, scores, target, settings.get("lam", 0.08)).keep_counts)
    raise PlanError(f"unknown allocator {allocator!r} (choose from {', '.join(allocation.ALLOCATORS)})")


#: each allocator's tunable settings and their defaults (recorded in the plan)
ALLOCATOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "ecoflap": {"max_sparsity": None, "temperature": 1.0},
    "depth": {"step": 0.01},
    "owl": {"lam": 0.08},
    "rank": {"lam": 0.1},
    "mix": {"lam": 0.15, "alpha": 0.5},
}


def allocator_settings(allocator: str, max_sparsity: float | None = None, temperature: float = 1.0,
                       depth_step: float = 0.01, lam: float | None = None, alpha: float = 0.5) -> dict[str, Any]:
    """The settings an allocator uses, from command-line style options (others are ignored).

    For ``auto`` every given option is kept; :func:`build_plan` picks the allocator and keeps the
    options that allocator takes.
    """
    given = {"max_sparsity": max_sparsity, "temperature": temperature, "step": depth_step, "lam": lam, "alpha": alpha}
    if allocator == "auto":
        return {k: v for k, v in given.items() if v is not None}
    if allocator not in ALLOCATOR_DEFAULTS:
        raise PlanError(f"unknown allocator {allocator!r} (choose from auto, {', '.join(allocation.ALLOCATORS)})")
    return {k: (given[k] if given[k] is not None else v) for k, v in ALLOCATOR_DEFAULTS[allocator].items()}


def auto_allocator(scores_doc: dict[str, Any]) -> tuple[str, str]:
    """The default allocator for a scores file, and why (recorded in the plan)."""
    if (scores_doc.get("method") or {}).get("name") == "owl":
        return "owl", "the scores are OWL outlier ratios"
    towers = {g["tower"] for g in scores_doc["groups"]}
    if len(towers) == 1:
        return "mix", ("one tower: mix (depth schedule + score rank, lam 0.15, alpha 0.5), the best rule on "
                       "the validation split in docs/allocation.md")
    return "ecoflap", (f"{len(towers)} towers: the paper's rule, which balances towers by score; mix is "
                       "measured on language models only (docs/allocation.md)")


def depth_positions(groups: list[dict[str, Any]]) -> list[float]:
    """Each group's depth within its tower, in [0, 1] (list order within the tower)."""
    towers = [g["tower"] for g in groups]
    counts = {t: towers.count(t) for t in towers}
    seen: dict[str, int] = {}
    positions = []
    for t in towers:
        i = seen.get(t, 0)
        seen[t] = i + 1
        positions.append(i / (counts[t] - 1) if counts[t] > 1 else 0.5)
    return positions


def build_plan(
    scores_doc: dict[str, Any],
    allocator: str,
    target: float,
    settings: dict[str, Any] | None = None,
    per_tower: bool = False,
) -> dict[str, Any]:
    """Allocate a sparsity plan from a score document; exact budget, per tensor zero counts."""
    settings = dict(settings or {})
    reason = None
    if allocator == "auto":
        allocator, reason = auto_allocator(scores_doc)
        if settings.get("max_sparsity") is not None and allocator != "ecoflap":
            raise PlanError(f"--max-sparsity applies to the ecoflap allocator; the default for this model is "
                            f"{allocator}: add --allocator ecoflap")
        settings = {k: (settings[k] if settings.get(k) is not None else v)
                    for k, v in ALLOCATOR_DEFAULTS[allocator].items()}
    if allocator == "ecoflap" and settings.get("max_sparsity") is None:
        settings["max_sparsity"] = round(min(target + 0.1, 1.0), 10)
    if allocator == "owl" and scores_doc.get("method", {}).get("name") != "owl":
        raise PlanError("the owl allocator needs outlier ratios: run `ecoflap score --method owl`")
    groups = scores_doc["groups"]
    towers = sorted({g["tower"] for g in groups}, key=[g["tower"] for g in groups].index)
    keep: dict[str, int] = {}
    parts = [[g for g in groups if g["tower"] == t] for t in towers] if per_tower else [groups]
    for part in parts:
        keep.update(zip([g["name"] for g in part], _allocate(part, allocator, target, settings)))
    plan_groups = []
    for g in groups:
        prune = int(g["params"]) - keep[g["name"]]
        zeros = split_count(prune, [int(t["numel"]) for t in g["tensors"]])
        plan_groups.append({
            "name": g["name"], "tower": g["tower"], "index": g.get("index"),
            "params": int(g["params"]), "score": g["score"],
            "sparsity": prune / int(g["params"]), "zeros": prune,
            "tensors": [
                {"name": t["name"], "numel": int(t["numel"]), "zeros": z, "sparsity": z / int(t["numel"])}
                for t, z in zip(g["tensors"], zeros)
            ],
        })
    total = sum(g["params"] for g in plan_groups)
    return {
        "format": PLAN_FORMAT,
        "version": VERSION,
        "created": _now(),
        "ecoflap_version": __version__,
        "model": scores_doc["model"],
        "scores_hash": doc_hash(scores_doc),
        "score_method": scores_doc.get("method"),
        "allocator": {"name": allocator, "per_tower": per_tower, **settings,
                      **({"chosen": f"auto: {reason}"} if reason else {})},
        "target_sparsity": target,
        "achieved_sparsity": sum(g["zeros"] for g in plan_groups) / total,
        "towers": tower_summary(plan_groups),
        "groups": plan_groups,
    }


def tower_summary(groups: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for g in groups:
        entry = summary.setdefault(g["tower"], {"params": 0, "zeros": 0})
        entry["params"] += g["params"]
        entry["zeros"] += g["zeros"]
    for entry in summary.values():
        entry["sparsity"] = entry["zeros"] / entry["params"]
    return summary


def validate_plan(doc: dict[str, Any], where: str = "plan") -> dict[str, Any]:
    _check_format(doc, PLAN_FORMAT, where)
    groups = doc.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ArtifactError(f"{where} lists no groups")
    try:
        for g in groups:
            for t in g["tensors"]:
                if not 0 <= int(t["zeros"]) <= int(t["numel"]):
                    raise ArtifactError(f"{where}: tensor {t['name']} plans {t['zeros']} zeros of {t['numel']}")
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{where}: malformed group or tensor record") from None
    if "fingerprint" not in doc.get("model", {}):
        raise ArtifactError(f"{where} has no model fingerprint")
    return doc


def check_model_match(doc: dict[str, Any], fingerprint: str, model_id: str, where: str) -> None:
    planned = doc["model"].get("fingerprint")
    if planned != fingerprint:
        raise ArtifactError(
            f"{where} was made for model {doc['model'].get('id')!r} (fingerprint {planned}), "
            f"not for {model_id!r} (fingerprint {fingerprint})"
        )


def prune_counts(plan: dict[str, Any]) -> dict[str, int]:
    """Tensor name -> exact number of weights to prune."""
    return {t["name"]: int(t["zeros"]) for g in plan["groups"] for t in g["tensors"]}


def check_nm_plan(plan: dict[str, Any], nm: tuple[int, int]) -> None:
    """N:M sparsity is fixed at 1 - N/M per tensor: refuse any other plan."""
    n, m = nm
    for g in plan["groups"]:
        for t in g["tensors"]:
            if t["zeros"] == 0:
                continue
            if abs(int(t["zeros"]) - int(t["numel"]) * (m - n) // m) > 1:
                raise PlanError(
                    f"N:M {n}:{m} prunes exactly {(m - n) / m:.2f} of every tensor, but the plan gives "
                    f"{t['name']} sparsity {t['sparsity']:.3f}: use a uniform plan at {(m - n) / m:.2f}"
                )
