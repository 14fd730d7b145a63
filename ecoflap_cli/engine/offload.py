"""Working with accelerate-placed models: offloaded weights, sequential (one block at a time) maps.

accelerate keeps an offloaded module's weights in a ``weights_map`` (CPU tensors, or files on
disk) and materialises them on the execution device only inside forward. To prune such a module
we materialise its weight, change it, and write the result back into that map.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ecoflap_cli.engine.memory import memory_budget_check  # noqa: F401  (re-exported; lives in memory.py)
from ecoflap_cli.errors import ModelError


def is_offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False))


def _hf_hook(module: nn.Module) -> Any:
    """accelerate's hook, attached at run time (torch's stubs type module attributes as Tensor | Module)."""
    hook: Any = module._hf_hook
    return hook


def any_offloaded(model: nn.Module) -> bool:
    return any(is_offloaded(m) for m in model.modules())


@contextmanager
def editable_weight(linear: nn.Linear) -> Iterator[torch.Tensor]:
    """The linear's weight, materialised; changes made inside persist after the block."""
    if not is_offloaded(linear):
        yield linear.weight
        return
    from accelerate.utils import align_module_device

    with align_module_device(linear):
        yield linear.weight
        _write_back(linear)


@contextmanager
def materialized(module: nn.Module) -> Iterator[None]:
    """Every offloaded weight under ``module`` materialised on its execution device for the whole
    ``with`` body, forward passes included (accelerate would otherwise reload the stored weights
    at each forward); the parameters, changed or not, are written back to their offload storage
    on exit. A no-op for a module that is not offloaded."""
    hooked = [m for m in module.modules() if is_offloaded(m)]
    for m in hooked:
        _hf_hook(m).pre_forward(m)
        _hf_hook(m).offload = False
    try:
        yield
    finally:
        for m in hooked:
            for name, _ in m.named_parameters(recurse=False):
                _write_back(m, name)
            _hf_hook(m).offload = True
            _hf_hook(m).post_forward(m, None)


def _write_back(module: nn.Module, name: str = "weight") -> None:
    from accelerate.utils import offload_weight

    weights_map = _hf_hook(module).weights_map  # PrefixedDataset over the offloaded weights
    key = f"{weights_map.prefix}{name}"
    dataset = weights_map.dataset
    value = getattr(module, name).detach().to("cpu")
    state = getattr(dataset, "state_dict", dataset)
    if isinstance(state, dict) and key in state:
        state[key].copy_(value)  # CPU offload: the map holds the tensor itself
        return
    folder = getattr(dataset, "save_folder", None)
    if folder is None:
        raise ModelError(f"cannot write pruned weight {key} back to its offload storage")
    # Disk offload: write a new .dat file and point the index at it (not at the source checkpoint).
    offload_weight(value, key, folder, index=dataset.index)


def sequential_device_map(model: nn.Module, block_paths: list[str], compute: str, offload: str) -> dict[str, Any]:
    """A device map that keeps every block on ``offload`` ("cpu" or "disk") and the rest on
    ``compute``; with accelerate's hooks each block is onloaded only while it runs."""
    if offload not in ("cpu", "disk"):
        raise ModelError(f"--offload takes cpu or disk, got {offload!r}")
    device_map: dict[str, Any] = {path: offload for path in block_paths}

    def inside_block(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in block_paths)

    for name, module in model.named_modules():
        if inside_block(name) or not name:
            continue
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if own:
            device_map[name] = compute
    return device_map
