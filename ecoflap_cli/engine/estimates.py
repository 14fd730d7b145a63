"""Memory estimates made before any work, so that a run that cannot fit stops at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ecoflap_cli.engine.blockwise import module_device
from ecoflap_cli.engine.memory import memory_budget_check
from ecoflap_cli.models import Batch, get_adapter


def hidden_sizes(model: torch.nn.Module) -> list[int]:
    """The hidden widths of the model and its sub-configs (text, vision)."""
    config = getattr(model, "config", None)
    sizes = []
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        size = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
        if isinstance(size, int):
            sizes.append(size)
    return sizes or [0]


def activation_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Calibration activations the block-wise driver holds at once: every sample's block input and
    output (2 x samples x tokens x hidden), at the model's precision. An estimate: attention masks
    and a block's own intermediates come on top."""
    itemsize = next(model.parameters()).element_size()
    return 2 * tokens * max(hidden_sizes(model)) * itemsize


def check_activation_memory(model: torch.nn.Module, tokens: int, store: str | None) -> None:
    """Refuse a run whose calibration activations cannot fit, before any work starts."""
    device = torch.device(store) if store else module_device(model)
    memory_budget_check(
        activation_bytes(model, tokens), device, "holding the calibration activations", "--samples or --seqlen"
    )


def zeroth_order_bytes(model: torch.nn.Module, batches: Sequence[Batch]) -> int:
    """What zeroth-order scoring stores across all batches: the replayed block outputs (one set,
    plus the next block's while it is recorded) at the model's precision, and dL/dh at the last
    block in fp32 (one hidden-state set) for the linearized head."""
    tokens = sum(int(b["input_ids"].numel()) for b in batches if "input_ids" in b)
    return activation_bytes(model, tokens) + tokens * max(hidden_sizes(model)) * 4


def check_zeroth_memory(model: torch.nn.Module, batches: Sequence[Batch]) -> None:
    """Refuse zeroth-order scoring whose stored activations cannot fit, before any work starts."""
    memory_budget_check(
        zeroth_order_bytes(model, batches),
        module_device(model),
        "zeroth-order scoring (replayed activations and head gradients)",
        "--samples or --seqlen",
    )


def first_order_bytes(model: torch.nn.Module, batches: Sequence[Batch]) -> int:
    """Estimated extra memory of checkpointed first-order scoring for the largest batch.

    Checkpointed block inputs (one hidden state per block), one block's recomputed activations
    (about 16 hidden-sized tensors), the logits with their gradient in fp32 (3 x tokens x vocab),
    and the largest single weight gradient (gradients are reduced and freed as they arrive).
    """
    tokens = max((int(b["input_ids"].numel()) for b in batches if "input_ids" in b), default=0)
    hidden = max(hidden_sizes(model))
    config = getattr(model, "config", None)
    vocab = getattr(getattr(config, "text_config", None) or config, "vocab_size", 0) or 0
    blocks = len(get_adapter(model).blocks())
    itemsize = next(model.parameters()).element_size()
    largest = max((p.numel() for p in model.parameters()), default=0)
    return tokens * hidden * itemsize * (blocks + 16) + 3 * tokens * vocab * 4 + largest * 4
