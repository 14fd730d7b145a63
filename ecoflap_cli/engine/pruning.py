"""The fine stage: sequential block-by-block layer-wise pruning.

Per tower in the adapter's order: capture the inputs of the tower's first block from the model's
own forward pass (so a later tower sees the already-pruned earlier ones), then for each block
hook its prunable linears to accumulate input statistics, prune each linear to its planned count,
and re-run the pruned block to produce the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ecoflap_cli.core import solvers
from ecoflap_cli.core.methods import SOLVERS
from ecoflap_cli.core.registry import Entry
from ecoflap_cli.engine.blockwise import capture_inputs, module_device, run_block, to_device, trim_host_memory
from ecoflap_cli.engine.offload import editable_weight
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

    @property
    def entry(self) -> Entry:
        return SOLVERS.get(self.solver)

    @property
    def needs_data(self) -> bool:
        """False for solvers that read no input statistic (magnitude): no calibration pass."""
        return self.entry.needs is not None


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
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        linear = block.linears[name]
        acc = stats[name] = empty(linear.in_features, module_device(linear))

        def hook(_m: nn.Module, args: tuple, _out: object, acc: torch.Tensor = acc) -> None:
            update(acc, args[0].detach())

        handles.append(linear.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for item in inputs:
                run_block(block, item)
    finally:
        for handle in handles:
            handle.remove()
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
) -> list[TensorResult]:
    names = [n for n in block.linears if f"{n}.weight" in prune_counts]
    stats = _collect_statistics(block, inputs, settings.entry.needs, names)
    group = settings.compare_groups.get(block.tower) or adapter.default_compare_group(block)
    results = []
    for name in names:
        linear = block.linears[name]
        count = prune_counts[f"{name}.weight"]
        prune_linear(linear, count, stats.pop(name, None), settings, group)
        with editable_weight(linear) as weight:
            zeros = int((weight == 0).sum())
        results.append(TensorResult(f"{name}.weight", block.tower, linear.weight.numel(), count, zeros))
    return results


def prune_model(
    adapter: Adapter,
    prune_counts: dict[str, int],
    batches: Sequence[Batch],
    settings: PruneSettings,
    progress: Progress | None = None,
) -> list[TensorResult]:
    """Prune every planned tensor, tower by tower and block by block; returns per-tensor results."""
    results: list[TensorResult] = []
    needs_data = settings.needs_data
    for tower in adapter.towers():
        blocks = adapter.blocks(tower)
        planned = [b for b in blocks if any(t in prune_counts for t in b.tensor_names())]
        if not planned:
            continue
        inputs: list[BlockInputs] = []
        if needs_data:
            inputs = capture_inputs(adapter, blocks[0], batches, settings.store_device)
        last = blocks.index(planned[-1])
        for block in blocks[: last + 1]:
            if progress:
                progress(f"pruning {block.name}")
            results.extend(prune_block(adapter, block, inputs, prune_counts, settings))
            if needs_data and block is not blocks[last]:
                inputs = propagate(adapter, block, inputs, settings.store_device)
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
