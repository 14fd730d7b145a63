"""Vision-language evaluation tasks on a loaded model: zero-shot classification and image-text
retrieval (contrastive towers: CLIP, SigLIP), VQA soft accuracy and captioning CIDEr-D
(generative models: BLIP-2, InstructBLIP, LLaVA). The data readers live in
:mod:`ecoflap_cli.data.multimodal`; the family-specific text and prompt layouts in the adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoflap_cli.data.multimodal import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_CLASS_TEMPLATES,
    DEFAULT_QUESTION_TEMPLATE,
    Batch,
    Record,
    chunked,
    fill_template,
    ground_truth_answers,
    pixel_tensor,
    read_class_folders,
)
from ecoflap_cli.errors import DataError
from ecoflap_cli.evaluation import metrics
from ecoflap_cli.models import get_adapter
from ecoflap_cli.models.layout import tokenizer_of


def _device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _features(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor in older transformers, an output with pooler_output now."""
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _image_features(model: nn.Module, processor: Any, images: Sequence[Any], batch_size: int) -> torch.Tensor:
    device = _device(model)
    encode: Any = model.get_image_features  # a transformers dual encoder's method
    parts = []
    for chunk in chunked(list(images), batch_size):
        pixels = pixel_tensor(processor, chunk).to(device, _float_dtype(model))
        parts.append(_features(encode(pixel_values=pixels)))
    return torch.cat(parts)


@torch.no_grad()
def _text_features(
    model: nn.Module, processor: Any, texts: Sequence[str], batch_size: int, max_text_len: int
) -> torch.Tensor:
    device = _device(model)
    adapter = get_adapter(model)
    encode: Any = model.get_text_features  # a transformers dual encoder's method
    parts = []
    for chunk in chunked(list(texts), batch_size):
        encoded = _to(adapter.text_inputs(processor, chunk, max_text_len), device)
        parts.append(_features(encode(**encoded)))
    return torch.cat(parts)


def clip_zero_shot(
    model: nn.Module,
    processor: Any,
    class_folder: str | Path,
    templates: Sequence[str] = DEFAULT_CLASS_TEMPLATES,
    *,
    batch_size: int = 32,
    max_text_len: int = 77,
    topk: Iterable[int] = (1, 5),
) -> dict[str, float]:
    """Zero-shot classification accuracy (percent) on a folder with one subfolder per class.

    For any image-text matching model (CLIP, SigLIP: ``get_image_features`` and
    ``get_text_features``; SigLIP's sigmoid of the scaled similarity ranks as the cosine does).
    Each class's text embedding is the normalised mean of its prompts' normalised embeddings
    (one prompt per template, ``{}`` or ``{class_name}`` standing for the class name); an image
    is assigned the class of highest cosine similarity. Keys ``top{k}`` (top-1, and each other k
    below the number of classes), ``n_images``, ``n_classes``.
    """
    if not templates:
        raise DataError("zero-shot classification needs at least one prompt template")
    model.eval()
    names, records = read_class_folders(class_folder)
    prompts = [fill_template(t, name) for name in names for t in templates]
    text = _text_features(model, processor, prompts, batch_size, max_text_len)
    classes = text.reshape(len(names), len(templates), -1).mean(dim=1)
    classes = classes / classes.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    images = _image_features(model, processor, [r["image"] for r in records], batch_size)
    logits = images @ classes.T  # ranked with torch (metrics.zero_shot_accuracy)
    # top-k over k or fewer classes is 100% whatever the model: reported only when it says something
    shown = tuple(k for k in topk if k == 1 or k < len(names))
    accuracy = metrics.zero_shot_accuracy(logits, [r["label"] for r in records], shown)
    out: dict[str, float] = {f"top{k}": v for k, v in accuracy.items()}
    out["n_images"] = len(records)
    out["n_classes"] = len(names)
    return out


def clip_retrieval(
    model: nn.Module,
    processor: Any,
    records: Sequence[Record],
    *,
    batch_size: int = 32,
    max_text_len: int = 77,
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-text retrieval Recall@K (percent) in both directions, by cosine similarity.

    Records with the same image path are one image with several captions (Flickr30k / COCO
    style). Keys ``i2t_r{k}``, ``t2i_r{k}``, ``n_images``, ``n_texts``.
    """
    captioned = [r for r in records if "caption" in r]
    if not captioned:
        raise DataError("image-text retrieval needs caption records")
    model.eval()
    image_index: dict[str, int] = {}
    text_to_image = []
    for record in captioned:
        key = str(record["image"])
        text_to_image.append(image_index.setdefault(key, len(image_index)))
    images = _image_features(model, processor, list(image_index), batch_size)
    texts = _text_features(model, processor, [r["caption"] for r in captioned], batch_size, max_text_len)
    similarity = images @ texts.T  # ranked with torch (metrics.retrieval_recalls)
    out: dict[str, float] = dict(metrics.retrieval_recalls(similarity, text_to_image, tuple(ks)))
    out["n_images"] = len(image_index)
    out["n_texts"] = len(captioned)
    return out


@torch.no_grad()
def _generate(
    model: nn.Module,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    batch_size: int,
    max_text_len: int,
    max_new_tokens: int,
    generate_kwargs: dict[str, Any],
) -> list[str]:
    """Generated text (prompt removed) for each (image, prompt), laid out as the family's adapter
    says (``Adapter.prompt_inputs``); families that do not generate from images are refused."""
    adapter = get_adapter(model)
    model.eval()
    device = _device(model)
    tokenizer = tokenizer_of(processor)
    texts: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk_images = images[start : start + batch_size]
        chunk_prompts = list(prompts[start : start + batch_size])
        batch = {"pixel_values": pixel_tensor(processor, chunk_images)}
        batch.update(adapter.prompt_inputs(processor, [(p, None) for p in chunk_prompts], max_text_len, True))
        batch = _to(batch, device)
        batch["pixel_values"] = batch["pixel_values"].to(_float_dtype(model))
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, **generate_kwargs}
        generate: Any = model.generate  # transformers' GenerationMixin
        output = generate(**batch, **kwargs)
        input_ids = batch["input_ids"]
        width = input_ids.shape[1]
        # decoder-only LMs return the prompt followed by the new tokens
        if output.shape[1] >= width and torch.equal(output[:, :width], input_ids):
            output = output[:, width:]
        texts.extend(t.strip() for t in tokenizer.batch_decode(output, skip_special_tokens=True))
    return texts


def _float_dtype(model: nn.Module) -> torch.dtype:
    vision = getattr(model, "vision_model", model)
    for param in vision.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def vqa_eval(
    model: nn.Module,
    processor: Any,
    records: Sequence[Record],
    prompt_template: str = DEFAULT_QUESTION_TEMPLATE,
    max_new_tokens: int = 10,
    *,
    batch_size: int = 8,
    max_text_len: int = 64,
    **generate_kwargs: Any,
) -> dict[str, float]:
    """Visual question answering with ``generate``.

    ``vqa_accuracy``: the VQAv2 soft accuracy (percent) over questions with at least two
    ground-truth answers (the metric is leave-one-out, so a single answer always scores 0);
    ``exact_match``: percent of predictions equal to some ground-truth answer after VQA answer
    normalisation (the GQA-style metric), over all questions. Also ``n_questions``.
    """
    questions = [r for r in records if "question" in r]
    if not questions:
        raise DataError("VQA evaluation needs question records")
    prompts = [prompt_template.format(question=r["question"]) for r in questions]
    predictions = _generate(
        model,
        processor,
        [r["image"] for r in questions],
        prompts,
        batch_size,
        max_text_len,
        max_new_tokens,
        generate_kwargs,
    )
    answers = [ground_truth_answers(r) for r in questions]
    normalize = metrics.normalize_vqa_answer
    hits = [normalize(p) in {normalize(a) for a in gt} for p, gt in zip(predictions, answers, strict=True)]
    out: dict[str, float] = {
        "exact_match": 100.0 * sum(hits) / len(hits),
        "n_questions": len(questions),
    }
    multi = [(p, gt) for p, gt in zip(predictions, answers, strict=True) if len(gt) >= 2]
    if multi:
        out["vqa_accuracy"] = metrics.vqa_accuracy([p for p, _ in multi], [gt for _, gt in multi])
    return out


def caption_eval(
    model: nn.Module,
    processor: Any,
    records: Sequence[Record],
    prompt: str = DEFAULT_CAPTION_PROMPT,
    max_new_tokens: int = 20,
    *,
    batch_size: int = 8,
    max_text_len: int = 64,
    cider_tokenizer: str = "auto",
    **generate_kwargs: Any,
) -> dict[str, float]:
    """Captioning with ``generate``, scored by CIDEr-D against every caption of the image.

    Captions are tokenised by ``cider_tokenizer`` (:func:`metrics.resolve_cider_tokenizer`:
    auto is the COCO toolkit's PTB tokenizer when pycocoevalcap and java are there, else
    ecoflap's Python port of its rules).

    Records with the same image are one image with several reference captions; one caption is
    generated per image after ``prompt`` (the prompt itself is not part of the candidate).
    ``cider_d`` is reported x100, as papers do (NoCaps 121.7); also ``n_images``.
    """
    references: dict[str, list[str]] = {}
    for record in records:
        if "caption" in record:
            references.setdefault(str(record["image"]), []).append(record["caption"])
    if not references:
        raise DataError("caption evaluation needs caption records")
    images = list(references)
    candidates = _generate(
        model,
        processor,
        images,
        [prompt] * len(images),
        batch_size,
        max_text_len,
        max_new_tokens,
        generate_kwargs,
    )
    score, _ = metrics.cider_d(candidates, [references[i] for i in images], tokenizer=cider_tokenizer)
    return {"cider_d": 100.0 * score, "n_images": len(images)}
