"""The fine stage: sequential block-by-block layer-wise pruning.

Per tower in the adapter's order: capture the inputs of the tower's first block from the model's
own forward pass (so a later tower sees the already-pruned earlier ones), then for each block
hook its prunable linears to accumulate input statistics, prune each linear to its planned count,
and re-run the pruned block to produce the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ecoflap_cli.core import solvers
from ecoflap_cli.engine.blockwise import capture_inputs, module_device, run_block, to_device, trim_host_memory
from ecoflap_cli.errors import PlanError
from ecoflap_cli.models.base import Adapter, Batch, Block, BlockInputs
from ecoflap_cli.engine.offload import editable_weight

Progress = Callable[[str], None]


@dataclass
class PruneSettings:
    solver: str = "wanda"
    nm: tuple[int, int] | None = None
    #: tower -> comparison group override ("row" or "matrix") for Wanda / magnitude
    compare_groups: dict[str, str] = field(default_factory=dict)
    #: where calibration activations wait between blocks (None: where they were computed)
    store_device: torch.device | str | None = None
    sparsegpt_block_size: int = 128
    sparsegpt_damp: float = 0.01


@dataclass
class TensorResult:
    name: str
    tower: str
    numel: int
    planned_zeros: int
    zeros: int


def _accumulator(solver: str, linear: nn.Linear) -> torch.Tensor | None:
    device = module_device(linear)
    if solver == "wanda":
        return solvers.empty_col_sq(linear.in_features, device)
    if solver == "sparsegpt":
        return solvers.empty_hessian(linear.in_features, device)
    return None


def _collect_statistics(
    block: Block, inputs: Sequence[BlockInputs], solver: str, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Run the block on every stored input with hooks that accumulate each linear's statistic."""
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        acc = _accumulator(solver, block.linears[name])
        if acc is None:
            continue
        stats[name] = acc
        update = solvers.accumulate_col_sq if solver == "wanda" else solvers.accumulate_hessian

        def hook(_m: nn.Module, args: tuple, _out: object, acc=acc, update=update) -> None:
            update(acc, args[0].detach())

        handles.append(block.linears[name].register_forward_hook(hook))
    if handles:
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
    solver: str,
    stat: torch.Tensor | None,
    settings: PruneSettings,
    group: str,
) -> None:
    """Prune one linear in place to exactly ``prune_count`` zeros (or N:M structure)."""
    with editable_weight(linear) as weight:
        _prune_weight(weight, prune_count, solver, stat, settings, group)


def _prune_weight(
    weight: nn.Parameter,
    prune_count: int,
    solver: str,
    stat: torch.Tensor | None,
    settings: PruneSettings,
    group: str,
) -> None:
    if solver == "sparsegpt":
        assert stat is not None
        new_weight, _mask = solvers.sparsegpt(
            weight, stat, prune_count, nm=settings.nm,
            block_size=settings.sparsegpt_block_size, damp=settings.sparsegpt_damp,
        )
        with torch.no_grad():
            weight.copy_(new_weight.to(weight.dtype))
        return
    if solver == "wanda":
        assert stat is not None
        metric = solvers.wanda_metric(weight, stat)
    elif solver == "magnitude":
        metric = solvers.magnitude_metric(weight)
    else:
        raise PlanError(f"unknown solver {solver!r} (choose from {', '.join(solvers.SOLVERS)})")
    if settings.nm is not None:
        mask = solvers.mask_nm(metric, *settings.nm)
    else:
        mask = solvers.mask_lowest(metric, prune_count, group)  # type: ignore[arg-type]
    solvers.apply_mask(weight, mask)


def prune_block(
    adapter: Adapter,
    block: Block,
    inputs: Sequence[BlockInputs],
    prune_counts: dict[str, int],
    settings: PruneSettings,
) -> list[TensorResult]:
    names = [n for n in block.linears if f"{n}.weight" in prune_counts]
    stats = _collect_statistics(block, inputs, settings.solver, names)
    group = settings.compare_groups.get(block.tower) or adapter.default_compare_group(block)
    results = []
    for name in names:
        linear = block.linears[name]
        count = prune_counts[f"{name}.weight"]
        prune_linear(linear, count, settings.solver, stats.pop(name, None), settings, group)
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
    needs_data = settings.solver != "magnitude"
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
