"""The one rule for every output the tool writes (``check_output_path``), checked before any work:
never on or inside an input, never over a checkpoint's own files, no dangling symlink, no name
longer than the file system allows."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ecoflap_cli.errors import ArtifactError

#: bytes ecoflap adds to an output's name for its siblings: ``.NAME.ecoflap-PID@HOST.XXXXXXXX.tmp``
#: (a 7-digit pid, the longest Linux gives, and a 48-character host)
SIBLING_NAME_BYTES = len(".") + len(".ecoflap-") + 7 + 1 + 48 + 1 + 8 + len(".tmp")


#: bytes a checkpoint directory adds below itself (its longest file name and a separator)
_INNER_PATH_BYTES = 96


OUTPUT_KINDS = ("file", "results", "dir")


def _limit(path: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError):
        return default


def _exists(path: Path) -> bool:
    """``path.exists()`` that reads a name too long, or any other OS refusal, as "does not exist"."""
    try:
        return path.exists()
    except OSError:
        return False


def _existing_ancestor(path: Path) -> Path:
    probe = path
    while not _exists(probe) and probe != probe.parent:
        probe = probe.parent
    return probe


def _check_names(output: str, absolute: Path, kind: str) -> None:
    """Every component fits NAME_MAX bytes (the output's own with the siblings ecoflap makes beside
    it), and the path PATH_MAX (with the files a checkpoint holds, for a directory)."""
    anchor = _existing_ancestor(absolute.parent)
    name_max = _limit(anchor, "PC_NAME_MAX", 255)
    path_max = _limit(anchor, "PC_PATH_MAX", 4096)
    for part in absolute.parts[:-1]:
        if len(os.fsencode(part)) > name_max:
            raise ArtifactError(
                f"output {output}: the name {part[:40]!r}... is longer than the file system allows "
                f"({name_max} bytes): choose a shorter one"
            )
    own = len(os.fsencode(absolute.name))
    if own + SIBLING_NAME_BYTES > name_max:
        raise ArtifactError(
            f"output {output}: its name takes {own} bytes; the file system allows {name_max}, and ecoflap "
            f"needs {SIBLING_NAME_BYTES} more for the temporary it writes first: use at most "
            f"{name_max - SIBLING_NAME_BYTES} bytes"
        )
    total = len(os.fsencode(str(absolute))) + SIBLING_NAME_BYTES + (_INNER_PATH_BYTES if kind == "dir" else 0)
    if total >= path_max:
        raise ArtifactError(
            f"output {output}: the path is too long for the file system ({path_max} bytes with what "
            "ecoflap writes beside and inside it): choose a shorter one"
        )


def _check_links(output: str, absolute: Path) -> None:
    """Neither the output nor a directory on its way is a symlink to nothing (or a loop)."""
    for entry in (absolute, *absolute.parents):
        try:
            dangling = entry.is_symlink() and not _exists(entry)
        except OSError:  # a name too long: reported by _check_names
            continue
        if dangling:
            what = "the output" if entry == absolute else f"{entry}, on its path,"
            try:
                to = f" (to {os.readlink(entry)})"
            except OSError:
                to = ""
            raise ArtifactError(f"output {output}: {what} is a dangling symlink{to}: remove it or choose another")


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None


#: entries of an input directory looked at for symlinks (a checkpoint holds tens)
_MAX_INPUT_ENTRIES = 10_000


def _input_files(root: Path) -> list[Path]:
    """What the symlinks inside input directory ``root`` resolve to (a hub cache snapshot's blobs)."""
    targets = []
    for count, entry in enumerate(root.rglob("*")):
        if count >= _MAX_INPUT_ENTRIES:
            break
        if entry.is_symlink():
            target = _resolved(entry)
            if target is not None:
                targets.append(target)
    return targets


def _check_inputs(output: str, out: Path, inputs: Sequence[str | os.PathLike[str]], kind: str) -> None:
    for given in inputs:
        text = os.fspath(given)
        if text in ("", "-") or not Path(text).exists():
            continue  # stdin, a hub id, or an input the command itself will report missing
        root = _resolved(Path(text))
        if root is None:
            continue
        if out == root:
            raise ArtifactError(f"output {output} is the input {text}: choose another output")
        if root in out.parents:
            if kind == "results" and _results_beside(out, root):
                continue
            raise ArtifactError(f"output {output} lies inside the input {text}: choose a path outside it")
        if kind == "dir" and out in root.parents:
            raise ArtifactError(f"output {output} contains the input {text}: choose another output")
        if root.is_dir():
            for target in _input_files(root):
                if out == target or target in out.parents:
                    raise ArtifactError(
                        f"output {output} is a file of the input {text} (a symlink in it points there): "
                        "choose another output"
                    )


def _results_beside(out: Path, root: Path) -> bool:
    """An eval results file may go into the checkpoint it measures: a new ``.json`` name that is
    none of the checkpoint's own files, or an earlier results file it replaces."""
    from ecoflap_cli.io.layout import is_checkpoint_file, is_eval_results

    if out.suffix != ".json" or out.parent != root or is_checkpoint_file(out.name):
        return False
    if not out.exists():
        return True
    try:
        return is_eval_results(json.loads(out.read_bytes()))
    except (OSError, ValueError):
        return False


def _check_checkpoint_files(output: str, out: Path) -> None:
    """A file output never replaces a file a checkpoint directory is made of (its weights, config,
    tokenizer, checksums, documents): the data loss of ``eval CKPT -o CKPT/model.safetensors``."""
    from ecoflap_cli.io.layout import DOCUMENT_FILES, is_checkpoint_dir, is_checkpoint_file

    # a new scores.json or plan.json beside a model is fine; its weights, config, tokenizer or
    # checksums, or an existing document, are the checkpoint's
    document = out.name in DOCUMENT_FILES
    if is_checkpoint_file(out.name) and (not document or _exists(out)) and is_checkpoint_dir(out.parent):
        raise ArtifactError(f"output {output} would replace a file of the checkpoint {out.parent}: choose another name")


def check_output_path(
    output: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]] = (),
    *,
    kind: str = "file",
) -> Path:
    """The one rule for every output the tool writes, checked before any work; returns the path.

    ``kind``: ``file`` (a JSON artifact: scores, plan), ``results`` (eval results, which may go
    into the checkpoint they measure as a new ``.json`` file, never over one of its files) or
    ``dir`` (a checkpoint directory). Refused with one ArtifactError line: an output that is, lies
    inside (or, for a directory, contains) one of ``inputs`` or a file a symlink in one points to
    (symlinks resolved; names that are no local path, such as hub ids, are skipped); a file output
    that would replace a file of a checkpoint directory; a dangling symlink as the output or on its
    path; a name longer than the file system allows (NAME_MAX bytes per component, counting the
    temporary ecoflap writes beside it, and PATH_MAX). ``-`` (stdout) passes.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    text = os.fspath(output)
    if text == "-":
        return Path(text)
    if not text or "\0" in text:
        raise ArtifactError(f"output {text!r} is not a file name")
    absolute = Path(os.path.abspath(text))
    _check_names(text, absolute, kind)
    _check_links(text, absolute)
    out = _resolved(absolute)
    if out is None:
        raise ArtifactError(f"output {text}: its path is a symlink loop")
    _check_inputs(text, out, inputs, kind)
    if kind != "dir":
        _check_checkpoint_files(text, out)
    return Path(text)
