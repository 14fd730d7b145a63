"""Pruned checkpoints: a Hugging Face model directory plus what was done, written atomically.

A checkpoint's weights are *dense* (what ``save_pretrained`` writes; any ``from_pretrained``
reloads them) or *packed* (the same tensors, each pruned weight in a packed sparse layout of
``packed.py``; smaller on disk, loaded by ``ecoflap_cli.io.pruned.load_pruned`` and every ``ecoflap``
command). Both follow the Hugging Face shard layout; docs/packed-format.md has the details.
"""

from __future__ import annotations

import hashlib
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
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.atomic import atomic_dir, check_output_path, clean_stale
from ecoflap_cli.io.loading import LoadedModel
from ecoflap_cli.io.model_card import write_card
from ecoflap_cli.io.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    SINGLE_FILE,
    file_inside,
    find_weights,
    is_weight_file,
    link_inside,
    load_sharded,
    save_sharded,
)

REPORT_NAME = "ecoflap_report.json"
PLAN_NAME = "plan.json"
CHECKSUMS_NAME = "ecoflap_checksums.json"
CHECKSUMS_FORMAT = "ecoflap.checksums"
DEFAULT_MAX_SHARD_SIZE = "5GB"
LAYOUTS = ("dense", "packed")
#: config.json key of a packed checkpoint (see mark_config)
PACKED_CONFIG_KEY = "ecoflap_packed"
#: how to load a packed checkpoint; transformers puts it in the error it raises (see mark_config)
PACKED_LOAD_HINT = (
    "ecoflap packed checkpoint: plain transformers cannot read it; load it with "
    "ecoflap_cli.api.load_pruned(DIR), or write a dense copy with `ecoflap convert DIR --to dense -o OUT`"
)
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header
#: files besides the weights that change what a checkpoint computes (its architecture, activation,
#: rope, generation defaults, tokenization, image preprocessing): their sha256 is recorded with the
#: weights' (checksums version 2), so an edited ``hidden_act`` or ``rope_theta`` fails verification
MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "chat_template.json",
        "chat_template.jinja",
    }
)
CHECKSUMS_VERSION = 2
#: ecoflap's own documents in a checkpoint (not hashed: validated when read)
DOCUMENT_FILES = frozenset({REPORT_NAME, PLAN_NAME, "scores.json", "README.md"})


def is_model_file(name: str) -> bool:
    """A file whose content changes what the model computes: :data:`MODEL_FILES`, or remote code
    (a top-level ``*.py`` that ``trust_remote_code`` would run)."""
    return name in MODEL_FILES or name.endswith(".py")


def is_checkpoint_file(name: str) -> bool:
    """A name a checkpoint directory's own files use: weights and shard indexes, model files,
    checksums and ecoflap's documents (no output may replace one of them)."""
    return (
        is_weight_file(name)
        or name.endswith(".safetensors")
        or is_model_file(name)
        or name in DOCUMENT_FILES
        or name == CHECKSUMS_NAME
    )


def is_checkpoint_dir(directory: str | Path) -> bool:
    """A directory that holds a model: weights, a config or recorded checksums."""
    directory = Path(directory)
    try:
        names = [entry.name for entry in directory.iterdir()] if directory.is_dir() else []
    except OSError:
        return False
    return any(is_weight_file(n) or n in ("config.json", CHECKSUMS_NAME) for n in names)


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
    directory that cannot be written (:func:`ecoflap_cli.io.atomic.check_output_path`).
    Temporaries of ``out`` left by killed runs are removed
    (:func:`ecoflap_cli.io.atomic.clean_stale`).
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
    with atomic_dir(target, replace=overwrite) as tmp:
        from ecoflap_cli.engine.offload import any_offloaded

        if packed:
            with captured_weights() as state:
                loaded.model.save_pretrained(tmp, max_shard_size=shard_bytes)
        elif any_offloaded(loaded.model):
            save_offloaded(loaded.model, tmp, shard_bytes)
        else:
            loaded.model.save_pretrained(tmp, max_shard_size=shard_bytes)
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

    def keep(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
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


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (shards in index order); [] if none.

    Every file the shard index names must lie inside the directory (no ``../``, absolute path or
    symlink out of it): anything else raises ArtifactError.
    """
    return find_weights(directory)[1]


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
    index, files = find_weights(directory)
    if not files:
        return None
    if (index or files[0]).name.startswith("ecoflap-packed"):
        return "packed"
    packed = any((header_metadata(f) or {}).get("format") == FORMAT_NAME for f in files if f.is_file())
    return "packed" if packed else "dense"


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


def clear_packed_marker(config: Any) -> None:
    """Remove the packed marker from a loaded transformers config (the model in memory is dense)."""
    if getattr(config, "transformers_weights", None) == PACKED_LOAD_HINT:
        delattr(config, "transformers_weights")
    if hasattr(config, PACKED_CONFIG_KEY):
        delattr(config, PACKED_CONFIG_KEY)


# --- integrity --------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _model_files(directory: Path) -> list[Path]:
    """The :func:`is_model_file` files at the top of a checkpoint directory (links followed)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    return [e for e in entries if is_model_file(e.name) and e.is_file() and link_inside(directory, e)]


def _checksummed_files(directory: Path, version: int = CHECKSUMS_VERSION) -> list[Path]:
    index, files = find_weights(directory)
    weights = ([index] if index is not None else []) + files
    return weights + (_model_files(directory) if version >= 2 else [])


def write_checksums(directory: str | Path) -> Path:
    """Record the sha256 of every weight file and shard index, and of every file that changes what
    the model computes (config, generation config, tokenizer, processor: :func:`is_model_file`),
    in ``CHECKSUMS_NAME``."""
    directory = Path(directory)
    files = {f.name: _sha256(f) for f in _checksummed_files(directory)}
    doc = {
        "format": CHECKSUMS_FORMAT,
        "version": CHECKSUMS_VERSION,
        "algorithm": "sha256",
        "files": dict(sorted(files.items())),
    }
    path = directory / CHECKSUMS_NAME
    artifacts.write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return path


def _recorded_checksums(directory: Path) -> dict[str, str] | None:
    recorded = _read_checksums(directory)
    return None if recorded is None else recorded[1]


def _read_checksums(directory: Path) -> tuple[int, dict[str, str]] | None:
    """``(version, files)`` of a checkpoint's checksums file, None when it has none."""
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        raise ArtifactError(f"{path} is not valid JSON") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    valid = isinstance(files, dict) and all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()
    )
    if not (valid and doc.get("format") == CHECKSUMS_FORMAT and doc.get("algorithm") == "sha256"):
        raise ArtifactError(f"{path} is not an ecoflap checksums file")
    version = doc.get("version", 1)  # the first checksums files wrote no version
    if type(version) is not int or not 1 <= version <= CHECKSUMS_VERSION:
        raise ArtifactError(f"{path}: unsupported checksums version {version!r}")
    return version, files  # type: ignore[return-value]


def verify_checksums(directory: str | Path) -> str | None:
    """Check every weight file against the sha256 recorded when the checkpoint was written.

    Returns None when all match, or a note when the checkpoint records no checksums (written by
    an older ecoflap or another tool: nothing to verify). A changed, missing or unrecorded weight
    file raises ArtifactError naming it.
    """
    directory = Path(directory)
    read = _read_checksums(directory)
    if read is None:
        return f"{directory} records no checksums ({CHECKSUMS_NAME}): weights not verified"
    version, recorded = read
    where = directory / CHECKSUMS_NAME
    for name, digest in sorted(recorded.items()):
        path = file_inside(directory, name, where)
        if not path.is_file():
            raise ArtifactError(f"{path}, listed in {CHECKSUMS_NAME}, is missing")
        if _sha256(path) != digest and is_model_file(name):
            raise ArtifactError(
                f"{path} was edited or corrupted: its sha256 differs from the one recorded when the checkpoint was "
                "written, and it changes what the model computes (--no-verify / verify=False skips this check)"
            )
        if _sha256(path) != digest:
            raise ArtifactError(
                f"{path} is corrupted: its sha256 differs from the one recorded when it was written "
                "(eval, inspect and convert skip this check with --no-verify, load_pruned with verify=False)"
            )
    unrecorded = sorted(f.name for f in _checksummed_files(directory, version) if f.name not in recorded)
    if unrecorded:
        raise ArtifactError(f"{directory / unrecorded[0]} has no recorded checksum in {CHECKSUMS_NAME}")
    if version < 2:
        return (
            f"{directory} records checksums of its weights only (written by an older ecoflap): "
            "config.json and the tokenizer not verified"
        )
    return None


def check_integrity(directory: str | Path, verify: bool) -> str:
    """``verified``, ``skipped`` (not ``verify``) or ``unrecorded`` (no checksums to check against);
    a mismatch raises ArtifactError (see :func:`verify_checksums`)."""
    if not verify:
        return "skipped"
    note = verify_checksums(directory)
    if note is None:
        return "verified"
    return "weights verified" if "weights only" in note else "unrecorded"


def is_packed_checkpoint(directory: str | Path) -> bool:
    return Path(directory).is_dir() and checkpoint_layout(directory) == "packed"


def read_document(directory: str | Path, name: str) -> dict[str, Any] | None:
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} is not UTF-8 text (byte at offset {exc.start})") from None
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


#: entries of a checkpoint directory looked at for symlinks before it is copied
_MAX_TREE_ENTRIES = 100_000


def check_links_inside(source: str | Path) -> None:
    """Refuse a checkpoint directory holding a symlink (at any depth) that resolves outside it
    (or outside its hub cache repository's ``blobs/``), or a symlink loop: one ArtifactError line."""
    source = Path(source)
    for count, entry in enumerate(source.rglob("*")):
        if count >= _MAX_TREE_ENTRIES:
            raise ArtifactError(f"{source} holds more than {_MAX_TREE_ENTRIES} entries: not a checkpoint directory")
        if entry.is_symlink() and not (entry.exists() and link_inside(source, entry, nested=True)):
            try:
                to = os.readlink(entry)
            except OSError:
                to = "?"
            raise ArtifactError(
                f"{entry} is a symlink to {to}, outside the checkpoint {source} or to nothing: refused (nothing "
                "outside a checkpoint is read or copied)"
            )


def weight_bytes(directory: str | Path) -> int:
    """Bytes of a checkpoint's weight files on disk."""
    return sum(f.stat().st_size for f in weight_files(directory) if f.is_file())
