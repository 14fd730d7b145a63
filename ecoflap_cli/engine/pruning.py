"""The fine stage: sequential block-by-block layer-wise pruning.

Per tower in the adapter's order: capture the inputs of the tower's first block from the model's
own forward pass (so a later tower sees the already-pruned earlier ones), then for each block
hook its prunable linears to accumulate input statistics, prune each linear to its planned count,
and re-run the pruned block to produce the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ecoflap_cli.core import solvers
from ecoflap_cli.core.methods import RECONSTRUCTION, SOLVERS
from ecoflap_cli.core.registry import Entry
from ecoflap_cli.engine.blockwise import (
    capture_inputs,
    input_statistics,
    module_device,
    run_block,
    to_device,
    trim_host_memory,
)
from ecoflap_cli.engine.offload import editable_weight
from ecoflap_cli.engine.reconstruction import Unit, recording
from ecoflap_cli.errors import PlanError
from ecoflap_cli.models.base import Adapter, Batch, Block, BlockInputs

Progress = Callable[[str], None]


@dataclass
class PruneSettings:
    solver: str = "wanda"
    nm: tuple[int, int] | None = None
    #: tower -> comparison group override ("row" or "matrix") for Wanda / magnitude
    compare_groups: dict[str, str] = field(default_factory=dict)
    #: where calibration activations wait between blocks (None: where they were computed)
    store_device: torch.device | str | None = None
    #: the solver's own parameters (checked against its registry entry)
    solver_settings: dict[str, Any] = field(default_factory=dict)
    #: local reconstruction after each block's masks (a RECONSTRUCTION entry), None: none
    reconstruct: str | None = None
    #: its parameters (checked against its registry entry)
    reconstruct_settings: dict[str, Any] = field(default_factory=dict)
    #: seeds the reconstruction's batch order
    seed: int = 0

    @property
    def entry(self) -> Entry:
        return SOLVERS.get(self.solver)

    @property
    def needs_data(self) -> bool:
        """False for solvers that read no input statistic (magnitude) and no reconstruction."""
        return self.entry.needs is not None or self.reconstruct is not None


@dataclass
class TensorResult:
    name: str
    tower: str
    numel: int
    planned_zeros: int
    zeros: int


def _collect_statistics(
    block: Block, inputs: Sequence[BlockInputs], statistic: str | None, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Run the block on every stored input with hooks that accumulate each linear's statistic."""
    if statistic is None:
        return {}
    empty, update = solvers.STATISTICS[statistic]
    with input_statistics({name: block.linears[name] for name in names}, empty, update) as stats, torch.no_grad():
        for item in inputs:
            run_block(block, item)
    return stats


def prune_linear(
    linear: nn.Linear,
    prune_count: int,
    stat: torch.Tensor | None,
    settings: PruneSettings,
    group: str,
) -> None:
    """Prune one linear in place to exactly ``prune_count`` zeros (or N:M structure)."""
    function = settings.entry.resolve()
    with editable_weight(linear) as weight:
        function(weight, stat, prune_count, group=group, nm=settings.nm, **settings.solver_settings)


def prune_block(
    adapter: Adapter,
    block: Block,
    inputs: Sequence[BlockInputs],
    prune_counts: dict[str, int],
    settings: PruneSettings,
    notes: list[dict[str, Any]] | None = None,
) -> list[TensorResult]:
    """Prune the block's planned linears (then reconstruct it, if asked); ``notes`` collects the
    reconstruction's per-unit records."""
    names = [n for n in block.linears if f"{n}.weight" in prune_counts]
    group = settings.compare_groups.get(block.tower) or adapter.default_compare_group(block)
    recon = RECONSTRUCTION.get(settings.reconstruct) if settings.reconstruct else None
    recorded: AbstractContextManager[list[Unit]] = (
        recording(adapter, block, recon.name, inputs) if recon else nullcontext([])
    )
    with recorded as units:
        stats = _collect_statistics(block, inputs, settings.entry.needs, names)
    check_finite(block, names, stats)
    for name in names:
        count = prune_counts[f"{name}.weight"]
        prune_linear(block.linears[name], count, stats.pop(name, None), settings, group)
    if recon is not None:
        checked = recon.settings(settings.reconstruct_settings)
        done = recon.resolve()(adapter, block, inputs, names, units, seed=settings.seed, **checked)
        if notes is not None:
            notes.extend(done)
    results = []
    for name in names:
        linear = block.linears[name]
        count = prune_counts[f"{name}.weight"]
        with editable_weight(linear) as weight:
            zeros = int((weight == 0).sum())
        results.append(TensorResult(f"{name}.weight", block.tower, linear.weight.numel(), count, zeros))
    return results


def check_finite(block: Block, names: Sequence[str], stats: dict[str, torch.Tensor]) -> None:
    """Refuse, naming the block, NaN or infinite weights in its planned linears, or input statistics
    that are not finite. The statistics are accumulated in float32 (``solvers.PRECISION``), so they
    overflow only where the activations themselves did: a half-precision (float16) forward pass
    whose hidden states exceed 65504, or NaN weights upstream. Pruning on them would pick its masks
    from NaN and save the result as if nothing happened."""
    for name in names:
        with editable_weight(block.linears[name]) as weight:
            if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
                raise PlanError(
                    f"{block.name}: weight {name}.weight holds NaN or infinite values: it cannot be pruned "
                    "(repair or re-export the model)"
                )
        stat = stats.get(name)
        if stat is not None and not bool(torch.isfinite(stat).all()):
            dtype = next(block.module.parameters()).dtype
            hint = (
                " (its activations overflow the float16 range: load the model with --dtype bfloat16 or float32)"
                if dtype == torch.float16
                else " (the activations reaching it are NaN or infinite)"
            )
            raise PlanError(f"{block.name}: the inputs of {name} are not finite in the calibration pass{hint}")


@dataclass
class ResumePoint:
    """Where an interrupted run stopped: the last finished block (``block`` of tower number
    ``tower``, in the adapter's order), the inputs of the block after it (None when that block
    ended its tower), and the results and notes of every finished block."""

    tower: int
    block: int
    inputs: list[BlockInputs] | None
    results: list[TensorResult]
    notes: list[dict[str, Any]]


class Journal(Protocol):
    """Records the sequential pass block by block, so that an interrupted run can resume."""

    def resume_point(self, adapter: Adapter) -> ResumePoint | None:
        """The point to continue from, with every finished block's weights put back; None: start."""

    def block_done(
        self,
        tower: int,
        block: int,
        module: Block,
        next_inputs: list[BlockInputs] | None,
        results: list[TensorResult],
        notes: list[dict[str, Any]],
    ) -> None:
        """Called after each block is pruned (and the next block's inputs are computed)."""


def prune_model(
    adapter: Adapter,
    prune_counts: dict[str, int],
    batches: Sequence[Batch],
    settings: PruneSettings,
    progress: Progress | None = None,
    notes: list[dict[str, Any]] | None = None,
    journal: Journal | None = None,
) -> list[TensorResult]:
    """Prune every planned tensor, tower by tower and block by block; returns per-tensor results
    (``notes`` collects the reconstruction's per-unit records). A ``journal`` records each finished
    block and, when it holds one, continues from an interrupted run's last finished block."""
    notes = [] if notes is None else notes
    start = journal.resume_point(adapter) if journal else None
    results: list[TensorResult] = list(start.results) if start else []
    notes.extend(start.notes if start else [])
    needs_data = settings.needs_data
    for t_index, tower in enumerate(adapter.towers()):
        blocks = adapter.blocks(tower)
        planned = [b for b in blocks if any(t in prune_counts for t in b.tensor_names())]
        if not planned:
            continue
        last = blocks.index(planned[-1])
        first, inputs = 0, []
        if start is not None and t_index <= start.tower:
            if t_index < start.tower or start.block >= last:
                continue  # finished before the interruption
            first = start.block + 1
            inputs = to_device(start.inputs or [], settings.store_device or module_device(blocks[first].module))
        elif needs_data:
            inputs = capture_inputs(adapter, blocks[0], batches, settings.store_device)
        for b_index in range(first, last + 1):
            block = blocks[b_index]
            if progress:
                progress(f"pruning {block.name}")
            results.extend(prune_block(adapter, block, inputs, prune_counts, settings, notes))
            if needs_data and b_index != last:
                inputs = propagate(adapter, block, inputs, settings.store_device)
            if journal:
                journal.block_done(t_index, b_index, block, inputs if b_index != last else None, results, notes)
            trim_host_memory()
    return results


def propagate(
    adapter: Adapter,
    block: Block,
    inputs: Sequence[BlockInputs],
    store: torch.device | str | None,
) -> list[BlockInputs]:
    """Run the (pruned) block on every input; its outputs become the next block's inputs."""
    outputs = []
    with torch.no_grad():
        for item in inputs:
            out = run_block(block, item)
            outputs.append(to_device(adapter.next_inputs(block, out, item), store))
    return outputs
