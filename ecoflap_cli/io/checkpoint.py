"""Pruned checkpoints: a Hugging Face model directory plus what was done, written atomically.

A checkpoint's weights are *dense* (what ``save_pretrained`` writes; any ``from_pretrained``
reloads them) or *packed* (the same tensors, each pruned weight in a packed sparse layout of
``packed.py``; smaller on disk, loaded by ``ecoflap_cli.io.pruned.load_pruned`` and every ``ecoflap``
command). Both follow the Hugging Face shard layout; docs/packed-format.md has the details.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli import __version__
from ecoflap_cli.core import units
from ecoflap_cli.errors import ArtifactError, EcoflapError
from ecoflap_cli.files import atomic_dir, clean_stale
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.artifacts import read_plan
from ecoflap_cli.io.layout import (
    CHECKSUMS_NAME,
    LAYOUTS,
    PACKED_CONFIG_KEY,
    PACKED_LOAD_HINT,
    PLAN_NAME,
    check_integrity,
    check_links_inside,
    checkpoint_layout,
    read_report,
    weight_bytes,
    write_checksums,
)
from ecoflap_cli.io.loading import LoadedModel
from ecoflap_cli.io.model_card import write_card
from ecoflap_cli.io.outputs import check_output_path
from ecoflap_cli.io.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    SINGLE_FILE,
    is_weight_file,
    load_sharded,
    save_sharded,
)

DEFAULT_MAX_SHARD_SIZE = "5GB"


def parse_size(size: str | int) -> int:
    """Bytes in a shard size (``core.units.parse_size``)."""
    return units.parse_size(size, "--max-shard-size")


def check_output_dir(
    out: str | Path, overwrite: bool, sources: Sequence[str | Path] = (), *, inputs: Sequence[str | Path] = ()
) -> Path:
    """Refuse, before any work starts, an output directory that cannot or must not be written.

    Refused: an existing output (unless ``overwrite``) or one that is not a directory; the
    current directory or one above it; an output equal to, inside or containing one of
    ``sources`` (the input model; names that are not local paths are skipped) or of ``inputs``
    (calibration files, plan, scores: every local file the run reads), symlinks resolved; a
    dangling symlink; a name too long for the file system; a path under a regular file; a parent
    directory that cannot be written (:func:`ecoflap_cli.files.check_output_path`).
    Temporaries of ``out`` left by killed runs are removed
    (:func:`ecoflap_cli.files.clean_stale`).
    """
    path = Path(out)
    check_output_path(out, kind="dir")  # names and links first: a name too long cannot even be looked up
    if path.exists() and not overwrite:
        raise ArtifactError(f"output {path} exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"output {path} exists and is not a directory")
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ArtifactError(f"output {out} is the current directory or contains it: choose a new directory")
    for source in sources:
        _check_not_source(out, resolved, source)
    check_output_path(out, [*sources, *inputs], kind="dir")
    _check_writable_parent(out, resolved)
    clean_stale(path)
    return path


def _check_not_source(out: str | Path, resolved: Path, source: str | Path) -> None:
    src = Path(source)
    if not src.exists():
        return
    src = src.resolve()
    if resolved == src:
        raise ArtifactError(f"output {out} is the input model {source}: choose another --output")
    if src in resolved.parents:
        raise ArtifactError(f"output {out} lies inside the input model {source}: choose a directory outside it")
    if resolved in src.parents:
        raise ArtifactError(f"output {out} contains the input model {source}: choose another --output")


def _nearest_existing(resolved: Path) -> Path:
    parent = resolved.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _check_writable_parent(out: str | Path, resolved: Path) -> None:
    """The output's nearest existing ancestor must be a directory this process can write."""
    parent = _nearest_existing(resolved)
    if not parent.is_dir():
        raise ArtifactError(f"cannot create output {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write output {out}: directory {parent} is read-only or not writable by you")


def check_free_space(out: str | Path, needed: int, what: str) -> None:
    """Refuse a run whose output cannot fit on its file system, before the work."""
    parent = _nearest_existing(Path(out).resolve())
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed:
        raise ArtifactError(
            f"not enough free space for {out}: about {_human(needed)} needed ({what}), "
            f"{_human(free)} free on the file system of {parent}"
        )


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


#: safetensors header bytes per tensor (name, dtype, shape, offsets), and more per packed tensor
#: (its four parts and its entry in the packed index); generous, so the estimate errs high
_HEADER_BYTES = 160
_PACKED_HEADER_BYTES = 768
#: what a checkpoint holds besides weights (config, tokenizer, documents) when the input is neither
#: a local directory nor a hub model in the cache to measure
_OTHER_FILES_BYTES = 32 * 10**6
#: ecoflap's documents (report, plan, scores, card, checksums, shard index): a fixed part and a part
#: per tensor (measured on the tiny LLaMA: about 700 bytes per pruned tensor in all; 1 KB allowed)
_DOCUMENT_BYTES = 16 * 1024
_DOCUMENT_BYTES_PER_TENSOR = 1024
#: the margin docs/reliability.md states: the estimate is at least what is written, and at most
#: this factor of it plus :data:`ESTIMATE_SLACK_BYTES` (for a local or cached input)
ESTIMATE_MARGIN = 1.15
ESTIMATE_SLACK_BYTES = 64 * 1024


def estimate_checkpoint_bytes(
    model: torch.nn.Module,
    prune_counts: Mapping[str, int] | None,
    packed: bool,
    source: str | Path | None = None,
    *,
    weights_only: bool = False,
) -> int:
    """Bytes the checkpoint of ``model`` will take: its weights, dense or packed, and the other files.

    Tensors are counted once (tied weights share storage). Packed, each tensor of ``prune_counts``
    (planned zeros per tensor name) takes the smaller of dense and the bitmask layout; headers
    are counted generously, so the estimate errs high. Files besides the weights are measured
    in ``source`` when it is a local directory or a hub model in the Hugging Face cache, and
    ecoflap's documents are counted per tensor. ``weights_only``: the weights alone (what a resume
    state stores of the finished blocks). Within :data:`ESTIMATE_MARGIN` of what is written (see
    docs/reliability.md).
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for name, tensor in model.state_dict().items():
        key = (id(tensor.untyped_storage()) if tensor.device.type != "meta" else id(tensor), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        dense = tensor.numel() * tensor.element_size()
        zeros = prune_counts.get(name) if packed and prune_counts is not None else None
        if zeros is not None and tensor.dim() == 2:
            rows, cols = tensor.shape
            bitmask = (tensor.numel() - zeros) * tensor.element_size() + rows * ((cols + 7) // 8) + rows * 8 + 16
            dense = min(dense, bitmask + _PACKED_HEADER_BYTES)
        total += dense + _HEADER_BYTES
    if weights_only:
        return total
    other = _other_files_bytes(source)
    if other is None:  # nothing to measure: a guess that covers the documents too
        return total + _OTHER_FILES_BYTES
    tensors = len(prune_counts) if prune_counts else len(seen)
    return total + other + _DOCUMENT_BYTES + _DOCUMENT_BYTES_PER_TENSOR * tensors


def _cached_snapshot(source: str) -> Path | None:
    """The snapshot of hub model ``source`` in the default Hugging Face cache, without a download."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - no hub id, not cached: the caller falls back
        return None


def _other_files_bytes(source: str | Path | None) -> int | None:
    """Bytes of the input's files besides weights (config, tokenizer, processor), which the
    checkpoint copies; None when there is nothing to measure."""
    if source is None:
        return None
    directory = Path(source) if Path(source).is_dir() else _cached_snapshot(str(source))
    if directory is None:
        return None
    other = 0
    for entry in directory.iterdir():  # the top level: what save_pretrained writes
        weights = entry.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5"))
        if entry.is_file() and not weights and not is_weight_file(entry.name):
            other += entry.stat().st_size
    return other


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

    ``packed`` writes the weights ``save_pretrained`` would write (so tied weights it drops stay
    dropped; caught in memory by :func:`captured_weights`, never written dense) with the tensors
    of ``documents["plan.json"]`` packed; ``n_m`` lets the N:M layout compete with the bitmask.
    Shards hold at most ``max_shard_size`` bytes of tensor data. Without ``overwrite`` the final
    rename is exclusive: an output that appeared meanwhile is left alone (ArtifactError).
    """
    target = check_output_dir(out, overwrite)
    shard_bytes = parse_size(max_shard_size)
    model: Any = loaded.model  # a transformers model (save_pretrained)
    with atomic_dir(target, replace=overwrite) as tmp:
        from ecoflap_cli.engine.offload import any_offloaded

        if packed:
            with captured_weights() as state:
                model.save_pretrained(tmp, max_shard_size=shard_bytes)
        elif any_offloaded(model):
            save_offloaded(model, tmp, shard_bytes)
        else:
            model.save_pretrained(tmp, max_shard_size=shard_bytes)
        if loaded.processor is not None:
            loaded.processor.save_pretrained(tmp)
        if packed:
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
        write_card(tmp, "packed" if packed else "dense", target.name)
        write_checksums(tmp)
    return target


@contextmanager
def captured_weights() -> Iterator[dict[str, torch.Tensor]]:
    """Inside the ``with``, ``save_pretrained`` hands its weight shards to the yielded dict
    instead of writing them (config and the other files are still written).

    The dict is ordered by tensor name, the order :func:`load_sharded` reads a written
    checkpoint back in, so packing it gives the bytes packing a dense save gives.
    """
    import transformers.modeling_utils as modeling_utils

    caught: dict[str, torch.Tensor] = {}
    original = modeling_utils.safe_save_file

    def keep(
        tensors: dict[str, torch.Tensor], filename: str | os.PathLike[Any], metadata: dict[str, str] | None = None
    ) -> None:
        caught.update(tensors)

    ordered: dict[str, torch.Tensor] = {}
    modeling_utils.safe_save_file = keep
    try:
        yield ordered
    finally:
        modeling_utils.safe_save_file = original
    ordered.update(sorted(caught.items()))


def _tensor_for_saving(model: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer on the CPU, read from accelerate's offload storage when offloaded."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "offload", False) and attr in hook.weights_map:
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
    pretrained: Any = model  # a transformers model: config, generation_config, can_generate
    pretrained.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and pretrained.can_generate():
        pretrained.generation_config.save_pretrained(directory)
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
    """Write (replace) the weight files of a checkpoint directory, dense or packed, and mark its
    config.json accordingly (:func:`mark_config`)."""
    written = save_sharded(
        state,
        directory,
        packed=packed,
        max_shard_bytes=max_shard_bytes,
        sparse_names=sparse_names,
        metadata={"ecoflap_version": __version__},
        n_m=n_m,
    )
    mark_config(Path(directory), packed)
    return written


def packing_candidates(state: Mapping[str, torch.Tensor], plan: dict[str, Any] | None) -> set[str] | None:
    """The plan's tensors, or None (every 2-D float tensor competes) when there is no plan or
    ``save_pretrained`` stored some of them under other names (weight conversions)."""
    if plan is None:
        return None
    names = {t["name"] for g in plan["groups"] for t in g["tensors"]}
    return names if names <= state.keys() else None


# --- reading ----------------------------------------------------------------------------------


# --- the packed marker in config.json ---------------------------------------------------------


def mark_config(directory: Path, packed: bool) -> None:
    """Mark (or unmark) a checkpoint's config.json as holding packed weights.

    ``transformers_weights`` is the config key transformers reads for the weights file; a value
    that is not a safetensors name makes ``from_pretrained`` raise a ValueError quoting it, so a
    plain transformers load (and lm-eval, ...) fails with :data:`PACKED_LOAD_HINT` instead of
    loading random weights. ``ecoflap_packed`` records the format; :func:`clear_packed_marker`
    removes both from a loaded config.
    """
    path = directory / "config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError):
        raise ArtifactError(f"{path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} is not a model config")
    config.pop(PACKED_CONFIG_KEY, None)
    if config.get("transformers_weights") == PACKED_LOAD_HINT:
        config.pop("transformers_weights")
    if packed:
        config[PACKED_CONFIG_KEY] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        config["transformers_weights"] = PACKED_LOAD_HINT
    artifacts.write_atomic(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


# --- integrity --------------------------------------------------------------------------------


# --- converting -------------------------------------------------------------------------------


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    to: str,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    verify: bool = True,
    *,
    inputs: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Rewrite a checkpoint's weights dense <-> packed (losslessly); copy every other file.

    A symlink in the source is followed only where it stays inside the checkpoint (or, for a
    Hugging Face cache snapshot, inside its repository's ``blobs/``); one that points elsewhere is
    refused before anything is written, so nothing outside the checkpoint is ever copied.
    ``inputs``: other local files of the run the output must stay clear of.

    Dense -> packed packs the tensors listed in the checkpoint's plan.json (else every 2-D float
    tensor where that is smaller), with N:M competing when the report records an N:M run. The
    source's weights are checked against its checksums first (``verify``); the output records
    its own. The result's ``integrity`` is that of :func:`check_integrity`.
    """
    if to not in LAYOUTS:
        raise EcoflapError(f"--to takes packed or dense, got {to!r}")
    source = Path(source)
    integrity = check_integrity(source, verify) if source.is_dir() else "skipped"
    layout = checkpoint_layout(source) if source.is_dir() else None
    if layout is None:
        raise ArtifactError(f"{source} is not a checkpoint directory with safetensors weights")
    # in place (-o SOURCE --overwrite) is allowed: the new directory replaces the source once
    # complete. Inside the source (its temporary would be copied into itself) or containing it
    # (--overwrite would delete it) is refused, as for prune.
    in_place = Path(out).resolve() == source.resolve()
    target = check_output_dir(out, overwrite, () if in_place else (source,), inputs=inputs)
    check_links_inside(source)
    shard_bytes = parse_size(max_shard_size)
    before = weight_bytes(source)
    state = load_sharded(source)
    sparse_names = packing_candidates(state, read_plan(source))
    report = read_report(source) or {}
    n_m = tuple(report["nm"]) if report.get("nm") else None
    with atomic_dir(target, replace=overwrite) as tmp:
        for entry in source.iterdir():
            if is_weight_file(entry.name) or entry.name == CHECKSUMS_NAME:
                continue
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, tmp / entry.name)
        write_weights(
            tmp, state, packed=to == "packed", max_shard_bytes=shard_bytes, sparse_names=sparse_names, n_m=n_m
        )  # type: ignore[arg-type]
        write_checksums(tmp)
        if integrity == "verified":
            _carry_evaluations(source, tmp)
        write_card(tmp, to, target.name)  # the card names the layout and how to load it
    return {
        "integrity": integrity,
        "source": str(source),
        "output": str(target),
        "from": layout,
        "to": to,
        "bytes_before": before,
        "bytes_after": weight_bytes(target),
    }


def _carry_evaluations(source: Path, copy: Path) -> None:
    """Eval results that measured ``source`` (their identity is its verified checksums) measured
    the lossless copy too: they are re-addressed to the copy, so its card shows them."""
    from ecoflap_cli.io.model_card import IDENTITY_KEY, checkpoint_identity, evaluations_in

    new = checkpoint_identity(copy)
    for name, results in evaluations_in(source):
        if (copy / name).is_file() and new is not None:
            artifacts.write_atomic(copy / name, (json.dumps({**results, IDENTITY_KEY: new}, indent=2) + "\n").encode())
