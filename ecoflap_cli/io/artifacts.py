"""Artifacts on disk: score and plan documents (versioned, validated on read, written atomically).

A score document lists the model's groups (blocks) with their tensors and one score each; a plan
document gives every group and tensor an exact number of weights to prune. Both carry the model's
structural fingerprint so that a plan made for another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ecoflap_cli import __version__
from ecoflap_cli.core.solvers import split_count
from ecoflap_cli.errors import ArtifactError, PlanError
from ecoflap_cli.io.atomic import write_atomic  # re-exported: callers use artifacts.write_atomic
from ecoflap_cli.models.base import Block

SCORES_FORMAT = "ecoflap.scores"
PLAN_FORMAT = "ecoflap.plan"
VERSION = 1


# --- I/O --------------------------------------------------------------------------------------


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


def content_hash(obj: Any, length: int = 16) -> str:
    """Hex SHA-256 (first ``length`` digits) of ``obj`` as JSON with sorted keys.

    Equal JSON content gives equal hashes whatever the key order; values JSON cannot encode
    are hashed by their ``str``.
    """
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def doc_hash(doc: dict[str, Any]) -> str:
    """The 16-digit content hash of an artifact document (see :func:`content_hash`)."""
    return content_hash(doc)


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


def plan_document(
    scores_doc: dict[str, Any],
    allocator: dict[str, Any],
    target: float,
    keep: dict[str, int],
) -> dict[str, Any]:
    """A plan from a scores document and the weights each group keeps: zeros per group and tensor
    (split over a group's tensors in proportion to their sizes), with the allocator record."""
    plan_groups = []
    for g in scores_doc["groups"]:
        prune = int(g["params"]) - keep[g["name"]]
        zeros = split_count(prune, [int(t["numel"]) for t in g["tensors"]])
        plan_groups.append(
            {
                "name": g["name"],
                "tower": g["tower"],
                "index": g.get("index"),
                "params": int(g["params"]),
                "score": g["score"],
                "sparsity": prune / int(g["params"]),
                "zeros": prune,
                "tensors": [
                    {"name": t["name"], "numel": int(t["numel"]), "zeros": z, "sparsity": z / int(t["numel"])}
                    for t, z in zip(g["tensors"], zeros)
                ],
            }
        )
    total = sum(g["params"] for g in plan_groups)
    return {
        "format": PLAN_FORMAT,
        "version": VERSION,
        "created": _now(),
        "ecoflap_version": __version__,
        "model": scores_doc["model"],
        "scores_hash": doc_hash(scores_doc),
        "score_method": scores_doc.get("method"),
        "allocator": allocator,
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
