"""Token layouts shared by the image-text adapters: padding, masks, and the prompt -> target
layout of an image-grounded decoder-only language model.

The adapters own *which* layout their family trains on (see ``Adapter.prompt_inputs`` and
``Adapter.text_inputs``); these helpers only build tensors from token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ecoflap_cli.errors import DataError, ModelError

Batch = dict[str, torch.Tensor]

#: label of a position the loss ignores (transformers' convention)
IGNORE_INDEX = -100


def tokenizer_of(processor: Any) -> Any:
    """The text tokenizer of a multimodal processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", processor)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without the tokenizer's special tokens (layouts add their own)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer: Any, config: Any) -> int:
    """The padding id: the tokenizer's, else the text config's, else eos, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    text_config = getattr(config, "text_config", None) or config
    pad = getattr(text_config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def pad(rows: Sequence[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def mask(rows: Sequence[list[int]], left: bool = False) -> torch.Tensor:
    return pad([[1] * len(r) for r in rows], 0, left=left)


def check_token_count(input_ids: torch.Tensor, token: int, wanted: int, why: str) -> None:
    """Every row must hold exactly ``wanted`` copies of the image placeholder ``token``.

    Without them transformers either ignores the image (BLIP-2) or fails deep in the forward
    (LLaVA); here the message says what is wrong, and ``why`` the family needs that many.
    """
    counts = (input_ids == token).sum(dim=-1)
    bad = (counts != wanted).nonzero().flatten().tolist()
    if bad:
        raise DataError(f"input_ids row(s) {bad} hold {counts[bad[0]].item()} image tokens, expected {wanted}: {why}")


def image_grounded_lm_text(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str | None]],
    max_text_len: int,
    image: list[int],
    *,
    image_first: bool,
    pad_value: int,
    generation: bool,
) -> Batch:
    """``input_ids``, ``attention_mask`` (and ``labels``) for a decoder-only LM that reads an image.

    Each (prompt, target) pair becomes ``start prompt target [eos]`` where ``start`` is the image
    placeholder ids and bos, in the family's order (``image_first``: ``[image] [bos]``, else
    ``[bos] [image]``). Labels cover only ``target [eos]``; the prompt and target are tokenized
    together (as the model reads them) and the prompt's own token count marks where the loss
    starts. With ``target`` None (generation) the row ends after the prompt and rows are
    left-padded, so every row continues from its last position. ``max_text_len`` bounds the text
    tokens (bos, prompt, target, eos); image tokens are not counted.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    begin = [bos] if bos is not None else []
    end = [eos] if eos is not None else []
    start = image + begin if image_first else begin + image
    rows, label_rows = [], []
    for prompt, target in pairs:
        prompt_ids = encode(tokenizer, prompt)
        if target is None:
            rows.append(start + prompt_ids[: max(max_text_len - len(begin), 0)])
            continue
        full = encode(tokenizer, f"{prompt} {target}" if prompt else target)
        body = full[: max(max_text_len - len(begin) - len(end), 1)]
        n_prompt = min(len(prompt_ids), len(body))
        rows.append(start + body + end)
        label_rows.append([IGNORE_INDEX] * (len(start) + n_prompt) + body[n_prompt:] + end)
    if label_rows and len(label_rows) != len(rows):
        raise ModelError("a batch mixes pairs with and without targets")
    batch: Batch = {"input_ids": pad(rows, pad_value, left=generation),
                    "attention_mask": mask(rows, left=generation)}  # fmt: skip
    if label_rows:
        batch["labels"] = pad(label_rows, IGNORE_INDEX)
    return batch
