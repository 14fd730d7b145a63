"""CLIP: a ViT image tower and a text transformer, trained with a symmetric contrastive loss.

Towers, in pruning order: ``vision`` (the ViT encoder layers) and ``text`` (the text encoder
layers). Patch/position/token embeddings, the pre/post layer norms and the visual and text
projections stay dense. The calibration loss is CLIP's own: ``model(..., return_loss=True)``,
the mean of the image->text and text->image cross-entropies over the batch's similarity
matrix, so a batch needs at least two distinct image-text pairs (with one the loss is 0).
"""

from __future__ import annotations

import torch
from torch import nn

from ecoflap_cli.errors import DataError, ModelError
from ecoflap_cli.models import register
from ecoflap_cli.models.base import Adapter, Batch, Block
from ecoflap_cli.models.blip2 import to_model_device
from ecoflap_cli.models.causal_lm import largest_block_list
from ecoflap_cli.models.t5 import join


@register("clip")
class CLIPAdapter(Adapter):
    family = "clip"
    data_kind = "image-text"
    loss_through_last_block = False  # the contrastive loss reads both towers' outputs
    input_keys = ("pixel_values", "input_ids", "attention_mask", "position_ids")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for name in ("vision_model", "text_model"):
            if not isinstance(getattr(model, name, None), nn.Module):
                raise ModelError(f"{type(model).__name__} has no {name}: not a CLIP model")

    def tower_paths(self) -> dict[str, str]:
        return {
            "vision": join("vision_model", largest_block_list(self.model.vision_model)),
            "text": join("text_model", largest_block_list(self.model.text_model)),
        }

    def default_compare_group(self, block: Block) -> str:
        return "matrix" if block.tower == "vision" else "row"

    def dense_parts(self) -> list[str]:
        return ["patch/position/token embeddings", "visual_projection", "text_projection",
                "logit_scale", "norms", "biases"]  # fmt: skip

    def check_batch(self, batch: Batch) -> None:
        for key in ("pixel_values", "input_ids"):
            if key not in batch:
                raise DataError(f"a CLIP calibration batch needs {key!r}")

    def model_inputs(self, batch: Batch) -> Batch:
        return to_model_device(self.model, {k: v for k, v in batch.items() if k in self.input_keys})

    def loss(self, batch: Batch) -> torch.Tensor:
        self.check_batch(batch)
        return self.model(**self.model_inputs(batch), return_loss=True).loss
