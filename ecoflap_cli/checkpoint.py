"""Pruned checkpoints: a Hugging Face model directory plus what was done, written atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .loading import LoadedModel

REPORT_NAME = "ecoflap_report.json"


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work starts (unless --overwrite)."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise ArtifactError(f"output {path} exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"output {path} exists and is not a directory")
    return path


def save_checkpoint(
    loaded: LoadedModel,
    out: str | Path,
    documents: dict[str, dict[str, Any]],
    overwrite: bool = False,
    packed: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Save model, processor and JSON documents into ``out`` via a temporary sibling directory."""
    target = check_output_dir(out, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        loaded.model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if loaded.processor is not None:
            loaded.processor.save_pretrained(tmp)
        if packed:
            from .packed_checkpoint import pack_directory

            pack_directory(tmp)
        for name, doc in documents.items():
            (tmp / name).write_text(json.dumps(doc, indent=2) + "\n")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        tmp.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def read_report(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / REPORT_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"{path} is not valid JSON") from None
