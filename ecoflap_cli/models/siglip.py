"""SigLIP: a ViT image tower and a text transformer, trained with a pairwise sigmoid loss.

Towers, in pruning order: ``vision`` (the ViT encoder layers) and ``text`` (the text encoder
layers). Patch/position/token embeddings, the vision attention-pooling head (its attention and
MLP are outside the encoder layers), the text ``head`` projection, ``logit_scale``,
``logit_bias``, norms and biases stay dense.

The calibration loss is SigLIP's own, ``model(..., return_loss=True)``: every image-text pair
of the batch is a binary "match / no match" problem, so a batch needs at least two pairs for
any negatives (with one pair the loss only pushes that one similarity up).

Text layout: SigLIP was trained on texts padded to the full length of its position table
(``max_position_embeddings``, 64 for the released models) with no attention mask, and it pools
the *last* position, which is usually padding. Any other length gives another embedding, so
every text is padded (or truncated) to that length and no mask is passed, as the model card's
``padding="max_length"`` does; ``max_text_len`` does not apply.

Eval tasks: zero-shot classification and retrieval, as for CLIP. The model's probabilities are
``sigmoid(scale * cos + bias)``, increasing in the cosine similarity, so ranking by cosine gives
the same predictions and recalls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ecoflap_cli.errors import ModelError
from ecoflap_cli.models import register
from ecoflap_cli.models.base import Batch
from ecoflap_cli.models.contrastive import DualEncoderAdapter
from ecoflap_cli.models.layout import tokenizer_of


@register
class SiglipAdapter(DualEncoderAdapter):
    family = "siglip"
    model_types = ("siglip",)
    loader_class = "SiglipModel"
    display_name = "SigLIP"

    def dense_parts(self) -> list[str]:
        return ["patch/position/token embeddings", "vision attention-pooling head", "text head",
                "logit_scale", "logit_bias", "norms", "biases"]  # fmt: skip

    def text_length(self) -> int:
        """The length every text is padded to: the text tower's position table."""
        length = getattr(self.text_config, "max_position_embeddings", None)
        if not length:
            raise ModelError("the SigLIP text config has no max_position_embeddings: cannot lay out text")
        return int(length)

    def text_inputs(self, processor: Any, texts: Sequence[str], max_text_len: int) -> Batch:
        """``input_ids`` only, each padded to :meth:`text_length` (``max_text_len`` is ignored)."""
        length = self.text_length()
        encoded = tokenizer_of(processor)(list(texts), padding="max_length", truncation=True, max_length=length,
                                          return_tensors="pt")  # fmt: skip
        return {"input_ids": encoded["input_ids"]}
