"""The output side of one `ecoflap prune`: the write lock, the resume state and the free space.

``PruneOutput`` is entered after the options are checked and before the model is loaded, and
left after the checkpoint is saved:

1. it takes the output's write lock (a second run to the same output stops at once with one
   error line) and says when an interrupted run's state is there;
2. once the model and the calibration batches are loaded, :meth:`PruneOutput.identify` makes the
   run's fingerprint; with ``resume`` a state with the same fingerprint is continued (its plan
   and scores are reused, so a one-shot run does not score again), one with another is refused;
3. :meth:`PruneOutput.check_space` refuses a run whose checkpoint and resume state cannot fit;
4. :attr:`PruneOutput.journal` records each finished block; :meth:`PruneOutput.saved` removes
   the state once the checkpoint is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ecoflap_cli.engine.estimates import activation_bytes
from ecoflap_cli.engine.offload import any_offloaded
from ecoflap_cli.errors import EcoflapError
from ecoflap_cli.files import output_lock
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.checkpoint import check_free_space, estimate_checkpoint_bytes
from ecoflap_cli.io.loading import LoadedModel
from ecoflap_cli.io.resume import ResumeState, batches_hash, fingerprint, state_bytes, weights_hash
from ecoflap_cli.models import Adapter, Batch, Block

Note = Callable[[str], None]


class PruneOutput:
    """See the module docstring. With ``output`` None (a prune kept in memory) it does nothing."""

    def __init__(
        self, output: str | os.PathLike[str] | None, resume: bool, note: Note | None = None, interval: float = 0.0
    ) -> None:
        self.output = None if output is None else Path(output)
        self.resume = resume
        self.note = note or (lambda _text: None)
        self.state = None if self.output is None else ResumeState(self.output, interval)
        self.resumed = False
        self._began = False  # this run started a new state
        self._identity: dict[str, str] | None = None
        self._stack = ExitStack()

    def __enter__(self) -> PruneOutput:
        if self.output is None:
            if self.resume:
                raise EcoflapError("--resume needs an output directory (-o) to resume into")
            return self
        self._stack.enter_context(output_lock(self.output))
        assert self.state is not None
        if self.state.exists() and not self.resume:
            self.note(
                f"note: {self.state.path} holds an interrupted run into {self.output} "
                f"({self.state.describe()}); starting over and replacing it (pass --resume to continue it)"
            )
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        """Release the lock. A run that fails keeps its state only if a block finished (then it
        can resume); one that failed before (a refused plan, say) leaves nothing behind."""
        try:
            if exc_type is not None and self.journal is not None:
                if self.journal.broken:  # a corrupted state: resuming it again would fail again
                    pass
                elif self.journal.finished_blocks():
                    self.note(
                        f"note: {self.journal.finished_blocks()} finished blocks are kept in {self.journal.path}: "
                        "rerun with --resume to continue"
                    )
                elif self._began:  # nothing of this run's own worth keeping
                    self.journal.discard()
        finally:
            self._stack.close()

    @property
    def journal(self) -> ResumeState | None:
        """The prune loop's journal, or None when no state is kept."""
        return self.state if self.state is not None and self.state.enabled and self._identity else None

    def identify(
        self,
        loaded: LoadedModel,
        batches: Sequence[Batch],
        plan: dict[str, Any] | None,
        request: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """Fingerprint the run; with ``resume`` and a matching state, its ``(plan, scores)``.

        ``request`` is the request's identity (``Request.identity``: every field that changes the
        weights, declared once in ``stages.requests``); a given ``plan`` stands for itself by its
        content, the model by its weights, the calibration by its batches. A state with another
        fingerprint raises ArtifactError naming what differs. Offloaded models keep no state.
        """
        if self.state is None:
            return None
        if any_offloaded(loaded.model):
            if self.resume:
                raise EcoflapError("--resume does not work with offloaded models (--offload or an offloading map)")
            self.state.enabled = False
            return None
        # the calibration file's content counts (through the batches), not its path
        parts: dict[str, str | None] = {
            "model": weights_hash(loaded.model),
            "calibration batches": batches_hash(batches),
        }
        parts["plan"] = artifacts.content_hash(plan) if plan is not None else None
        self._identity = fingerprint({**parts, **request})
        if not self.resume:
            return None
        if not self.state.exists():
            self.note(f"note: nothing to resume in {self.state.path}: starting from the first block")
            return None
        self.state.check(self._identity)
        self.resumed = True
        self.note(f"resuming {self.output}: {self.state.describe()}")
        documents = self.state.documents()
        return documents["plan.json"], documents.get("scores.json")

    def check_space(
        self,
        loaded: LoadedModel,
        adapter: Adapter,
        plan: dict[str, Any] | None,
        sparsity: float | None,
        packed: bool,
        source: str | None,
        tokens: int,
    ) -> None:
        """Refuse, before the work, a run whose checkpoint (and resume state) cannot fit on disk.

        Without a plan yet (one-shot, before scoring) every prunable tensor stands at the target
        ``sparsity``: the total is the plan's, which meets the target exactly.
        """
        if self.output is None:
            return
        if plan is not None:
            counts = artifacts.prune_counts(plan)
        else:
            counts = {n: int(t.numel() * (sparsity or 0.0)) for b in adapter.blocks() for n, t in _weights(b)}
        needed = estimate_checkpoint_bytes(loaded.model, counts, packed, source)
        what = f"the {'packed' if packed else 'dense'} checkpoint"
        if self.state is not None and self.state.enabled and not self.resumed:
            stored = estimate_checkpoint_bytes(loaded.model, counts, True, None, weights_only=True)
            needed += state_bytes(stored, activation_bytes(loaded.model, tokens) if tokens else 0)
            what += " and the resume state"
        check_free_space(self.output, needed, what)

    def begin(self, documents: dict[str, dict[str, Any]]) -> None:
        """Start the state of a new run (a resumed run goes on with its own)."""
        if self.state is not None and self._identity is not None and self.state.enabled and not self.resumed:
            self.state.start(self._identity, documents)
            self._began = True

    def saved(self) -> None:
        """The checkpoint is written: the state has served."""
        if self.state is not None:
            if self.state.note:
                self.note(f"note: {self.state.note}")
            self.state.discard()


def _weights(block: Block) -> list[tuple[str, Any]]:
    """(tensor name, weight) of a block's prunable linears."""
    return [(f"{name}.weight", linear.weight) for name, linear in block.linears.items()]
