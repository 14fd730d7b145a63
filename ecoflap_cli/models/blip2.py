"""BLIP-2 and InstructBLIP: ViT -> Q-Former -> projection -> language model (OPT, LLaMA, FlanT5).

Towers, in pruning order:

- ``vision``: the ViT encoder layers (each attention has one fused ``qkv`` linear, kept as one
  prunable tensor);
- ``qformer``: the Q-Former layers, only when the adapter is built with ``include_qformer=True``;
- the language model: ``language`` (the decoder layers of a decoder-only LM, found structurally)
  or, for FlanT5, ``language-encoder`` and ``language-decoder``.

Everything else stays dense: patch/position embeddings, the query tokens, the Q-Former (unless
opted in), ``language_projection``, token embeddings, ``lm_head``, norms and the T5 relative
attention bias.

The loss is the model's image-grounded LM loss: a decoder-only LM sees
``[image tokens] [bos] prompt caption [eos]`` with labels only on the caption (and eos); FlanT5
reads ``[image tokens] prompt [eos]`` in the encoder and is trained to produce ``caption [eos]``.
transformers silently *ignores the image* when ``input_ids`` lack the ``num_query_tokens`` image
placeholder tokens, so every batch is checked for them before it reaches the model.

Eval tasks: VQA and captioning with ``generate``; ``eval --text`` measures the perplexity of the
decoder-only language model on text alone (a FlanT5 model has no causal LM to measure). The
processor must bring an image processor and the LM tokenizer; InstructBLIP's also a Q-Former
tokenizer, which reads the prompt (the instruction) for the Q-Former.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ecoflap_cli.errors import DataError, ModelError
from ecoflap_cli.models import register
from ecoflap_cli.models.base import Adapter, Batch, Block, BlockInputs, to_model_device
from ecoflap_cli.models.causal_lm import largest_block_list
from ecoflap_cli.models.layout import (
    IGNORE_INDEX,
    check_token_count,
    encode,
    image_grounded_lm_text,
    mask,
    pad,
    pad_id,
    tokenizer_of,
)
from ecoflap_cli.models.t5 import join, module_path, t5_next_inputs, t5_tower_paths

__all__ = ["Blip2Adapter", "InstructBlipAdapter", "check_image_tokens", "image_token_id", "to_model_device"]


def image_token_id(config: Any) -> int:
    """The id of the image placeholder token (``config.image_token_index``)."""
    token = getattr(config, "image_token_index", None)
    if token is None:
        token = getattr(config, "image_token_id", None)
    if token is None:
        raise ModelError(
            "the model config has no image_token_index: transformers would ignore the image; "
            "set config.image_token_index to the processor's image token id"
        )
    return int(token)


def check_image_tokens(config: Any, input_ids: torch.Tensor) -> None:
    """Every row must hold exactly ``num_query_tokens`` image placeholder tokens."""
    check_token_count(
        input_ids,
        image_token_id(config),
        int(config.num_query_tokens),
        "one per query token (config.num_query_tokens); without them the model ignores the image",
    )


@register
class Blip2Adapter(Adapter):
    family = "blip-2"
    model_types = ("blip-2",)
    loader_class = "Blip2ForConditionalGeneration"
    #: one name for both: BLIP-2 and InstructBLIP share their data layout and tasks
    display_name = "BLIP-2 / InstructBLIP"
    data_kind = "image-text"
    eval_tasks = ("vqa", "captioning")
    #: batch keys the model's forward accepts (anything else in a batch is ignored)
    input_keys: tuple[str, ...] = ("pixel_values", "input_ids", "attention_mask", "decoder_input_ids",
                  "decoder_attention_mask")  # fmt: skip

    def __init__(self, model: nn.Module, include_qformer: bool = False) -> None:
        super().__init__(model)
        self.include_qformer = include_qformer
        for name in ("vision_model", "qformer", "language_model"):
            if not isinstance(getattr(model, name, None), nn.Module):
                raise ModelError(f"{type(model).__name__} has no {name}: not a BLIP-2-style model")

    # --- structure ---------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.get_submodule("language_model")

    @property
    def seq2seq(self) -> bool:
        """True when the language model is an encoder-decoder (FlanT5)."""
        use_decoder_only = getattr(self.model.config, "use_decoder_only_language_model", None)
        if use_decoder_only is not None:
            return not use_decoder_only
        return bool(getattr(self.language_model.config, "is_encoder_decoder", False))

    def tower_paths(self) -> dict[str, str]:
        model = self.model
        paths = {"vision": join("vision_model", largest_block_list(model.get_submodule("vision_model")))}
        if self.include_qformer:
            paths["qformer"] = join("qformer", largest_block_list(model.get_submodule("qformer")))
        if self.seq2seq:
            paths.update(t5_tower_paths(model, self.language_model, prefix="language"))
        else:
            lm_path = module_path(model, self.language_model)
            paths["language"] = join(lm_path, largest_block_list(self.language_model))
        return paths

    def default_compare_group(self, block: Block) -> str:
        # The reference compares Wanda scores over the whole matrix for ViT layers.
        return "matrix" if block.tower == "vision" else "row"

    def uncovered_hint(self, tensor_names: list[str]) -> str:
        qformer = module_path(self.model, self.model.get_submodule("qformer"))
        inside = any(name.startswith(qformer + ".") for name in tensor_names)
        return " (pass --include-qformer)" if inside and not self.include_qformer else ""

    def dense_parts(self) -> list[str]:
        parts = ["patch/position embeddings", "query tokens"]
        if not self.include_qformer:
            parts.append("Q-Former")
        parts += ["language_projection", "token embeddings", "lm_head", "norms", "biases"]
        if self.seq2seq:
            parts.append("T5 relative attention bias")
        return parts

    # --- running -----------------------------------------------------------------------
    def check_batch(self, batch: Batch) -> None:
        for key in ("pixel_values", "input_ids"):
            if key not in batch:
                raise DataError(f"a {self.family} calibration batch needs {key!r}")
        check_image_tokens(self.model.config, batch["input_ids"])
        if self.seq2seq and "labels" not in batch and "decoder_input_ids" not in batch:
            raise DataError(f"a {self.family} batch with a T5 language model needs 'labels'")

    def model_inputs(self, batch: Batch) -> Batch:
        inputs = {k: v for k, v in batch.items() if k in self.input_keys}
        if self.seq2seq and "decoder_input_ids" not in inputs:
            # what T5 does with labels when no decoder inputs are given
            lm = self.language_model
            shift: Any = getattr(lm, "prepare_decoder_input_ids_from_labels", None) or lm._shift_right
            inputs["decoder_input_ids"] = shift(batch["labels"])
        return to_model_device(self.model, inputs)

    def loss(self, batch: Batch) -> torch.Tensor:
        self.check_batch(batch)
        if "labels" not in batch:
            raise DataError(f"a {self.family} calibration batch needs 'labels' for its loss")
        inputs = self.model_inputs(batch)
        if self.seq2seq:
            inputs.pop("decoder_input_ids", None)  # let T5 shift the labels itself
        labels = to_model_device(self.model, {"labels": batch["labels"]})["labels"]
        return self.model(**inputs, labels=labels, **self.no_cache()).loss

    def loss_sample_weights(self, batch: Batch) -> list[float] | None:
        # the caption loss is the mean over every labelled token of the batch (-100 ignored):
        # shifted by one for a decoder-only LM, unshifted for T5's decoder
        labels = batch.get("labels")
        if labels is None or labels.dim() != 2:
            return None
        counts = ((labels if self.seq2seq else labels[:, 1:]) != -100).sum(dim=1).tolist()
        total = sum(counts)
        return [c / total for c in counts] if total else None

    def next_inputs(self, block: Block, output: Any, inputs: BlockInputs) -> BlockInputs:
        if block.tower.startswith("language-"):
            return t5_next_inputs(output, inputs)
        return super().next_inputs(block, output, inputs)

    # --- data and evaluation -----------------------------------------------------------
    def prompt_inputs(
        self, processor: Any, pairs: Sequence[tuple[str, str | None]], max_text_len: int, generation: bool
    ) -> Batch:
        """Token layout of a BLIP-2 batch; every row starts with the ``num_query_tokens`` image tokens.

        Decoder-only LM: ``[image]*Q [bos] prompt target [eos]``, labels only on ``target [eos]``;
        for generation ``[image]*Q [bos] prompt``, left-padded. FlanT5: encoder
        ``[image]*Q prompt [eos]``, labels ``target [eos]`` (padding -100), and
        ``decoder_attention_mask``.
        """
        config: Any = self.model.config
        tokenizer = tokenizer_of(processor)
        image = [image_token_id(config)] * int(config.num_query_tokens)
        pad_value = pad_id(tokenizer, config)
        if self.seq2seq:
            batch = self._t5_text(tokenizer, pairs, max_text_len, image, pad_value)
        else:
            batch = image_grounded_lm_text(tokenizer, pairs, max_text_len, image, image_first=True,
                                           pad_value=pad_value, generation=generation)  # fmt: skip
        check_image_tokens(config, batch["input_ids"])
        return batch

    @staticmethod
    def _t5_text(
        tokenizer: Any, pairs: Sequence[tuple[str, str | None]], max_text_len: int, image: list[int], pad_value: int
    ) -> Batch:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ModelError("the tokenizer has no eos token, which T5 inputs and labels end with")
        enc_rows, label_rows = [], []
        for prompt, target in pairs:
            enc_rows.append(image + encode(tokenizer, prompt)[: max_text_len - 1] + [eos])
            if target is not None:
                label_rows.append(encode(tokenizer, target)[: max_text_len - 1] + [eos])
        batch: Batch = {"input_ids": pad(enc_rows, pad_value), "attention_mask": mask(enc_rows)}
        if label_rows:
            batch["labels"] = pad(label_rows, IGNORE_INDEX)
            batch["decoder_attention_mask"] = mask(label_rows)
        return batch

    def perplexity_module(self) -> nn.Module:
        """The decoder-only language model, read on text alone (no image)."""
        if self.seq2seq:
            raise ModelError("has an encoder-decoder language model: perplexity needs a causal LM")
        return self.language_model


@register
class InstructBlipAdapter(Blip2Adapter):
    """InstructBLIP: as BLIP-2, and the instruction also goes to the Q-Former."""

    family = "instructblip"
    model_types = ("instructblip",)
    loader_class = "InstructBlipForConditionalGeneration"
    input_keys = Blip2Adapter.input_keys + ("qformer_input_ids", "qformer_attention_mask")

    def check_batch(self, batch: Batch) -> None:
        super().check_batch(batch)
        if "qformer_input_ids" not in batch:
            raise DataError("an InstructBLIP batch needs 'qformer_input_ids' (the instruction)")

    def check_processor(self, processor: Any) -> None:
        super().check_processor(processor)
        if getattr(processor, "qformer_tokenizer", None) is None:
            raise ModelError("ships no Q-Former tokenizer (InstructBLIP reads the instruction with it)")

    def prompt_inputs(
        self, processor: Any, pairs: Sequence[tuple[str, str | None]], max_text_len: int, generation: bool
    ) -> Batch:
        """BLIP-2's layout plus the prompts through the processor's Q-Former tokenizer."""
        batch = super().prompt_inputs(processor, pairs, max_text_len, generation)
        qformer_tokenizer = getattr(processor, "qformer_tokenizer", None)
        if qformer_tokenizer is None:
            raise ModelError("InstructBLIP needs a processor with a qformer_tokenizer")
        encoded = qformer_tokenizer([p for p, _ in pairs], padding=True, truncation=True,
                                    max_length=max_text_len, return_tensors="pt")  # fmt: skip
        batch["qformer_input_ids"] = encoded["input_ids"]
        batch["qformer_attention_mask"] = encoded["attention_mask"]
        return batch
