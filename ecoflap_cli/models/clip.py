"""CLIP: a ViT image tower and a text transformer, trained with a symmetric contrastive loss.

Towers, in pruning order: ``vision`` (the ViT encoder layers) and ``text`` (the text encoder
layers). Patch/position/token embeddings, the pre/post layer norms and the visual and text
projections stay dense. The calibration loss is CLIP's own: ``model(..., return_loss=True)``,
the mean of the image->text and text->image cross-entropies over the batch's similarity
matrix, so a batch needs at least two distinct image-text pairs (with one the loss is 0).

Text is padded to the batch's longest and masked; CLIP pools it at the eos token, so the ids
must contain it. Eval tasks: zero-shot classification and image-text retrieval (cosine
similarity of the projected, normalised features). The processor brings an image processor
and the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ecoflap_cli.errors import DataError
from ecoflap_cli.models import register
from ecoflap_cli.models.base import Batch
from ecoflap_cli.models.contrastive import DualEncoderAdapter
from ecoflap_cli.models.layout import tokenizer_of


@register
class CLIPAdapter(DualEncoderAdapter):
    family = "clip"
    model_types = ("clip",)
    loader_class = "CLIPModel"
    display_name = "CLIP"

    def dense_parts(self) -> list[str]:
        return ["patch/position/token embeddings", "visual_projection", "text_projection",
                "logit_scale", "norms", "biases"]  # fmt: skip

    def text_inputs(self, processor: Any, texts: Sequence[str], max_text_len: int) -> Batch:
        """Padded to the longest text (at most the position table), with its attention mask."""
        text_config = self.text_config
        limit = getattr(text_config, "max_position_embeddings", None)
        length = min(max_text_len, limit) if limit else max_text_len
        encoded = tokenizer_of(processor)(list(texts), padding=True, truncation=True, max_length=length,
                                          return_tensors="pt")  # fmt: skip
        input_ids = encoded["input_ids"]
        eos = getattr(text_config, "eos_token_id", None)
        # CLIP pools the text at its eos token (configs with eos_token_id == 2 use argmax instead)
        if eos is not None and eos != 2 and not bool((input_ids == eos).any(dim=-1).all()):
            raise DataError(
                f"CLIP text ids must contain the eos token {eos} (the text is pooled there); the "
                "tokenizer does not add it"
            )
        return {"input_ids": input_ids, "attention_mask": encoded["attention_mask"]}
