"""What a checkpoint directory is made of: its file names and layouts (dense or packed), its
documents, and the checksums that cover what the model computes. Read-only knowledge that the
writers (``checkpoint``), the loaders (``loading``, ``pruned``), the output rule and the model
card share; it imports none of them."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ecoflap_cli.errors import ArtifactError
from ecoflap_cli.files import sha256_file, write_atomic
from ecoflap_cli.io.packed import FORMAT_NAME, file_inside, find_weights, is_weight_file, link_inside

REPORT_NAME = "ecoflap_report.json"


PLAN_NAME = "plan.json"


CHECKSUMS_NAME = "ecoflap_checksums.json"


CHECKSUMS_FORMAT = "ecoflap.checksums"


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


def clear_packed_marker(config: Any) -> None:
    """Remove the packed marker from a loaded transformers config (the model in memory is dense)."""
    if getattr(config, "transformers_weights", None) == PACKED_LOAD_HINT:
        delattr(config, "transformers_weights")
    if hasattr(config, PACKED_CONFIG_KEY):
        delattr(config, PACKED_CONFIG_KEY)


def _sha256(path: Path) -> str:
    return sha256_file(path)


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
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
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


def is_eval_results(doc: Any) -> bool:
    """Whether a JSON document is ``ecoflap eval`` output (sparsity rows and a summary)."""
    return isinstance(doc, dict) and "checkpoint" in doc and isinstance(doc.get("summary"), dict) and "blocks" in doc
