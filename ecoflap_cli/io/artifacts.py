"""Artifacts on disk: score and plan documents (versioned, validated on read, written atomically).

A score document lists the model's groups (blocks) with their tensors and one score each; a plan
document gives every group and tensor an exact number of weights to prune. Both carry the model's
structural fingerprint so that a plan made for another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ecoflap_cli import __version__
from ecoflap_cli.core.solvers import split_count
from ecoflap_cli.errors import ArtifactError, PlanError
from ecoflap_cli.files import write_atomic
from ecoflap_cli.io.layout import PLAN_NAME, read_document
from ecoflap_cli.io.outputs import check_output_path
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
    check_output_path(output, kind="results")  # never over a checkpoint's own file, whoever calls
    if Path(output).exists() and not overwrite:
        raise ArtifactError(f"{output} exists (pass --overwrite to replace it)")
    write_atomic(output, text.encode(), replace=overwrite)  # exclusive: a file made meanwhile stays


def check_json_output(
    output: str, overwrite: bool = False, *, inputs: Sequence[str | os.PathLike[str]] = (), kind: str = "file"
) -> None:
    """Refuse, before any work, a file output that exists (without ``overwrite``) or that cannot
    be created: a file where a directory of its path should be, or a directory not writable; and
    what :func:`ecoflap_cli.files.check_output_path` refuses: an output that is or lies inside
    one of ``inputs`` (the model directory, calibration and text files, scores, plan), that would
    replace a file of a checkpoint directory, a dangling symlink, a name too long. ``kind`` is
    ``file`` (scores, plan) or ``results`` (eval: may go into the checkpoint it measures as a new
    ``.json`` file)."""
    if output == "-":
        return
    check_output_path(output, inputs, kind=kind)
    path = Path(output)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{output} exists (pass --overwrite to replace it)")
    if path.is_dir():
        raise ArtifactError(f"{output} is a directory: give a file name")
    for parent in path.absolute().parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise ArtifactError(f"cannot write {output}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ArtifactError(f"cannot write {output}: the directory {parent} is not writable")
        return


def read_json(source: str) -> dict[str, Any]:
    """Read a JSON document from a path, or from stdin when ``source`` is ``-``."""
    if source == "-":
        where = "stdin"
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"stdin is not UTF-8 text (byte at offset {exc.start})") from None
    else:
        path = Path(source)
        if path.is_dir():
            for name in ("plan.json", "scores.json"):
                if (path / name).is_file():
                    path = path / name
                    break
        if not path.is_file():
            raise ArtifactError(f"file not found: {source}")
        where = str(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{where} is not UTF-8 text (byte at offset {exc.start})") from None
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


#: top-level document fields that differ between two identical runs (when, how long): left out
#: of :func:`doc_hash`, so ``scores_hash`` / ``plan_hash`` depend on content only
RUN_SPECIFIC_FIELDS = ("created", "timings")


def doc_hash(doc: dict[str, Any]) -> str:
    """The 16-digit content hash of an artifact document (see :func:`content_hash`), without its
    run-specific fields (:data:`RUN_SPECIFIC_FIELDS`)."""
    return content_hash({k: v for k, v in doc.items() if k not in RUN_SPECIFIC_FIELDS})


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
    """Check a scores document strictly: exact types, each group and tensor named once, sizes that
    add up, and either a finite non-negative score for every group or none at all."""
    _check_format(doc, SCORES_FORMAT, where)
    groups = _checked_groups(doc, where)
    for g in groups:
        score = g.get("score")
        if score is not None and not _is_number(score, low=0.0):
            raise ArtifactError(f"{where}: group {g['name']} has score {score!r} (a finite number >= 0, or null)")
    if len({g.get("score") is None for g in groups}) > 1:
        raise ArtifactError(f"{where}: some groups have a score and some have none")
    _check_fingerprint(doc, where)
    return doc


# --- strict checks shared by scores and plans ---------------------------------------------------


def _is_int(value: Any, low: int = 0) -> bool:
    """An integer (``True`` is not one, though Python says bool is an int) of at least ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any, low: float = float("-inf"), high: float = float("inf")) -> bool:
    """A finite int or float (not a bool, not a string) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and low <= value <= high


def _checked_groups(doc: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The document's groups, each a block with its tensors: names unique over the document,
    sizes positive integers, and a group's ``params`` the sum of its tensors' ``numel``."""
    groups = doc.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ArtifactError(f"{where} lists no groups")
    group_names: set[str] = set()
    tensor_names: set[str] = set()
    for number, g in enumerate(groups, 1):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not isinstance(g.get("tower"), str):
            raise ArtifactError(f"{where}: group {number} is not a record with a name and a tower")
        name = g["name"]
        if name in group_names:
            raise ArtifactError(f"{where}: group {name} is listed twice")
        group_names.add(name)
        tensors = g.get("tensors")
        if not _is_int(g.get("params"), low=1) or not isinstance(tensors, list) or not tensors:
            raise ArtifactError(f"{where}: group {name} needs a positive integer 'params' and a list of tensors")
        for t in tensors:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not _is_int(t.get("numel"), low=1):
                raise ArtifactError(f"{where}: group {name} has a malformed tensor record {str(t)[:80]}")
            if t["name"] in tensor_names:
                raise ArtifactError(f"{where}: tensor {t['name']} is listed twice")
            tensor_names.add(t["name"])
        if sum(t["numel"] for t in tensors) != g["params"]:
            raise ArtifactError(f"{where}: group {name} has params {g['params']}, but its tensors add up to another")
    return groups


def _check_fingerprint(doc: dict[str, Any], where: str) -> None:
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        raise ArtifactError(f"{where} has no model fingerprint")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9


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
    """Check a plan strictly: the checks of :func:`validate_scores` on its groups, every ``zeros``
    an integer within [0, numel], each group's zeros the sum of its tensors', the target in
    [0, 1), and every sparsity it states equal to the one its counts give (an edited plan must
    agree with itself: nothing downstream trusts a stated sparsity)."""
    _check_format(doc, PLAN_FORMAT, where)
    groups = _checked_groups(doc, where)
    for g in groups:
        for t in g["tensors"]:
            zeros = t.get("zeros")
            if not _is_int(zeros) or zeros > t["numel"]:
                raise ArtifactError(
                    f"{where}: tensor {t['name']} plans zeros {zeros!r}: an integer in [0, {t['numel']}]"
                )
            if "sparsity" in t and not (_is_number(t["sparsity"]) and _close(t["sparsity"], zeros / t["numel"])):
                raise ArtifactError(f"{where}: tensor {t['name']} states sparsity {t['sparsity']!r} for {zeros} zeros")
        zeros = sum(t["zeros"] for t in g["tensors"])
        if g.get("zeros") != zeros or isinstance(g.get("zeros"), bool):
            raise ArtifactError(f"{where}: group {g['name']} states zeros {g.get('zeros')!r}, its tensors {zeros}")
        if "sparsity" in g and not (_is_number(g["sparsity"]) and _close(g["sparsity"], zeros / g["params"])):
            raise ArtifactError(f"{where}: group {g['name']} states sparsity {g['sparsity']!r} for {zeros} zeros")
        if g.get("score") is not None and not _is_number(g["score"], low=0.0):
            raise ArtifactError(f"{where}: group {g['name']} has score {g['score']!r} (a finite number >= 0, or null)")
    target = doc.get("target_sparsity")
    if not _is_number(target, 0.0, 1.0) or target == 1.0:
        raise ArtifactError(f"{where}: target_sparsity must be a number in [0, 1), got {target!r}")
    achieved = sum(g["zeros"] for g in groups) / sum(g["params"] for g in groups)
    stated = doc.get("achieved_sparsity")
    if stated is not None and not (_is_number(stated) and _close(stated, achieved)):
        raise ArtifactError(f"{where}: states achieved_sparsity {stated!r}, but its counts give {achieved:.6f}")
    towers = doc.get("towers")
    if towers is not None and towers != tower_summary(groups):
        raise ArtifactError(f"{where}: its tower totals do not match its groups")
    _check_fingerprint(doc, where)
    return doc


def check_plan_structure(plan: dict[str, Any], blocks: Sequence[Block], where: str = "the plan") -> None:
    """Every prunable tensor of the model exactly once, in its own block and with its size: a plan
    with a block or tensor missing, added, moved or resized is refused (not pruned partly)."""
    model_groups = {b.name: b for b in blocks}
    plan_groups = {g["name"]: g for g in plan["groups"]}
    missing = [n for n in model_groups if n not in plan_groups]
    extra = [n for n in plan_groups if n not in model_groups]
    if missing or extra:
        what = f"misses block {missing[0]}" if missing else f"has block {extra[0]}, which this model lacks"
        raise ArtifactError(
            f"{where} {what} ({len(missing)} missing, {len(extra)} unknown; plans cover every block exactly once)"
        )
    for name, block in model_groups.items():
        sizes = {f"{p}.weight": m.weight.numel() for p, m in block.linears.items()}
        planned = {t["name"]: t["numel"] for t in plan_groups[name]["tensors"]}
        if planned != sizes:
            wrong = sorted(set(sizes).symmetric_difference(planned)) or sorted(
                n for n in sizes if sizes[n] != planned[n]
            )
            raise ArtifactError(f"{where}: block {name} does not match the model's tensors (first: {wrong[0]})")


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


def read_plan(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / PLAN_NAME
    doc = read_document(directory, PLAN_NAME)
    return None if doc is None else validate_plan(doc, str(path))
