"""Decoder-only causal LMs (LLaMA family, OPT, Mistral, Qwen, GPT-NeoX, ...).

The decoder blocks are found from the module structure: the ModuleList of identical blocks that
holds the most linear weights. No model-name strings.
"""

from __future__ import annotations

import torch
from torch import nn

from ecoflap_cli.errors import ModelError
from ecoflap_cli.models.base import Adapter, Batch


def largest_block_list(model: nn.Module) -> str:
    """Path of the ModuleList of same-class children holding the most nn.Linear weights."""
    best_path, best_size = "", 0
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
        if size > best_size:
            best_path, best_size = path, size
    if not best_path:
        raise ModelError("no stack of transformer blocks with linear layers found in the model")
    return best_path


class CausalLMAdapter(Adapter):
    family = "causal-lm"
    data_kind = "text"
    one_shot_allocator = "search"

    def tower_paths(self) -> dict[str, str]:
        return {"language": largest_block_list(self.model)}

    def loss(self, batch: Batch) -> torch.Tensor:
        inputs = self.model_inputs(batch)
        labels = batch.get("labels", batch["input_ids"])
        return self.model(**inputs, labels=labels, **self.no_cache()).loss

    def loss_sample_weights(self, batch: Batch) -> list[float] | None:
        # the causal-LM loss is the mean over every predicted token of the batch: labels shifted
        # by one, -100 ignored; so sample k weighs (its predicted tokens) / (the batch's)
        labels = batch.get("labels", batch["input_ids"])
        counts = (labels[:, 1:] != -100).sum(dim=1).tolist()
        total = sum(counts)
        return [c / total for c in counts] if total else None
