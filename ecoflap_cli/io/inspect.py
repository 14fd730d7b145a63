"""`ecoflap inspect` as a library call: what an artifact is and how sparse it is, per block and tower.

``inspect_artifact`` reads a scores file, a plan, or a checkpoint directory (dense or packed) and
returns a summary document; it never loads a model. For checkpoints the achieved sparsity is
measured from the stored weights, one tensor at a time: a bitmask-packed tensor from its mask
alone (checked against the number of stored values in the file header), other tensors whole. An
entry counts as zero when all its bits are zero (the packed format's rule), so dense and packed
copies of one checkpoint give identical numbers.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ecoflap_cli.errors import ArtifactError, MissingDependencyError
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.artifacts import read_plan
from ecoflap_cli.io.layout import (
    REPORT_NAME,
    check_integrity,
    checkpoint_layout,
    read_document,
    weight_bytes,
    weight_files,
)
from ecoflap_cli.io.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PART_SEPARATOR,
    bitmask_row_counts,
    kept_indices,
    nm_tables,
    parse_index,
)

SUMMARY_FORMAT = "ecoflap.inspect"
#: the module path up to the first numeric component: ``model.layers.3.mlp.up_proj.weight`` is in
#: block ``model.layers.3`` of the block list (tower) ``model.layers``
_BLOCK_RE = re.compile(r"^(?P<tower>.+?)\.(?P<index>\d+)\.")


def inspect_artifact(source: str, verify: bool = True) -> dict[str, Any]:
    """Summary of a scores file, plan or checkpoint directory (``-`` reads a document from stdin).

    A checkpoint's weight files are first checked against its recorded sha256 (``verify``); the
    summary's ``integrity`` says ``verified``, ``skipped`` or ``unrecorded``.
    """
    if source != "-" and Path(source).is_dir():
        return _inspect_checkpoint(Path(source), verify)
    doc = artifacts.read_json(source)
    where = "stdin" if source == "-" else source
    fmt = doc.get("format")
    if fmt == artifacts.SCORES_FORMAT:
        return _inspect_scores(artifacts.validate_scores(doc, where), where)
    if fmt == artifacts.PLAN_FORMAT:
        return _inspect_plan(artifacts.validate_plan(doc, where), where)
    raise ArtifactError(f"{where} is not a scores file, a plan or a checkpoint directory (format {fmt!r})")


def _summary(
    source: str, kind: str, fmt: Any, version: Any, model: dict[str, Any] | None, **rest: Any
) -> dict[str, Any]:
    model = model or {}
    return {
        "format": SUMMARY_FORMAT,
        "source": source,
        "kind": kind,
        "artifact": {"format": fmt, "version": version},
        "model": {k: model.get(k) for k in ("id", "model_type", "class", "fingerprint", "dtype")},
        "method": None,
        "allocator": None,
        "target_sparsity": None,
        "achieved_sparsity": None,
        **rest,
    }


def _inspect_scores(doc: dict[str, Any], where: str) -> dict[str, Any]:
    blocks = [_block_row(g, None, None) for g in doc["groups"]]
    return _summary(
        where,
        "scores",
        doc["format"],
        doc["version"],
        doc.get("model"),
        method=doc.get("method"),
        blocks=blocks,
        towers=_tower_rows(blocks),
    )


def _inspect_plan(doc: dict[str, Any], where: str) -> dict[str, Any]:
    blocks = [_block_row(g, g["zeros"] / g["params"], None) for g in doc["groups"]]  # counted, not as stated
    return _summary(
        where,
        "plan",
        doc["format"],
        doc["version"],
        doc.get("model"),
        method=doc.get("score_method"),
        allocator=doc.get("allocator"),
        target_sparsity=doc.get("target_sparsity"),
        achieved_sparsity=doc.get("achieved_sparsity"),
        blocks=blocks,
        towers=_tower_rows(blocks),
    )


def _block_row(group: dict[str, Any], planned: float | None, achieved: float | None) -> dict[str, Any]:
    return {
        "name": group["name"],
        "tower": group["tower"],
        "index": group.get("index"),
        "params": int(group["params"]),
        "score": group.get("score"),
        "planned": planned,
        "achieved": achieved,
    }


def _tower_rows(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Blocks aggregated per tower, sparsities weighted by parameters."""
    towers: dict[str, list[dict[str, Any]]] = {}
    for b in blocks:
        towers.setdefault(b["tower"], []).append(b)
    rows = []
    for name, members in towers.items():
        params = sum(b["params"] for b in members)
        rows.append(
            {
                "name": name,
                "blocks": len(members),
                "params": params,
                "planned": _weighted(members, "planned", params),
                "achieved": _weighted(members, "achieved", params),
            }
        )
    return rows


def _weighted(rows: list[dict[str, Any]], key: str, total: int) -> float | None:
    if not total or any(r[key] is None for r in rows):
        return None
    return sum(r[key] * r["params"] for r in rows) / total


# --- checkpoints ------------------------------------------------------------------------------


def _inspect_checkpoint(directory: Path, verify: bool) -> dict[str, Any]:
    integrity = check_integrity(directory, verify)
    layout = checkpoint_layout(directory)
    if layout is None:
        raise ArtifactError(f"{directory} is not a checkpoint directory (no model.safetensors or index)")
    plan = read_plan(directory)
    report = read_document(directory, REPORT_NAME)
    wanted = {t["name"] for g in plan["groups"] for t in g["tensors"]} if plan else None
    counts, storage = _weight_counts(directory, wanted)
    files = [f.name for f in weight_files(directory)]
    storage.update(layout=layout, files=files, bytes=weight_bytes(directory))
    blocks = _plan_blocks(plan, counts, directory) if plan else _path_blocks(counts)
    numel = sum(b["params"] for b in blocks)
    achieved = sum(b["achieved"] * b["params"] for b in blocks) / numel if numel else None
    model = (plan or report or {}).get("model") or _config_model(directory)
    target = (plan or report or {}).get("target_sparsity")
    return _summary(
        str(directory),
        "checkpoint",
        FORMAT_NAME if layout == "packed" else "safetensors",
        FORMAT_VERSION if layout == "packed" else None,
        model,
        method=plan.get("score_method") if plan else None,
        allocator=plan.get("allocator") if plan else None,
        target_sparsity=target,
        achieved_sparsity=achieved,
        blocks=blocks,
        towers=_tower_rows(blocks),
        storage=storage,
        integrity=integrity,
        solver=(report or {}).get("solver"),
        documents=sorted(n for n in ("plan.json", "scores.json", REPORT_NAME) if (directory / n).is_file()),
    )


def _config_model(directory: Path) -> dict[str, Any]:
    config = read_document(directory, "config.json") or {}
    return {
        "id": str(directory),
        "model_type": config.get("model_type"),
        "class": (config.get("architectures") or [None])[0],
        "dtype": config.get("dtype"),
    }


def _plan_blocks(plan: dict[str, Any], counts: dict[str, tuple[int, int]], directory: Path) -> list[dict]:
    blocks = []
    for g in plan["groups"]:
        names = [t["name"] for t in g["tensors"]]
        missing = [n for n in names if n not in counts]
        if missing:
            raise ArtifactError(f"{directory}/plan.json lists {missing[0]}, which the checkpoint lacks")
        numel = sum(counts[n][0] for n in names)
        zeros = sum(counts[n][1] for n in names)
        blocks.append({**_block_row(g, g["zeros"] / g["params"], zeros / numel if numel else 0.0), "params": numel})
    return blocks


def _path_blocks(counts: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Without a plan: 2-D tensors grouped by module path up to the layer index."""
    grouped: dict[tuple[str, int], list[str]] = {}
    for name in counts:
        match = _BLOCK_RE.match(name)
        if match:
            grouped.setdefault((match["tower"], int(match["index"])), []).append(name)
    towers = list(dict.fromkeys(tower for tower, _ in grouped))
    blocks = []
    for (tower, index), names in sorted(grouped.items(), key=lambda kv: (towers.index(kv[0][0]), kv[0][1])):
        numel = sum(counts[n][0] for n in names)
        zeros = sum(counts[n][1] for n in names)
        blocks.append(
            {
                "name": f"{tower}.{index}",
                "tower": tower,
                "index": index,
                "params": numel,
                "score": None,
                "planned": None,
                "achieved": zeros / numel if numel else 0.0,
            }
        )
    return blocks


def _weight_counts(directory: Path, wanted: set[str] | None) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """(numel, zeros) of the ``wanted`` tensors (None: every 2-D floating tensor), and how many
    tensors each packed layout holds."""
    counts: dict[str, tuple[int, int]] = {}
    layouts: dict[str, int] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                index = parse_index(metadata, path) if metadata.get("format") == FORMAT_NAME else {}
                for name, entry in index.items():
                    layouts[str(entry.get("layout"))] = layouts.get(str(entry.get("layout")), 0) + 1
                    if wanted is None or name in wanted:
                        counts[name] = _packed_count(fh, name, entry, path)
                for key in fh.keys():  # noqa: SIM118 - safe_open handles are not containers
                    if key in counts or key in index or key.rpartition(PART_SEPARATOR)[0] in index:
                        continue
                    if (key in wanted) if wanted is not None else _is_2d_float(fh, key):
                        t = fh.get_tensor(key)
                        counts[key] = (t.numel(), t.numel() - int(kept_indices(t).sum()))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            detail = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ArtifactError(f"cannot read safetensors file {path}: {detail}") from None
    return counts, {"packed_tensors": layouts}


def _packed_count(fh: Any, name: str, entry: dict[str, Any], path: Path) -> tuple[int, int]:
    """(numel, zeros) of a tensor in the packed index, counted without expanding it.

    Bitmask: from the mask alone (a sixteenth of an fp16 tensor's bytes), counted byte by byte and
    checked against the header of the stored values; N:M: from the stored values, their shape
    and that of the group codes checked against the recorded shape; dense entries are read whole.
    """
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v >= 0 for v in shape)):
        raise ArtifactError(f"{path}: {name}: malformed shape {shape!r} in the packed index")
    rows, cols = shape
    layout = entry.get("layout")
    if layout == "bitmask":
        return rows * cols, rows * cols - _bitmask_kept(fh, name, rows, cols, path)
    if layout == "nm":
        return rows * cols, rows * cols - _nm_kept(fh, name, rows, cols, path)
    if layout == "dense":
        t = fh.get_tensor(name)
    else:
        raise ArtifactError(f"{path}: {name}: unknown packed layout {layout!r}")
    return t.numel(), t.numel() - int(kept_indices(t).sum())


def _part(fh: Any, name: str, part: str, path: Path) -> str:
    key = f"{name}{PART_SEPARATOR}{part}"
    if key not in fh.keys():  # noqa: SIM118 - safe_open handles are not containers
        raise ArtifactError(f"{path}: {name}: packed tensor is missing part {part}")
    return key


def _bitmask_kept(fh: Any, name: str, rows: int, cols: int, path: Path) -> int:
    bitmask_shape = fh.get_slice(_part(fh, name, "bitmask", path)).get_shape()
    values = fh.get_slice(_part(fh, name, "values", path)).get_shape()
    expected = [rows, (cols + 7) // 8]
    if fh.get_slice(_part(fh, name, "bitmask", path)).get_dtype() != "U8" or list(bitmask_shape) != expected:
        raise ArtifactError(f"{path}: {name}: bitmask has shape {bitmask_shape}, expected {expected} (uint8)")
    bitmask = fh.get_tensor(_part(fh, name, "bitmask", path))
    kept = int(bitmask_row_counts(bitmask, cols, f"{path}: {name}").sum())
    if len(values) != 1 or values[0] != kept:
        stored = values[0] if len(values) == 1 else f"shape {values} of"
        raise ArtifactError(f"{path}: {name}: bitmask keeps {kept} entries but {stored} values are stored")
    return kept


def _nm_kept(fh: Any, name: str, rows: int, cols: int, path: Path) -> int:
    nm = fh.get_tensor(_part(fh, name, "nm", path))
    if nm.dtype != torch.int64 or tuple(nm.shape) != (2,):
        raise ArtifactError(f"{path}: {name}: packed 'nm' must be an int64 tensor of length 2")
    n, m = (int(v) for v in nm.tolist())
    if not (1 <= n <= m <= 16) or cols % m:
        raise ArtifactError(f"{path}: {name}: N:M {n}:{m} does not fit shape [{rows}, {cols}]")
    width = nm_tables(n, m)[2]
    for part, want in (("values", [rows, cols // m * n]), ("indices", [rows, (cols // m * width + 7) // 8])):
        got = fh.get_slice(_part(fh, name, part, path)).get_shape()
        if list(got) != want:
            raise ArtifactError(f"{path}: {name}: N:M {part} have shape {got}, expected {want}")
    values = fh.get_tensor(_part(fh, name, "values", path))
    return int(kept_indices(values).sum())


def _is_2d_float(fh: Any, key: str) -> bool:
    sl = fh.get_slice(key)
    return len(sl.get_shape()) == 2 and sl.get_dtype() in ("F64", "F32", "F16", "BF16")


# --- chart ------------------------------------------------------------------------------------


def chart_values(summary: dict[str, Any]) -> tuple[str, list[float]]:
    """What the chart plots: achieved sparsity, else planned sparsity, else the score."""
    blocks = summary["blocks"]
    choices = (("achieved", "achieved sparsity"), ("planned", "planned sparsity"), ("score", "score"))
    for key, label in choices:
        if blocks and all(b[key] is not None for b in blocks):
            return label, [float(b[key]) for b in blocks]
    raise ArtifactError(f"{summary['source']} has nothing per block to chart")


def write_chart(summary: dict[str, Any], path: str | Path) -> None:
    """A PNG bar chart per block, coloured by tower (needs matplotlib), written atomically.

    Uses a bare Figure, not pyplot, so the caller's matplotlib backend and state are untouched.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MissingDependencyError("matplotlib", "--chart") from None
    label, values = chart_values(summary)
    block_towers = [b["tower"] for b in summary["blocks"]]
    towers = list(dict.fromkeys(block_towers))
    palette = colormaps["tab10"]
    fig = Figure(figsize=(max(6.0, 0.25 * len(values) + 2), 3.5))
    ax = fig.subplots()
    bars = ax.bar(range(len(values)), values, color=[palette(towers.index(t) % 10) for t in block_towers])
    ax.set_xlabel("block")
    ax.set_ylabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if label.endswith("sparsity"):
        ax.set_ylim(0, 1)
        if summary["target_sparsity"] is not None:
            ax.axhline(summary["target_sparsity"], color="grey", linestyle="--", linewidth=1)
    ax.set_title(f"{summary['kind']}: {summary['model'].get('id') or summary['source']}", fontsize=9)
    ax.legend([bars[block_towers.index(t)] for t in towers], towers, fontsize=8, loc="upper left")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    artifacts.write_atomic(path, buffer.getvalue())
