"""Block-wise machinery shared by the scoring and pruning drivers.

- capture the inputs (args and kwargs) that reach a block during the model's own forward pass;
- run a block on stored inputs;
- replay: make the blocks before block b return a stored output instead of computing, so a
  perturbation of block b costs only the forward from block b on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ecoflap_cli.models.base import Adapter, Batch, Block, BlockInputs


def trim_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Onloading offloaded blocks allocates and frees block-sized buffers over and over; glibc keeps
    the freed chunks, fragmented, so resident memory would creep up by a few blocks' worth per
    block without this.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted activations are captured."""


@contextmanager
def stop_at(module: nn.Module, record: Callable[[Any], None], *, inputs: bool = False) -> Iterator[None]:
    """End any forward pass inside the ``with`` block where it reaches ``module``.

    ``record`` is handed the module's output, or with ``inputs=True`` its ``(args, kwargs)``
    before it runs; then StopForward ends the pass and the ``with`` body, quietly.  The hook is
    removed on exit.  A body that never reaches ``module`` runs to its end.
    """

    def after(_module: nn.Module, _args: tuple, output: Any) -> None:
        record(output)
        raise StopForward

    def before(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        record((args, kwargs))
        raise StopForward

    if inputs:
        handle = module.register_forward_pre_hook(before, with_kwargs=True)
    else:
        handle = module.register_forward_hook(after)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def input_statistics(
    linears: Mapping[Any, nn.Linear],
    empty: Callable[[int, torch.device], torch.Tensor],
    update: Callable[[torch.Tensor, torch.Tensor], object],
) -> Iterator[dict[Any, torch.Tensor]]:
    """The one way statistics of linear inputs are gathered: inside the ``with`` block, every
    forward pass through a linear of ``linears`` updates its statistic (``empty(in_features,
    device)`` to start, ``update(statistic, input)`` per call, in place; its return value is
    ignored); the hooks are removed on exit."""
    stats: dict[Any, torch.Tensor] = {}
    handles = []
    for key, linear in linears.items():
        acc = stats[key] = empty(linear.in_features, module_device(linear))

        def hook(_m: nn.Module, args: tuple, _out: object, acc: torch.Tensor = acc) -> None:
            update(acc, args[0].detach())

        handles.append(linear.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def to_device(obj: Any, device: torch.device | str | None) -> Any:
    """Move every tensor inside nested tuples, lists and dicts; other objects pass through."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(to_device(x, device) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(detach(x) for x in obj)
    if isinstance(obj, list):
        return [detach(x) for x in obj]
    if isinstance(obj, dict):
        return {k: detach(v) for k, v in obj.items()}
    return obj


def module_device(module: nn.Module) -> torch.device:
    """Where a block computes: accelerate's execution device if hooked, else its first weight."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _forward_until(
    adapter: Adapter,
    batches: Sequence[Batch],
    block: Block,
    record: Callable[[Any], None],
    inputs: bool,
    before_each: Callable[[int], None] | None,
) -> None:
    """Run the model on every batch, each pass stopped at ``block`` (see :func:`stop_at`)."""
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if before_each is not None:
                before_each(i)
            with stop_at(block.module, record, inputs=inputs):
                adapter.forward(batch)


def capture_inputs(
    adapter: Adapter,
    block: Block,
    batches: Sequence[Batch],
    store: torch.device | str | None = None,
    before_each: Callable[[int], None] | None = None,
) -> list[BlockInputs]:
    """The (args, kwargs) that reach ``block`` for each batch, stopping the pass right there."""
    captured: list[BlockInputs] = []
    _forward_until(
        adapter, batches, block, lambda got: captured.append(to_device(detach(got), store)), True, before_each
    )
    if len(captured) != len(batches):
        raise RuntimeError(f"block {block.name} was not reached by the model's forward pass")
    return captured


def capture_outputs(
    adapter: Adapter,
    block: Block,
    batches: Sequence[Batch],
    store: torch.device | str | None = None,
    before_each: Callable[[int], None] | None = None,
) -> list[Any]:
    """The output of ``block`` for each batch, stopping the pass right after it."""
    captured: list[Any] = []
    _forward_until(
        adapter, batches, block, lambda got: captured.append(to_device(detach(got), store)), False, before_each
    )
    return captured


def run_block(block: Block, inputs: BlockInputs) -> Any:
    """Run one block on stored inputs, on the block's own device."""
    device = module_device(block.module)
    args, kwargs = to_device(inputs, device)
    return block.module(*args, **kwargs)


@contextmanager
def replaying(modules: Sequence[nn.Module], outputs: Sequence[Any]) -> Iterator[Callable[[int], None]]:
    """Make ``modules`` return ``outputs[i]`` for batch i instead of computing.

    Yields a setter for the current batch index. Each module's previous ``forward`` attribute
    (accelerate may have wrapped it) is put back on exit.
    """
    current = {"index": 0}
    saved = [m.__dict__.get("forward") for m in modules]

    def replay(*_args: Any, **_kwargs: Any) -> Any:
        return outputs[current["index"]]

    for module in modules:
        module.forward = replay  # type: ignore[method-assign]
    try:
        yield lambda i: current.__setitem__("index", i)
    finally:
        for module, old in zip(modules, saved):
            if old is None:
                del module.forward
            else:
                module.forward = old  # type: ignore[method-assign]
