"""The coarse stage: one global importance score per block.

Zeroth-order (forward only): for block g and calibration batch b, draw a seeded direction z,
evaluate the loss at W + eps z and W - eps z, and add |L+ - L-| / (2 eps) to the block's score.
By default the whole block is perturbed at once and the blocks before it are replayed from
stored activations (nothing before block g changes), so a pass costs only the forward from g on.
The reference's cost structure (one tensor at a time, full forward each time) is kept as an
option for comparison.

First-order: backprop with each block's forward checkpointed; gradients are reduced into the
block's score as they arrive and freed at once, so no full set of gradients is ever held.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ecoflap_cli.core.solvers import PRECISION, accumulate_col_sq, empty_col_sq, wanda_metric
from ecoflap_cli.engine.blockwise import (
    capture_inputs,
    capture_outputs,
    input_statistics,
    replaying,
    run_block,
    stop_at,
    trim_host_memory,
)
from ecoflap_cli.engine.pruning import propagate
from ecoflap_cli.errors import PlanError
from ecoflap_cli.models.base import Adapter, Batch, Block

Progress = Callable[[str], None]
METHODS = ("zeroth", "first", "owl")


@dataclass
class ZerothOrderSettings:
    eps: float = 1e-3
    seed: int = 0
    granularity: str = "block"  # "block" or "tensor"
    reuse_activations: bool = True
    perturbations: int = 1
    direction: str = "gaussian"  # "gaussian" or "rademacher"
    #: "central": (L+ - L-) / 2eps, two passes; "forward": (L+ - L0) / eps with L0 shared by
    #: every block of a batch, so about half the passes at an O(eps) bias
    difference: str = "central"
    #: "linearized": the part of the model after the last block (final norm, LM head, loss) is
    #: replaced by its first-order expansion at the unperturbed point, so a perturbed pass stops at
    #: the last block's output h and measures G . h, with G = dL/dh computed once per batch; the
    #: difference quotient is the same directional derivative to the same O(eps^2), without the
    #: head (a third of a SmolLM2 pass). "exact": every pass computes the loss itself (the
    #: reference). "auto": linearized where the adapter's loss depends on the weights only through
    #: the last block's output (causal LMs, T5, BLIP-2, InstructBLIP), exact otherwise (CLIP).
    head: str = "auto"


def seeded_direction(shape: torch.Size, key: tuple[int | str, ...], kind: str) -> torch.Tensor:
    """A perturbation direction (``gaussian`` or ``rademacher``, fp32, on the CPU) seeded by ``key``:
    the same key always gives the same tensor.  Another kind raises PlanError."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, dtype=PRECISION)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=gen).to(PRECISION).mul_(2).sub_(1)
    raise PlanError(f"unknown perturbation direction {kind!r} (gaussian or rademacher)")


@contextmanager
def perturbed(linears: dict[str, nn.Linear], deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the model as if each linear's weight were W + delta, without ever writing W.

    The perturbation enters through a forward hook that adds x @ delta^T (in fp32) to the
    layer's output, which is the exact effect of a weight perturbation on a linear layer. The
    weights stay bit-identical by construction (nothing to restore, no rounding of W + eps*z in
    low precision), and it works the same when accelerate keeps the weights offloaded on CPU or
    disk, or spreads blocks over several devices.
    """
    handles = []
    for name, linear in linears.items():
        on_device: dict[torch.device, torch.Tensor] = {}
        delta = deltas[name]

        def hook(_m: nn.Module, args: tuple, out: torch.Tensor, delta=delta, cache=on_device) -> torch.Tensor:
            if out.device not in cache:
                cache[out.device] = delta.to(device=out.device, dtype=PRECISION)
            x = args[0].to(device=out.device, dtype=PRECISION)
            return out + torch.nn.functional.linear(x, cache[out.device]).to(out.dtype)

        handles.append(linear.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_linears(block: Block) -> dict[str, nn.Linear]:
    """A block's linears keyed by their weight's name (``path.weight``), as plans name tensors."""
    return {f"{path}.weight": lin for path, lin in block.linears.items()}


def _block_weights(block: Block) -> dict[str, torch.Tensor]:
    return {f"{path}.weight": lin.weight for path, lin in block.linears.items()}


def batch_loss(adapter: Adapter, batch: Batch) -> float:
    """The adapter's loss on one batch, without gradients, as a float (computed in PRECISION)."""
    with torch.no_grad():
        return float(adapter.loss(batch).detach().to(PRECISION))


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _final_hidden(adapter: Adapter, batch: Batch, final: Block) -> torch.Tensor:
    """The last block's output for a batch; the forward pass stops there (no head, no loss)."""
    box: list[torch.Tensor] = []
    with torch.no_grad(), stop_at(final.module, lambda output: box.append(_hidden(output).detach())):
        adapter.forward(batch)
    return box[0]


def _head_gradient(adapter: Adapter, batch: Batch, final: Block, split: bool = True) -> torch.Tensor:
    """G = dL/dh at the unperturbed point, h the last block's output (fp32, same device).

    Autograd runs through the head and the loss only: no weight gradients, no block activations.
    The head's backward holds a few logits-sized tensors, so where the adapter says how the batch
    loss weighs its samples (``loss_sample_weights``), G is built one sample at a time: the rows
    of sample k are w_k times the gradient of sample k's own loss, exactly, at 1/batch of the
    memory. Otherwise the whole batch goes at once.
    """
    weights = adapter.loss_sample_weights(batch) if split else None
    if weights is None or len(weights) < 2:
        return _head_gradient_whole(adapter, batch, final)
    size = len(weights)
    parts = []
    for k, w in enumerate(weights):
        sub = {
            key: (v[k : k + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v)
            for key, v in batch.items()
        }
        if w == 0.0:
            parts.append(torch.zeros_like(_final_hidden(adapter, sub, final), dtype=PRECISION))
        else:
            parts.append(_head_gradient_whole(adapter, sub, final).mul_(w))
    return torch.cat(parts)


def _head_gradient_whole(adapter: Adapter, batch: Batch, final: Block) -> torch.Tensor:
    """G for a whole batch in one forward (without autograd up to the last block) and backward."""
    box: list[torch.Tensor] = []

    def swap(_m: nn.Module, _args: tuple, output: Any) -> Any:
        hidden = _hidden(output)
        leaf = hidden.detach().to(PRECISION).requires_grad_(True)
        box.append(leaf)
        torch.set_grad_enabled(True)  # the head and the loss below are differentiated
        new = leaf.to(hidden.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    params = list(adapter.model.parameters())
    flags = [p.requires_grad for p in params]
    handle = final.module.register_forward_hook(swap)
    grad_was = torch.is_grad_enabled()
    try:
        for p in params:
            p.requires_grad_(False)
        torch.set_grad_enabled(False)
        loss = adapter.loss(batch)
        loss.backward()
    finally:
        torch.set_grad_enabled(grad_was)
        handle.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    grad = box[0].grad
    assert grad is not None, "the loss is differentiated through the last block's output"
    return grad.detach()


class _Objective:
    """The scalar a perturbed pass measures: the loss, or its linearization at the last block.

    ``value(batch, i)`` differs between two perturbed passes by the same amount as the loss does
    (to first order in the head, exactly in the blocks), so every finite difference is unchanged.
    """

    def __init__(self, adapter: Adapter, batches: Sequence[Batch], settings: ZerothOrderSettings) -> None:
        if settings.head not in ("auto", "linearized", "exact"):
            raise PlanError(f"unknown head mode {settings.head!r} (auto, linearized or exact)")
        self.adapter = adapter
        self.final: Block | None = None
        linear_ok = adapter.loss_through_last_block
        if settings.head == "linearized" and not linear_ok:
            raise PlanError(
                f"a {adapter.family} loss does not depend on the weights through the last block "
                "alone: use the exact head"
            )
        if settings.head == "linearized" or (settings.head == "auto" and linear_ok):
            self.final = adapter.blocks(adapter.towers()[-1])[-1]
        self.grads = [_head_gradient(adapter, b, self.final) for b in batches] if self.final else []
        self.mode = "linearized" if self.final else "exact"

    def value(self, batch: Batch, index: int) -> float:
        if self.final is None:
            return batch_loss(adapter=self.adapter, batch=batch)
        hidden = _final_hidden(self.adapter, batch, self.final)
        grad = self.grads[index]
        return float((grad.to(device=hidden.device, dtype=torch.float64) * hidden.to(torch.float64)).sum())


def _directional_derivative(
    objective: _Objective,
    batch: Batch,
    index: int,
    weights: dict[str, nn.Linear],
    deltas: dict[str, torch.Tensor],
    eps: float,
    base_value: float | None,
) -> float:
    """(L+ - L-) / 2eps, or (L+ - L0) / eps when the unperturbed value L0 is given."""
    with perturbed(weights, deltas):
        plus = objective.value(batch, index)
    if base_value is not None:
        return (plus - base_value) / eps
    with perturbed(weights, {k: -v for k, v in deltas.items()}):
        minus = objective.value(batch, index)
    return (plus - minus) / (2 * eps)


def _block_estimate(
    objective: _Objective,
    block: Block,
    batch: Batch,
    batch_index: int,
    s: ZerothOrderSettings,
    base_value: float | None = None,
) -> float:
    """Sum over directions (and tensors, per-tensor mode) of |d| for one block and batch."""
    weights = block_linears(block)
    total = 0.0
    for k in range(s.perturbations):
        groups = [[n] for n in weights] if s.granularity == "tensor" else [list(weights)]
        for names in groups:
            deltas = {
                n: s.eps * seeded_direction(weights[n].weight.shape, (s.seed, k, batch_index, n), s.direction)
                for n in names
            }
            sub = {n: weights[n] for n in names}
            total += abs(_directional_derivative(objective, batch, batch_index, sub, deltas, s.eps, base_value))
    return total / s.perturbations


def zeroth_order_scores(
    adapter: Adapter,
    batches: Sequence[Batch],
    settings: ZerothOrderSettings,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Block name -> zeroth-order score. Weights are bit-identical afterwards."""
    if settings.granularity not in ("block", "tensor"):
        raise PlanError(f"unknown perturbation granularity {settings.granularity!r}")
    if settings.eps <= 0 or settings.perturbations < 1:
        raise PlanError("eps must be positive and perturbations at least 1")
    if settings.difference not in ("central", "forward"):
        raise PlanError(f"unknown finite difference {settings.difference!r} (central or forward)")
    objective = _Objective(adapter, batches, settings)
    base = [objective.value(b, i) for i, b in enumerate(batches)] if settings.difference == "forward" else None
    scores: dict[str, float] = {}
    earlier: list[tuple[list[nn.Module], list[Any]]] = []  # replays for finished towers
    for tower in adapter.towers():
        blocks = adapter.blocks(tower)
        previous_out: list[Any] | None = None
        for block in blocks:
            if progress:
                progress(f"scoring {block.name}")
            skipped = [b.module for b in blocks[: block.index]] if settings.reuse_activations else []
            with replays(earlier if settings.reuse_activations else [], skipped, previous_out) as select:
                total = 0.0
                for i, batch in enumerate(batches):
                    select(i)
                    total += _block_estimate(objective, block, batch, i, settings, base[i] if base else None)
                scores[block.name] = total
                check_finite_score(block.name, total, adapter)
                trim_host_memory()
                if settings.reuse_activations:
                    previous_out = capture_outputs(adapter, block, batches, before_each=select)
        if settings.reuse_activations and previous_out is not None:
            earlier.append(([b.module for b in blocks], previous_out))
    return scores


@contextmanager
def replays(
    earlier: list[tuple[list[nn.Module], list[Any]]],
    skipped: list[nn.Module],
    previous_out: list[Any] | None,
) -> Iterator[Callable[[int], None]]:
    """Replay finished towers from their last block's output, and this tower's earlier blocks.

    ``earlier`` holds (modules, outputs per batch) of finished towers; ``skipped`` (this tower's
    blocks before the one being scored) replay ``previous_out`` when both are given.  Yields a
    setter of the batch index that every replay then returns.
    """
    stack = list(earlier)
    if skipped and previous_out is not None:
        stack.append((skipped, previous_out))
    with ExitStack() as contexts:
        setters = [contexts.enter_context(replaying(mods, outs)) for mods, outs in stack]

        def select(index: int) -> None:
            for setter in setters:
                setter(index)

        yield select


# --- first order ------------------------------------------------------------------------------


@contextmanager
def _checkpointed(blocks: Sequence[Block]) -> Iterator[None]:
    """Recompute each block's activations in backward instead of storing them."""
    saved = [b.module.__dict__.get("forward") for b in blocks]
    for b in blocks:
        inner = b.module.forward

        def wrapped(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        b.module.forward = wrapped  # type: ignore[method-assign]
    try:
        yield
    finally:
        for b, old in zip(blocks, saved):
            if old is None:
                del b.module.forward
            else:
                b.module.forward = old  # type: ignore[method-assign]


def first_order_scores(
    adapter: Adapter,
    batches: Sequence[Batch],
    metric: str = "taylor",
    checkpointing: bool = True,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Block name -> first-order score by backprop.

    ``taylor``: sum over weights and batches of |w * dL/dw| (the paper's first-order score).
    ``gradnorm``: sum over batches of the block's gradient L2 norm (what zeroth-order estimates).
    """
    if metric not in ("taylor", "gradnorm"):
        raise PlanError(f"unknown first-order metric {metric!r} (taylor or gradnorm)")
    model = adapter.model
    from ecoflap_cli.engine.offload import any_offloaded

    if any_offloaded(model):
        raise PlanError("first-order scoring needs the weights in memory: use --method zeroth with offloading")
    blocks = adapter.blocks()
    owner = {id(w): b.name for b in blocks for w in _block_weights(b).values()}
    scores = {b.name: 0.0 for b in blocks}
    squares = {b.name: 0.0 for b in blocks}
    was_grad = {id(p): p.requires_grad for p in model.parameters()}
    handles = []

    def reduce(param: torch.Tensor) -> None:
        name = owner[id(param)]
        assert param.grad is not None, "called after the gradient is accumulated"
        grad = param.grad.detach().to(PRECISION)
        if metric == "taylor":
            scores[name] += float((grad * param.detach().to(PRECISION)).abs().sum())
        else:
            squares[name] += float(grad.pow(2).sum())
        param.grad = None

    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in owner)
            if id(p) in owner:
                handles.append(p.register_post_accumulate_grad_hook(reduce))
        with _checkpointed(blocks) if checkpointing else _nothing():
            for i, batch in enumerate(batches):
                if progress:
                    progress(f"backprop batch {i + 1}/{len(batches)}")
                adapter.loss(batch).backward()
                for name in squares:
                    scores[name] += math.sqrt(squares[name]) if metric == "gradnorm" else 0.0
                    squares[name] = 0.0
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(was_grad[id(p)])
            p.grad = None
    for name, value in scores.items():
        check_finite_score(name, value, adapter)
    return scores


def check_finite_score(block: str, value: float, adapter: Adapter) -> None:
    """Refuse, naming the block, a score that is NaN or infinite: the losses or gradients behind it
    overflowed (a float16 forward pass past 65504) or met NaN weights. The score arithmetic itself
    runs in float32; a NaN score would give the allocator nothing to rank."""
    if math.isfinite(value):
        return
    dtype = next(adapter.model.parameters()).dtype
    hint = (
        "its activations overflow the float16 range: load the model with --dtype bfloat16 or float32"
        if dtype == torch.float16
        else "the loss is NaN or infinite on the calibration data"
    )
    raise PlanError(f"{block}: its score is {value} ({hint})")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# --- OWL outlier ratios -----------------------------------------------------------------------


def owl_outlier_ratios(
    adapter: Adapter,
    batches: Sequence[Batch],
    threshold: float = 5.0,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Block name -> share of Wanda scores above ``threshold`` x their layer's mean (OWL).

    Computed on the dense model with dense activations propagated block by block.
    """
    ratios: dict[str, float] = {}
    for tower in adapter.towers():
        blocks = adapter.blocks(tower)
        inputs = capture_inputs(adapter, blocks[0], batches)
        for block in blocks:
            if progress:
                progress(f"outliers {block.name}")
            with input_statistics(block.linears, empty_col_sq, accumulate_col_sq) as stats, torch.no_grad():
                for item in inputs:
                    run_block(block, item)
            for n, stat in stats.items():
                if not bool(torch.isfinite(stat).all()):
                    raise PlanError(f"{block.name}: the inputs of {n} are not finite in the calibration pass")
            outliers = total = 0
            for n, lin in block.linears.items():
                metric = wanda_metric(lin.weight, stats[n])
                outliers += int((metric > threshold * metric.mean()).sum())
                total += metric.numel()
            ratios[block.name] = outliers / max(total, 1)
            inputs = propagate(adapter, block, inputs, None)
    return ratios
