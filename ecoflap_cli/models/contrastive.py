"""Dual encoders (CLIP, SigLIP): an image tower and a text tower trained to match each other.

Shared by the CLIP and SigLIP adapters, which differ in how their text is laid out and in
their loss (softmax vs sigmoid, both computed by the model itself with ``return_loss=True``).

Towers, in pruning order: ``vision`` (the ViT encoder layers) and ``text`` (the text encoder
layers), found structurally below ``vision_model`` and ``text_model``. The loss reads both
towers' outputs, so it does not depend on the weights through the last block alone, and it
compares every image with every text of the batch: a batch needs at least two pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ecoflap_cli.errors import DataError, ModelError
from ecoflap_cli.models.base import Adapter, Batch, Block, Record, RecordText, to_model_device
from ecoflap_cli.models.causal_lm import largest_block_list
from ecoflap_cli.models.t5 import join


class DualEncoderAdapter(Adapter):
    data_kind = "image-text"
    eval_tasks = ("zero_shot", "retrieval")
    min_batch_pairs = 2
    loss_through_last_block = False  # the contrastive loss reads both towers' outputs
    input_keys = ("pixel_values", "input_ids", "attention_mask", "position_ids")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for name in ("vision_model", "text_model"):
            if not isinstance(getattr(model, name, None), nn.Module):
                raise ModelError(f"{type(model).__name__} has no {name}: not a {self.display_name} model")

    def tower_paths(self) -> dict[str, str]:
        return {
            "vision": join("vision_model", largest_block_list(self.model.get_submodule("vision_model"))),
            "text": join("text_model", largest_block_list(self.model.get_submodule("text_model"))),
        }

    def default_compare_group(self, block: Block) -> str:
        # The reference compares Wanda scores over the whole matrix for ViT layers.
        return "matrix" if block.tower == "vision" else "row"

    def check_batch(self, batch: Batch) -> None:
        for key in ("pixel_values", "input_ids"):
            if key not in batch:
                raise DataError(f"a {self.display_name} calibration batch needs {key!r}")

    def model_inputs(self, batch: Batch) -> Batch:
        return to_model_device(self.model, {k: v for k, v in batch.items() if k in self.input_keys})

    def loss(self, batch: Batch) -> torch.Tensor:
        self.check_batch(batch)
        return self.model(**self.model_inputs(batch), return_loss=True).loss

    def calibration_text(
        self, processor: Any, records: Sequence[Record], max_text_len: int, texts: RecordText
    ) -> Batch:
        """Each image's own text (caption, question + answer, or class prompt), as the text tower reads it."""
        return self.text_inputs(processor, [texts.text(r) for r in records], max_text_len)

    def perplexity_module(self) -> nn.Module:
        raise ModelError("is not a causal language model: perplexity does not apply")

    @property
    def text_config(self) -> Any:
        config = self.model.config
        return getattr(config, "text_config", None) or config
