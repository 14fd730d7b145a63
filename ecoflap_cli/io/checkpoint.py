"""Pruned checkpoints: a Hugging Face model directory plus what was done, written atomically.

A checkpoint's weights are *dense* (what ``save_pretrained`` writes; any ``from_pretrained``
reloads them) or *packed* (the same tensors, each pruned weight in a packed sparse layout of
``packed.py``; smaller on disk, loaded by ``ecoflap_cli.io.pruned.load_pruned`` and every ``ecoflap``
command). Both follow the Hugging Face shard layout; docs/packed-format.md has the details.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli import __version__
from ecoflap_cli.errors import ArtifactError, EcoflapError
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.atomic import atomic_dir
from ecoflap_cli.io.loading import LoadedModel
from ecoflap_cli.io.packed import FORMAT_NAME, INDEX_FILE, SINGLE_FILE, load_sharded, save_sharded

REPORT_NAME = "ecoflap_report.json"
PLAN_NAME = "plan.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
LAYOUTS = ("dense", "packed")
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header


def parse_size(size: str | int) -> int:
    """Bytes in a positive size such as ``5GB``, ``500MB``, ``2GiB``, ``4096`` or ``4096B``.

    Units are case-insensitive (``kb`` is kilobytes); anything else, or a size that is not
    positive, raises one EcoflapError.
    """
    try:
        value = size if isinstance(size, int) else _size_bytes(size)
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise EcoflapError(f"cannot read size {size!r}: use a positive number and a unit (5GB, 500MB, 2GiB)")
    return value


def _size_bytes(text: str) -> int:
    """accelerate's reading of a size, plus bare byte counts (``4096``, ``4096B``), which it lacks;
    upper-cased first because accelerate reads a lower-case ``b`` as bits."""
    from accelerate.utils import convert_file_size_to_int

    text = text.strip().upper()
    number = text.removesuffix("B")
    return int(number) if number.isdigit() else convert_file_size_to_int(text)


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work starts (unless --overwrite)."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise ArtifactError(f"output {path} exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"output {path} exists and is not a directory")
    return path


# --- writing ----------------------------------------------------------------------------------


def save_checkpoint(
    loaded: LoadedModel,
    out: str | Path,
    documents: dict[str, dict[str, Any]],
    overwrite: bool = False,
    packed: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    n_m: tuple[int, int] | None = None,
) -> Path:
    """Save model, processor and JSON documents into ``out`` via a temporary sibling directory.

    ``packed`` rewrites the weights ``save_pretrained`` wrote (so tied weights it drops stay
    dropped) with the tensors of ``documents["plan.json"]`` packed; ``n_m`` lets the N:M layout
    compete with the bitmask. Shards hold at most ``max_shard_size`` bytes of tensor data.
    """
    target = check_output_dir(out, overwrite)
    shard_bytes = parse_size(max_shard_size)
    with atomic_dir(target) as tmp:
        from ecoflap_cli.engine.offload import any_offloaded

        if any_offloaded(loaded.model) and not packed:
            save_offloaded(loaded.model, tmp, shard_bytes)
        else:
            loaded.model.save_pretrained(tmp, max_shard_size=shard_bytes)
        if loaded.processor is not None:
            loaded.processor.save_pretrained(tmp)
        if packed:
            state = load_sharded(tmp)
            write_weights(
                tmp,
                state,
                packed=True,
                max_shard_bytes=shard_bytes,
                sparse_names=packing_candidates(state, documents.get(PLAN_NAME)),
                n_m=n_m,
            )
        for name, doc in documents.items():
            (tmp / name).write_text(json.dumps(doc, indent=2) + "\n")
    return target


def _tensor_for_saving(model: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer on the CPU, read from accelerate's offload storage when offloaded."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "offload", False) and attr in hook.weights_map:
        return hook.weights_map[attr].detach().to("cpu")
    return getattr(module, attr).detach().to("cpu")


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _stream_safetensors(model: torch.nn.Module, names: list[str], specs: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors file tensor by tensor: the header from shapes, then each tensor's bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        spec = specs[name]
        nbytes = spec.numel() * spec.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name in names:
            tensor = _tensor_for_saving(model, name).contiguous()
            handle.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def save_offloaded(model: torch.nn.Module, directory: Path, max_shard_bytes: int) -> None:
    """Save a model whose blocks live in CPU/disk offload storage, one tensor at a time.

    ``save_pretrained`` would first gather every offloaded weight in memory; this writes the
    safetensors header from the tensors' shapes and then streams each tensor's bytes, so saving
    holds one tensor at a time. Tied weights are stored once, under their first name, as
    ``save_pretrained`` does.
    """
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    specs: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            specs[name] = value
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        nbytes = spec.numel() * spec.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = len(shards)
    files = [SINGLE_FILE] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    for names, file in zip(shards, files):
        _stream_safetensors(model, names, specs, directory / file)
    if total > 1:
        index = {
            "metadata": {"total_size": sum(s.numel() * s.element_size() for s in specs.values())},
            "weight_map": {n: file for names, file in zip(shards, files) for n in names},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_weights(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    *,
    packed: bool,
    max_shard_bytes: int,
    sparse_names: set[str] | None = None,
    n_m: tuple[int, int] | None = None,
) -> list[Path]:
    """Write (replace) the weight files of a checkpoint directory, dense or packed."""
    return save_sharded(
        state,
        directory,
        packed=packed,
        max_shard_bytes=max_shard_bytes,
        sparse_names=sparse_names,
        metadata={"ecoflap_version": __version__},
        n_m=n_m,
    )


def packing_candidates(state: Mapping[str, torch.Tensor], plan: dict[str, Any] | None) -> set[str] | None:
    """The plan's tensors, or None (every 2-D float tensor competes) when there is no plan or
    ``save_pretrained`` stored some of them under other names (weight conversions)."""
    if plan is None:
        return None
    names = {t["name"] for g in plan["groups"] for t in g["tensors"]}
    return names if names <= state.keys() else None


# --- reading ----------------------------------------------------------------------------------


def is_weight_file(name: str) -> bool:
    return name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(name) is not None


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (shards in index order); [] if none."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ArtifactError(f"cannot read shard index {index}") from None
        return [directory / n for n in names]
    single = directory / SINGLE_FILE
    return [single] if single.is_file() else []


def header_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file read from its header alone, or None.

    Reading only the header recognises a packed file even when its data is truncated, so that
    loading it fails with the packed reader's message instead of being handed to transformers.
    """
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > _MAX_HEADER_BYTES:
                return None
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def checkpoint_layout(directory: str | Path) -> str | None:
    """``packed`` or ``dense`` for a directory with safetensors weights, else None."""
    files = weight_files(directory)
    if not files:
        return None
    packed = any((header_metadata(f) or {}).get("format") == FORMAT_NAME for f in files if f.is_file())
    return "packed" if packed else "dense"


def is_packed_checkpoint(directory: str | Path) -> bool:
    return Path(directory).is_dir() and checkpoint_layout(directory) == "packed"


def read_document(directory: str | Path, name: str) -> dict[str, Any] | None:
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ArtifactError(f"{path} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path} is not an ecoflap document")
    return doc


def read_report(directory: str | Path) -> dict[str, Any] | None:
    return read_document(directory, REPORT_NAME)


def read_plan(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / PLAN_NAME
    doc = read_document(directory, PLAN_NAME)
    return None if doc is None else artifacts.validate_plan(doc, str(path))


# --- converting -------------------------------------------------------------------------------


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    to: str,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> dict[str, Any]:
    """Rewrite a checkpoint's weights dense <-> packed (losslessly); copy every other file.

    Dense -> packed packs the tensors listed in the checkpoint's plan.json (else every 2-D float
    tensor where that is smaller), with N:M competing when the report records an N:M run.
    """
    if to not in LAYOUTS:
        raise EcoflapError(f"--to takes packed or dense, got {to!r}")
    source = Path(source)
    layout = checkpoint_layout(source) if source.is_dir() else None
    if layout is None:
        raise ArtifactError(f"{source} is not a checkpoint directory with safetensors weights")
    target = check_output_dir(out, overwrite)
    shard_bytes = parse_size(max_shard_size)
    before = weight_bytes(source)
    state = load_sharded(source)
    sparse_names = packing_candidates(state, read_plan(source))
    report = read_report(source) or {}
    n_m = tuple(report["nm"]) if report.get("nm") else None
    with atomic_dir(target) as tmp:
        for entry in source.iterdir():
            if is_weight_file(entry.name):
                continue
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, tmp / entry.name)
        write_weights(
            tmp, state, packed=to == "packed", max_shard_bytes=shard_bytes, sparse_names=sparse_names, n_m=n_m
        )  # type: ignore[arg-type]
    return {
        "source": str(source),
        "output": str(target),
        "from": layout,
        "to": to,
        "bytes_before": before,
        "bytes_after": weight_bytes(target),
    }


def weight_bytes(directory: str | Path) -> int:
    """Bytes of a checkpoint's weight files on disk."""
    return sum(f.stat().st_size for f in weight_files(directory) if f.is_file())
