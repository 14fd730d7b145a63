"""Resume state of `ecoflap prune`: an interrupted run continues from its last finished block.

The sequential pass writes, beside the output ``NAME``, a directory ``.NAME.ecoflap-resume/``:

- ``state.json``: the run's fingerprint (model, plan or one-shot request, solver and its
  settings, calibration batches, seed, ecoflap version) and the plan and scores documents,
  written once before the first block;
- ``blocks/T-B.safetensors``: the parameters and buffers of finished block ``B`` of tower ``T``
  (packed where smaller, which is lossless), one file per block;
- ``inputs-N.safetensors``: the tensors of the next block's inputs (their nesting of tuples,
  lists and dicts is in ``progress.json``);
- ``progress.json``: the last finished block, the inputs file and the results so far, and the
  sha256 of every block and inputs file it names (checked before they are read back: a changed
  file is refused, never resumed from); it is replaced atomically after each block and names only
  files already complete, so a kill at any moment leaves a state that resumes from the block before.

Resuming puts the finished blocks' saved tensors back into the freshly loaded model, the saved
inputs in front of the next block, and runs the rest as an uninterrupted run would, so the
weights come out bit-identical. The state is removed once the checkpoint is saved. Nothing in it
is unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ecoflap_cli import __version__
from ecoflap_cli.engine.pruning import ResumePoint, TensorResult
from ecoflap_cli.errors import ArtifactError
from ecoflap_cli.files import atomic_file, sha256_file, write_atomic
from ecoflap_cli.io.packed import load_packed, save_packed
from ecoflap_cli.models.base import Adapter, Batch, Block, BlockInputs

STATE_FORMAT = "ecoflap.resume"
STATE_VERSION = 1


def state_dir(output: str | Path) -> Path:
    """Where the resume state of output ``output`` lives (a hidden sibling)."""
    out = Path(output)
    return out.with_name(f".{out.name}.ecoflap-resume")


# --- fingerprints -----------------------------------------------------------------------------


def _tensor_digest(digest: Any, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}:{str(tensor.dtype)}:{tuple(tensor.shape)};".encode())
    if tensor.device.type != "meta" and tensor.numel():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of every parameter's name, dtype, shape and every byte of its values: a resume state
    is tied to these very weights (a change anywhere in a tensor counts), not just to the
    model's structure."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        _tensor_digest(digest, name, param)
    return digest.hexdigest()[:16]


def batches_hash(batches: Sequence[Batch]) -> str:
    """A hash of the calibration batches' every tensor (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for i, batch in enumerate(batches):
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                tensor = value.detach().to("cpu").contiguous()
                digest.update(f"{i}.{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
                digest.update(tensor.view(torch.uint8).reshape(-1).numpy().tobytes())
            else:
                digest.update(f"{i}.{key}={value!r};".encode())
    return digest.hexdigest()[:16]


def fingerprint(parts: dict[str, Any]) -> dict[str, str]:
    """Each part of a run's identity hashed on its own (so a refusal can name what differs)."""
    return {
        key: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
        for key, value in {**parts, "ecoflap": __version__}.items()
    }


# --- block inputs as safetensors + JSON ------------------------------------------------------


class Unstorable(Exception):
    """A block input holds an object that the state cannot store without pickling."""


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    """``obj`` as JSON, each tensor replaced by the key it is stored under in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        key = f"t{len(tensors)}"
        # safetensors refuses tensors sharing memory: store such a view as its own copy
        tensors[key] = t.contiguous() if ptr is None or ptr not in seen else t.clone().contiguous()
        if ptr is not None:
            seen.setdefault(ptr, key)
        return {"tensor": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, (tuple, list)):
        return {type(obj).__name__: [_flatten(x, tensors, seen) for x in obj]}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"dict": [[k, _flatten(v, tensors, seen)] for k, v in obj.items()]}
    raise Unstorable(type(obj).__name__)


def _unflatten(spec: Any, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, value), *_ = spec.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "value":
        return value
    if kind == "dtype":
        return getattr(torch, value)
    if kind == "tuple":
        return tuple(_unflatten(x, tensors) for x in value)
    if kind == "list":
        return [_unflatten(x, tensors) for x in value]
    return {k: _unflatten(v, tensors) for k, v in value}


# --- the state --------------------------------------------------------------------------------


class ResumeState:
    """The resume state of one output; also the prune loop's journal (see engine.pruning.Journal).

    ``open`` it for a run: with ``resume``, an existing state whose fingerprint matches is kept
    and continued (a different fingerprint raises ArtifactError); otherwise any existing state
    is replaced.
    """

    def __init__(self, output: str | Path, interval: float = 0.0) -> None:
        self.path = state_dir(output)
        #: seconds of work between checkpoints of the state (0: after every block)
        self.interval = interval
        self._pending: list[tuple[int, int, Block]] = []
        self._last_flush = time.monotonic()
        self.enabled = True
        self.broken = False  # a file of the state failed its checksum: resuming it again cannot work
        self.note: str | None = None  # why the state stopped being written, if it did
        self._progress: dict[str, Any] | None = None

    # reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "state.json").is_file()

    def _read_json(self, name: str) -> dict[str, Any] | None:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError):
            raise ArtifactError(f"resume state {path} is unreadable: run without --resume to start over") from None
        if not isinstance(doc, dict):
            raise ArtifactError(f"resume state {path} is not an ecoflap resume state")
        seal = doc.pop("seal", None)
        if seal != _seal_of(doc):
            self.broken = True
            raise ArtifactError(
                f"resume state file {path} was changed after it was written (its seal does not match): "
                "run without --resume to start over"
            )
        return doc

    def describe(self) -> str:
        """Where the state stands, in words (for the note that an unresumed state is discarded)."""
        progress = self._read_json("progress.json") if self.exists() else None
        if not progress:
            return "no block finished yet"
        return f"{progress['done']} blocks finished, the last {progress['name']}"

    def finished_blocks(self) -> int:
        """Blocks this run (or the run it resumes) has finished and recorded."""
        return int(self._progress["done"]) if self._progress else 0

    def documents(self) -> dict[str, dict[str, Any]]:
        """The plan and scores documents the interrupted run worked from."""
        state = self._read_json("state.json") or {}
        return dict(state.get("documents") or {})

    def check(self, identity: dict[str, str]) -> None:
        """Refuse to resume a state made by a run with another fingerprint, naming what differs."""
        state = self._read_json("state.json")
        if state is None or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ArtifactError(f"{self.path} is not an ecoflap resume state: run without --resume to start over")
        recorded = state.get("fingerprint") or {}
        differs = sorted(k for k in identity.keys() | recorded.keys() if identity.get(k) != recorded.get(k))
        if differs:
            raise ArtifactError(
                f"cannot resume: the interrupted run into {self.path.name[1:].removesuffix('.ecoflap-resume')} "
                f"had another {', '.join(differs)}; rerun with the same options, or without --resume to start over"
            )
        self._progress = self._read_json("progress.json")
        if self._progress is not None and not isinstance(self._progress.get("sha256"), dict):
            self.broken = True
            raise ArtifactError(f"resume state {self.path} records no checksums: run without --resume to start over")

    # writing ---------------------------------------------------------------------------
    def start(self, identity: dict[str, str], documents: dict[str, dict[str, Any]]) -> None:
        """Begin a new state (replacing any), recording the fingerprint and the documents."""
        self.discard()
        (self.path / "blocks").mkdir(parents=True)
        doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": identity, "documents": documents}
        write_atomic(self.path / "state.json", _sealed(doc))
        self._progress = None
        self._pending = []
        self._last_flush = time.monotonic()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def resume_point(self, adapter: Adapter) -> ResumePoint | None:
        """Put every finished block's tensors back into the model; the point to continue from."""
        progress = self._progress
        if not progress:
            return None
        towers = adapter.towers()
        for t_index, b_index in progress["finished"]:
            block = adapter.blocks(towers[t_index])[b_index]
            restore_block(block, load_packed(self._checked(f"blocks/{t_index}-{b_index}.safetensors"))[0])
        inputs = None
        if progress["inputs"] is not None:
            tensors = load_file(self._checked(progress["inputs"]))
            inputs = _unflatten(progress["inputs_spec"], tensors)
        results = [TensorResult(**r) for r in progress["results"]]
        return ResumePoint(progress["tower"], progress["block"], inputs, results, list(progress["notes"]))

    def block_done(
        self,
        tower: int,
        block: int,
        module: Block,
        next_inputs: list[BlockInputs] | None,
        results: list[TensorResult],
        notes: list[dict[str, Any]],
    ) -> None:
        """A block is finished. The state is checkpointed when ``interval`` seconds of work have
        passed since the last checkpoint (every block with interval 0): the finished blocks'
        tensors, the next inputs, then (atomically) the progress. Finished blocks are never
        touched again by the sequential pass, so writing them later writes the same bytes."""
        if not self.enabled:
            return
        self._pending.append((tower, block, module))
        if self.interval > 0 and time.monotonic() - self._last_flush < self.interval:
            return
        self._flush(tower, block, module, next_inputs, results, notes)

    def _flush(
        self,
        tower: int,
        block: int,
        module: Block,
        next_inputs: list[BlockInputs] | None,
        results: list[TensorResult],
        notes: list[dict[str, Any]],
    ) -> None:
        previous = self._progress or {"finished": [], "done": 0, "inputs": None, "seq": 0}
        digests = {k: v for k, v in (previous.get("sha256") or {}).items() if k != previous["inputs"]}
        for t_index, b_index, finished in self._pending:
            block_file = f"blocks/{t_index}-{b_index}.safetensors"
            save_packed(block_tensors(finished), self.path / block_file)
            digests[block_file] = sha256_file(self.path / block_file)
        seq = previous["seq"] + 1
        inputs_name, spec = None, None
        if next_inputs is not None:
            tensors: dict[str, torch.Tensor] = {}
            try:
                spec = _flatten(next_inputs, tensors, {})
            except Unstorable as exc:
                self.enabled = False
                self.note = f"block inputs hold a {exc} object: no resume state is kept for this run"
                self.discard()
                return
            inputs_name = f"inputs-{seq}.safetensors"
            with atomic_file(self.path / inputs_name) as tmp:
                save_file(tensors, tmp)
            digests[inputs_name] = sha256_file(self.path / inputs_name)
        progress = {
            "tower": tower,
            "block": block,
            "name": module.name,
            "done": previous["done"] + len(self._pending),
            "finished": [*previous["finished"], *([t, b] for t, b, _m in self._pending)],
            "inputs": inputs_name,
            "inputs_spec": spec,
            "results": [asdict(r) for r in results],
            "notes": notes,
            "seq": seq,
            "sha256": digests,
        }
        write_atomic(self.path / "progress.json", _sealed(progress))
        if previous["inputs"] is not None:
            (self.path / previous["inputs"]).unlink(missing_ok=True)
        self._progress = progress
        self._pending = []
        self._last_flush = time.monotonic()

    def _checked(self, name: str) -> Path:
        """The state file ``name``, after checking it against the sha256 recorded when it was written
        (states written before checksums were recorded are read as they are)."""
        path = self.path / name
        expected = ((self._progress or {}).get("sha256") or {}).get(name)
        if expected is not None and (not path.is_file() or sha256_file(path) != expected):
            self.broken = True
            raise ArtifactError(
                f"resume state file {path} is missing or corrupted (its sha256 differs from the one recorded): "
                "run without --resume to start over"
            )
        return path


def _seal_of(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _sealed(doc: dict[str, Any]) -> bytes:
    """``doc`` as JSON with a ``seal``: the sha256 of its canonical form, checked on every read, so
    an edited state file is refused rather than resumed."""
    return json.dumps({**doc, "seal": _seal_of(json.loads(json.dumps(doc, default=str)))}, default=str).encode()


def block_tensors(block: Block) -> dict[str, torch.Tensor]:
    """A block's parameters and buffers on the CPU (tied ones once, under their first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in block.module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def restore_block(block: Block, saved: dict[str, torch.Tensor]) -> None:
    """Copy a block's saved tensors back into it (exactly: same dtype, same shape)."""
    current = block.module.state_dict(keep_vars=True)
    missing = sorted(set(saved) - current.keys())
    if missing:
        raise ArtifactError(f"resume state does not match block {block.name} (no {missing[0]}): start over")
    with torch.no_grad():
        for name, tensor in saved.items():
            target = current[name]
            if target.shape != tensor.shape or target.dtype != tensor.dtype:
                raise ArtifactError(f"resume state does not match {block.name}.{name}: start over")
            target.copy_(tensor)


def state_bytes(checkpoint_bytes: int, activation_bytes: int) -> int:
    """Disk the resume state needs at most: the finished blocks (no more than the checkpoint's
    weights) and two sets of block inputs (the next one is written before the last is removed)."""
    return checkpoint_bytes + activation_bytes
