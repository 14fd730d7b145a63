"""Local reconstruction: after a block's masks are chosen, fit its remaining weights so that its
sub-layers reproduce the dense block's outputs, masks fixed.

A unit is a sub-layer the adapter names (``Adapter.reconstruction_units``: e.g. ``self_attn``
then ``mlp``), or the whole block. For each unit, in the order the block runs them:

1. targets: the dense unit's outputs while the *dense* block runs on the block's calibration
   inputs (the inputs the sequential pruner holds: they come from the already pruned and
   reconstructed blocks before it). They are recorded by hooks during the pass that collects the
   solver's statistics, before any weight is pruned, so they cost no extra forward pass;
2. inputs (``inputs="pruned"``, the default): what the unit actually sees in the pruned block,
   the earlier units already fitted (the block is re-run up to the unit; the first unit's inputs
   are the recorded ones, which the pruning does not change). ``inputs="dense"``: the recorded
   dense-block inputs (every unit fitted on its own, no re-run);
3. Adam fits the kept weights of the unit's pruned linears (and their biases, ``bias``) to the
   targets by mean squared error, in fp32 whatever the model's dtype, one calibration batch (or
   ``batch`` rows of one) per step, in an order drawn from a seeded generator. The step size is
   relative: each tensor's learning rate is ``lr`` times its root-mean-square (a bias: the larger
   of its own and its weight's), so one setting means the same on models whose weights differ in
   scale (Qwen2.5's are about 12 times smaller than SmolLM2's; an absolute rate tuned on one
   destroyed the other). Gradients of pruned weights are masked, and the final weights keep the
   old bits wherever the mask is off, so pruned weights stay zero bit for bit. The result is cast
   back to the model's dtype;
4. a guard: the unit's error on (up to) ``GUARD_PIECES`` calibration pieces is measured before
   and after the fit, and a fit that did not lower it is dropped (the unit keeps its pruned
   weights; the record says ``kept: false``), so a step size that is wrong for some model can
   cost time but never quality on the calibration data.

Norms and everything outside the pruned linears stay as they are. The next block's inputs then
come from the reconstructed block (the pruner's usual pass).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ecoflap_cli.engine.blockwise import detach, module_device, run_block, stop_at, to_device
from ecoflap_cli.engine.offload import materialized
from ecoflap_cli.models.base import Adapter, Block, BlockInputs, hidden_of

#: the precision of the fit, whatever the model's dtype
FIT_DTYPE = torch.float32
#: calibration pieces the guard measures each unit's error on, before and after its fit
GUARD_PIECES = 4


@dataclass
class Unit:
    """One unit of a block and what the dense block showed it: (inputs, output) per call."""

    path: str  # relative to the block; "" is the block itself
    module: nn.Module
    calls: list[tuple[BlockInputs, torch.Tensor]] = field(default_factory=list)


def units_of(adapter: Adapter, block: Block, granularity: str) -> list[Unit]:
    paths = [""] if granularity == "block" else adapter.reconstruction_units(block)
    return [Unit(p, block.module.get_submodule(p) if p else block.module) for p in paths]


@contextmanager
def recording(adapter: Adapter, block: Block, granularity: str, inputs: Sequence[BlockInputs]) -> Iterator[list[Unit]]:
    """Record each unit's inputs and outputs while the (still dense) block runs inside the
    ``with`` body; a body that does not run the block (a solver without statistics) is
    followed by one pass over ``inputs``. Yields the units."""
    units = units_of(adapter, block, granularity)
    handles = []
    for unit in units:

        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any, unit: Unit = unit) -> None:
            unit.calls.append(((detach(args), detach(kwargs)), hidden_of(output).detach()))

        handles.append(unit.module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield units
        if not any(u.calls for u in units):
            with torch.no_grad():
                for item in inputs:
                    run_block(block, item)
    finally:
        for handle in handles:
            handle.remove()


def reconstruct_block(
    adapter: Adapter,
    block: Block,
    inputs: Sequence[BlockInputs],
    names: Sequence[str],
    units: Sequence[Unit],
    *,
    seed: int,
    steps: int,
    lr: float,
    batch: int,
    bias: bool,
    inputs_from: str,
) -> list[dict[str, Any]]:
    """Fit the pruned linears ``names`` of ``block`` unit by unit (see the module docstring);
    returns one record per fitted unit (mean relative error over the first and the last quarter
    of its steps)."""
    records = []
    done: set[str] = set()
    refit_inputs = False  # the first fitted unit sees what the dense block showed it
    with materialized(block.module):
        for unit in units:
            prefix = f"{block.name}.{unit.path}" if unit.path else block.name
            mine = [n for n in names if n not in done and (not unit.path or n.startswith(prefix + "."))]
            if not mine or not unit.calls:  # nothing pruned here, or never run on this data
                continue
            done.update(mine)
            device = module_device(block.module)
            targets = [_fp32(to_device(out, device)) for _, out in unit.calls]
            seen = _unit_inputs(block, unit, inputs) if refit_inputs and inputs_from == "pruned" else []
            if len(seen) != len(targets):  # re-run not asked for, or the unit runs more than once per pass
                seen = [_fp32(to_device(item, device)) for item, _ in unit.calls]
            unit.calls.clear()  # the recorded activations are no longer needed
            trainable = [f"{n}.{kind}" for n in mine for kind in ("weight", "bias") if kind == "weight" or bias]
            fit = _Fit(unit.module, prefix, [t for t in trainable if _has(block, t)], _seed(seed, prefix))
            record = fit.run(_pieces(seen, targets, batch), steps, lr)
            records.append({"block": block.name, "unit": unit.path or "(block)", **record})
            refit_inputs = True
    return records


def _has(block: Block, tensor: str) -> bool:
    linear, _, kind = tensor.rpartition(".")
    return getattr(block.linears[linear], kind, None) is not None


def _seed(seed: int, where: str) -> int:
    """One generator seed per unit: the run's seed mixed with the unit's name."""
    return (seed * 1_000_003 + zlib.crc32(where.encode())) % (1 << 62)


def _fp32(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(FIT_DTYPE) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_fp32(x) for x in obj)
    if isinstance(obj, list):
        return [_fp32(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _fp32(v) for k, v in obj.items()}
    return obj


def _unit_inputs(block: Block, unit: Unit, inputs: Sequence[BlockInputs]) -> list[BlockInputs]:
    """The (args, kwargs) that reach the unit when the block as it is now (earlier units
    fitted) runs on each stored input, in fp32 on the block's device."""
    device = module_device(block.module)
    if unit.module is block.module:
        return [_fp32(to_device(item, device)) for item in inputs]
    captured: list[BlockInputs] = []
    with torch.no_grad():
        for item in inputs:
            got: list[Any] = []
            with stop_at(unit.module, got.append, inputs=True):
                run_block(block, item)
            if got:
                captured.append(_fp32(to_device(detach(got[0]), device)))
    return captured


def _rows(obj: Any, size: int, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor whose first dimension is the batch (``size``).

    1-D tensors (cache positions, lengths) carry no batch dimension and are passed whole."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() >= 2 and obj.shape[0] == size else obj
    if isinstance(obj, tuple):
        return tuple(_rows(x, size, start, stop) for x in obj)
    if isinstance(obj, list):
        return [_rows(x, size, start, stop) for x in obj]
    if isinstance(obj, dict):
        return {k: _rows(v, size, start, stop) for k, v in obj.items()}
    return obj


def _pieces(
    data: Sequence[BlockInputs], targets: Sequence[torch.Tensor], batch: int
) -> list[tuple[BlockInputs, torch.Tensor]]:
    """(inputs, target) per optimizer step: each stored batch whole (``batch`` 0), or cut into
    ``batch`` rows at a time (tensors without the batch dimension, e.g. rotary tables, are shared)."""
    pieces = []
    for item, target in zip(data, targets):
        size = target.shape[0]
        if batch <= 0 or batch >= size:
            pieces.append((item, target))
            continue
        for start in range(0, size, batch):
            stop = min(start + batch, size)
            pieces.append((_rows(item, size, start, stop), target[start:stop]))
    return pieces


class _Fit:
    """One unit's fit: its parameters in fp32, the trainable ones as leaves with masked gradients."""

    def __init__(self, unit: nn.Module, prefix: str, trainable: list[str], seed: int):
        self.unit = unit
        relative = [full[len(prefix) + 1 :] for full in trainable]  # names inside the unit
        self.frozen = {n: p.detach().to(FIT_DTYPE) for n, p in unit.named_parameters()}
        self.frozen.update({n: b.to(FIT_DTYPE) for n, b in unit.named_buffers() if b.is_floating_point()})
        self.leaves = {rel: self.frozen[rel].clone().requires_grad_(True) for rel in relative}
        self.masks = {rel: leaf != 0 for rel, leaf in self.leaves.items() if rel.endswith("weight")}
        for rel, keep in self.masks.items():
            self.leaves[rel].register_hook(lambda grad, keep=keep: grad.masked_fill(~keep, 0.0))
        self.generator = torch.Generator().manual_seed(seed)

    def _forward(self, item: BlockInputs) -> torch.Tensor:
        args, kwargs = item
        return hidden_of(functional_call(self.unit, {**self.frozen, **self.leaves}, tuple(args), dict(kwargs)))

    def _rms(self, rel: str) -> float:
        """The tensor's root-mean-square (a weight: over its kept entries; a bias: the larger of
        its own and its weight's), the unit of its step size."""
        value = self.frozen[rel]
        if rel in self.masks:
            value = value[self.masks[rel]]
        rms = float(value.square().mean().sqrt()) if value.numel() else 0.0
        weight = rel[: -len("bias")] + "weight"
        if rel.endswith("bias") and weight in self.frozen:
            rms = max(rms, float(self.frozen[weight].square().mean().sqrt()))
        return max(rms, 1e-12)

    def _error(self, pieces: list[tuple[BlockInputs, torch.Tensor]], scales: list[float]) -> float:
        with torch.no_grad():
            return sum(
                float(torch.nn.functional.mse_loss(self._forward(item), target)) / scale
                for (item, target), scale in zip(pieces, scales)
            ) / max(len(pieces), 1)

    def run(self, pieces: list[tuple[BlockInputs, torch.Tensor]], steps: int, lr: float) -> dict[str, Any]:
        groups = [{"params": [leaf], "lr": lr * self._rms(rel)} for rel, leaf in self.leaves.items()]
        optimizer = torch.optim.Adam(groups, lr=lr)
        scales = [max(float(target.square().mean()), 1e-30) for _, target in pieces]
        guard = pieces[:GUARD_PIECES]
        before = self._error(guard, scales) if steps > 0 else None
        order: list[int] = []
        errors = []
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(pieces), generator=self.generator).tolist()
            index = order.pop()
            item, target = pieces[index]
            loss = torch.nn.functional.mse_loss(self._forward(item), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for rel, keep in self.masks.items():
                    self.leaves[rel].masked_fill_(~keep, 0.0)
            errors.append(float(loss.detach()) / scales[index])
        after = self._error(guard, scales) if steps > 0 else None
        kept = before is None or after is None or after < before
        if kept:
            self._write()
        window = max(len(errors) // 4, 1)  # the first and last quarter of the steps
        return {
            "weights": sum(int(k.sum()) for k in self.masks.values()),
            "steps": steps,
            "error_first": sum(errors[:window]) / window if errors else None,
            "error_last": sum(errors[-window:]) / window if errors else None,
            "error_before": before,
            "error_after": after,
            "kept": kept,
        }

    def _write(self) -> None:
        """The fitted values into the unit's parameters, in their dtype; pruned weights keep
        their old bits (the masks are exactly where the weights were zero)."""
        with torch.no_grad():
            for rel, leaf in self.leaves.items():
                param = self.unit.get_parameter(rel)
                value = leaf.detach().to(param.dtype)
                if rel in self.masks:
                    value = torch.where(self.masks[rel], value, param.data)
                param.data.copy_(value)
