"""Evaluation: achieved sparsity against the plan, and perplexity on text.

The vision-language tasks (zero-shot, retrieval, VQA, captioning) live in ``multimodal.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ecoflap_cli.engine.offload import editable_weight
from ecoflap_cli.errors import DataError, ModelError
from ecoflap_cli.models import get_adapter
from ecoflap_cli.models.base import Adapter


@dataclass
class TensorSparsity:
    name: str
    tower: str
    numel: int
    zeros: int
    planned_zeros: int | None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel

    @property
    def matches_plan(self) -> bool | None:
        return None if self.planned_zeros is None else self.zeros == self.planned_zeros


def sparsity_report(adapter: Adapter, plan: dict[str, Any] | None = None) -> list[TensorSparsity]:
    """Zeros of every prunable tensor, beside the planned count when a plan is given."""
    planned = {}
    if plan is not None:
        planned = {t["name"]: int(t["zeros"]) for g in plan["groups"] for t in g["tensors"]}
    rows = []
    for block in adapter.blocks():
        for path, linear in block.linears.items():
            name = f"{path}.weight"
            with editable_weight(linear) as weight:
                zeros = int((weight.detach() == 0).sum())
            rows.append(TensorSparsity(name, block.tower, linear.weight.numel(), zeros, planned.get(name)))
    return rows


def windows_for_eval(tokens: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start of the stream."""
    count = tokens.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: count * seqlen].view(count, seqlen)


def perplexity_model(model: nn.Module, label: str = "the model") -> nn.Module:
    """The causal LM whose perplexity on text ``eval --text`` measures, as the family's adapter
    says (``Adapter.perplexity_module``).

    A decoder-only LM is itself; BLIP-2 / InstructBLIP with a decoder-only language model give
    their ``language_model``, LLaVA itself, each read on text alone (no image). Families with no
    causal LM (CLIP, SigLIP, FlanT5-based BLIP-2) raise ModelError saying so.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        adapter = get_adapter(model)
    except ModelError:
        raise ModelError(f"{label} ({model_type}) is not a causal language model: perplexity does not apply") from None
    try:
        return adapter.perplexity_module()
    except ModelError as err:
        raise ModelError(f"{label} ({model_type}) {err}") from None


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """exp of the mean next-token cross-entropy over all windows (each window scored alone)."""
    # weights all offloaded to disk are on "meta" until their hooks load them: inputs start on cpu
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size].to(device)
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += chunk[:, 1:].numel()
        if progress:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    return math.exp(total_nll / total_tokens)
