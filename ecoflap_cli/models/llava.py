"""LLaVA: a CLIP-style vision tower -> multi-modal projector -> a decoder-only language model.

Layout in transformers 5 (``LlavaForConditionalGeneration``): ``model.vision_tower`` (e.g. a
``CLIPVisionModel``), ``model.multi_modal_projector``, ``model.language_model`` (the decoder
without its head) and ``lm_head``. Older releases kept the towers at the top level; both are
found through the attributes, and the block stacks structurally.

Towers, in pruning order: ``vision`` (the vision encoder layers the model reads) and
``language`` (the decoder layers). The projector, patch/position/token embeddings, ``lm_head``,
norms and biases stay dense.

The vision features are the hidden states *after* layer ``vision_feature_layer`` (-2 in the
released models: the second-to-last layer's output). The vision layers after it still run, but
nothing reads their output: a perturbation there cannot change the loss (its zeroth-order score
would be exactly 0, and the allocator would push it to the cap) and Wanda statistics there prune
for nothing. So they are left out of the ``vision`` tower (``affects_output``): unscored,
unpruned, dense. A list of several feature layers is refused: the zeroth-order replay feeds
every skipped block the last one's output, which would corrupt the intermediate layers read.

Everything the loss depends on passes through the last language block, so zeroth-order scoring
may linearize the head after it (``loss_through_last_block``).

Calibration layout: ``[bos] [image]*N prompt caption [eos]`` with labels only on the caption
(and eos) - what ``LlavaProcessor`` builds from ``"<image>" + prompt``, plus the target. N is the
number of image features the model puts in place of the placeholders: the vision tower's
positions (patches, plus the class token when it has one), minus one when
``vision_feature_select_strategy`` is "default" (the class token dropped); 576 for
llava-1.5 at 336 px (``config.image_seq_length``). A row with any other count is refused: the
model would fail on it deep in the forward.

Eval tasks: VQA and captioning with ``generate`` (the prompt is ``[bos] [image]*N prompt``,
left-padded), and ``eval --text``: the perplexity of the whole model on text alone (without
``pixel_values`` LLaVA is its language model and ``lm_head``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ecoflap_cli.errors import DataError, ModelError
from ecoflap_cli.models import register
from ecoflap_cli.models.base import Adapter, Batch, Block, to_model_device
from ecoflap_cli.models.blip2 import image_token_id
from ecoflap_cli.models.causal_lm import largest_block_list
from ecoflap_cli.models.layout import check_token_count, image_grounded_lm_text, pad_id, tokenizer_of
from ecoflap_cli.models.t5 import join, module_path

IMAGE_TOKENS_WHY = "one per image feature, which the model puts in their place (it fails on another count)"


def feature_layers_read(config: Any, num_layers: int) -> int:
    """How many leading vision layers the model reads: those up to ``vision_feature_layer``.

    ``hidden_states[k]`` is the output of layer k-1 (``hidden_states[0]`` the embeddings), so a
    feature layer k (negative: counted from ``num_layers + 1``) reads layers 0 .. k-1.
    """
    layer = getattr(config, "vision_feature_layer", -1)
    if isinstance(layer, (list, tuple)):
        if len(set(layer)) != 1:
            raise ModelError(
                f"vision_feature_layer {list(layer)} reads several vision layers: ecoflap supports one "
                "(its block replay gives the skipped layers the last one's output)"
            )
        layer = layer[0]
    index = int(layer) + num_layers + 1 if int(layer) < 0 else int(layer)
    if not 0 <= index <= num_layers:
        raise ModelError(f"vision_feature_layer {layer} is outside the vision tower's {num_layers} layers")
    return index


@register
class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    loader_class = "LlavaForConditionalGeneration"
    display_name = "LLaVA"
    data_kind = "image-text"
    eval_tasks = ("vqa", "captioning")
    input_keys = ("pixel_values", "input_ids", "attention_mask")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for name in ("vision_tower", "language_model"):
            if not isinstance(getattr(self._inner, name, None), nn.Module):
                raise ModelError(f"{type(model).__name__} has no {name}: not a LLaVA model")
        self.vision_layers_read = feature_layers_read(model.config, len(self._vision_blocks()))

    # --- structure ---------------------------------------------------------------------
    @property
    def _inner(self) -> nn.Module:
        """The module holding the towers: ``model.model`` in transformers 5, the model itself before."""
        inner = getattr(self.model, "model", None)
        return inner if isinstance(inner, nn.Module) and hasattr(inner, "vision_tower") else self.model

    @property
    def vision_tower(self) -> Any:
        return self._inner.vision_tower

    @property
    def language_model(self) -> Any:
        return self._inner.language_model

    def _vision_blocks(self) -> Any:
        return self.vision_tower.get_submodule(largest_block_list(self.vision_tower))

    def tower_paths(self) -> dict[str, str]:
        paths = {}
        if self.vision_layers_read > 0:
            vision = self.vision_tower
            paths["vision"] = join(module_path(self.model, vision), largest_block_list(vision))
        language = self.language_model
        paths["language"] = join(module_path(self.model, language), largest_block_list(language))
        return paths

    def affects_output(self, block: Block) -> bool:
        return block.tower != "vision" or block.index < self.vision_layers_read

    def default_compare_group(self, block: Block) -> str:
        # The reference compares Wanda scores over the whole matrix for ViT layers.
        return "matrix" if block.tower == "vision" else "row"

    def dense_parts(self) -> list[str]:
        parts = ["patch/position embeddings", "multi_modal_projector", "token embeddings", "lm_head",
                 "norms", "biases"]  # fmt: skip
        unread = len(self._vision_blocks()) - self.vision_layers_read
        if unread:
            parts.append(f"the last {unread} vision layer(s), whose output the model does not read")
        return parts

    # --- running -----------------------------------------------------------------------
    def image_tokens(self) -> int:
        """Image placeholder tokens per image: the image features the model inserts for them."""
        config: Any = self.model.config
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        embeddings = getattr(self.vision_tower, "embeddings", None)
        positions = int(getattr(embeddings, "num_positions", side * side))
        drop_class = getattr(config, "vision_feature_select_strategy", "default") == "default"
        return positions - (1 if drop_class else 0)

    def check_batch(self, batch: Batch) -> None:
        for key in ("pixel_values", "input_ids"):
            if key not in batch:
                raise DataError(f"a LLaVA calibration batch needs {key!r}")
        check_token_count(batch["input_ids"], image_token_id(self.model.config), self.image_tokens(), IMAGE_TOKENS_WHY)

    def model_inputs(self, batch: Batch) -> Batch:
        return to_model_device(self.model, {k: v for k, v in batch.items() if k in self.input_keys})

    def loss(self, batch: Batch) -> torch.Tensor:
        self.check_batch(batch)
        if "labels" not in batch:
            raise DataError("a LLaVA calibration batch needs 'labels' for its loss")
        labels = to_model_device(self.model, {"labels": batch["labels"]})["labels"]
        return self.model(**self.model_inputs(batch), labels=labels, **self.no_cache()).loss

    def loss_sample_weights(self, batch: Batch) -> list[float] | None:
        # the caption loss is the mean over every labelled token of the batch, labels shifted by one
        labels = batch.get("labels")
        if labels is None or labels.dim() != 2:
            return None
        counts = (labels[:, 1:] != -100).sum(dim=1).tolist()
        total = sum(counts)
        return [c / total for c in counts] if total else None

    # --- data and evaluation -----------------------------------------------------------
    def prompt_inputs(
        self, processor: Any, pairs: Sequence[tuple[str, str | None]], max_text_len: int, generation: bool
    ) -> Batch:
        """``[bos] [image]*N prompt target [eos]``, labels on ``target [eos]``; see the module doc."""
        config = self.model.config
        tokenizer = tokenizer_of(processor)
        image = [image_token_id(config)] * self.image_tokens()
        batch = image_grounded_lm_text(tokenizer, pairs, max_text_len, image, image_first=False,
                                       pad_value=pad_id(tokenizer, config), generation=generation)  # fmt: skip
        check_token_count(batch["input_ids"], image[0], len(image), IMAGE_TOKENS_WHY)
        return batch

    def perplexity_module(self) -> nn.Module:
        """The model itself: without ``pixel_values`` it is its language model and ``lm_head``."""
        return self.model
