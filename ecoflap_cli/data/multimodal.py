"""Image-text calibration and evaluation data from local files, and the multimodal eval tasks.

Data formats:

- a JSONL file, one record per line: ``{"image": "rel/path.png", "caption": "..."}`` or
  ``{"image": ..., "question": "...", "answer": "..."}`` / ``{..., "answers": ["...", ...]}``;
  image paths are relative to the JSONL file's folder (absolute paths are kept);
- an image folder with one subfolder per class (CLIP zero-shot classification).

Images go through the model's own processor (``processor.image_processor``) after loading with
Pillow and converting to RGB. Text is laid out exactly as each family trains on it (see
:func:`make_multimodal_batches`); BLIP-2 / InstructBLIP input ids always start with the
``num_query_tokens`` image placeholder tokens, without which transformers ignores the image.

Eval tasks (:func:`clip_zero_shot`, :func:`clip_retrieval`, :func:`vqa_eval`,
:func:`caption_eval`) return plain dicts of metrics computed with :mod:`ecoflap_cli.evaluation.metrics`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoflap_cli.evaluation import metrics
from ecoflap_cli.errors import DataError, ModelError
from ecoflap_cli.models.base import Adapter

Record = dict[str, Any]
Batch = dict[str, torch.Tensor]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
DEFAULT_CAPTION_PROMPT = "a photo of"
DEFAULT_QUESTION_TEMPLATE = "Question: {question} Answer:"
DEFAULT_CLASS_TEMPLATES = ("a photo of a {}.",)
IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------
# Reading local data
# --------------------------------------------------------------------------------------------


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _validate_record(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("image"), str) or not obj["image"]:
        raise DataError(f'{where}: the record needs an "image" path (a string)')
    if "caption" in obj:
        if not isinstance(obj["caption"], str) or not obj["caption"].strip():
            raise DataError(f'{where}: "caption" must be a non-empty string')
        return
    if "question" in obj:
        if not isinstance(obj["question"], str) or not obj["question"].strip():
            raise DataError(f'{where}: "question" must be a non-empty string')
        answer_ok = isinstance(obj.get("answer"), str) and obj["answer"].strip()
        if not answer_ok and not _is_str_list(obj.get("answers")):
            raise DataError(
                f'{where}: a question record needs "answer" (a string) or "answers" '
                "(a non-empty list of strings)"
            )
        return
    raise DataError(f'{where}: the record needs "caption", or "question" with an answer')


def read_image_text_jsonl(path: str | Path) -> list[Record]:
    """Read caption / VQA records; each record's "image" becomes an absolute path that exists."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image-text file {path} not found")
    records: list[Record] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            _validate_record(obj, where)
            image = Path(obj["image"])
            if not image.is_absolute():
                image = path.parent / image
            if not image.is_file():
                raise DataError(f"{where}: image file {image} not found")
            records.append({**obj, "image": str(image.resolve())})
    if not records:
        raise DataError(f"image-text file {path} holds no records")
    return records


def class_name_of(folder: str) -> str:
    """A folder name as a class name for the prompt: "golden_retriever" -> "golden retriever"."""
    return folder.replace("_", " ").strip()


def read_class_folders(path: str | Path) -> tuple[list[str], list[Record]]:
    """Read an image folder with one subfolder per class.

    Returns ``(class_names, records)``; classes are the sorted subfolder names (underscores as
    spaces) and each record is ``{"image": absolute path, "label": class index,
    "class_name": name}``. Files without an image extension are skipped.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image class folder {root} not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class subfolders (expected one folder per class)")
    names = [class_name_of(p.name) for p in folders]
    records: list[Record] = []
    for label, folder in enumerate(folders):
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                records.append({"image": str(file.resolve()), "label": label, "class_name": names[label]})
    if not records:
        raise DataError(f"{root} holds no images in its class subfolders")
    return names, records


def load_image(source: Any) -> Any:
    """A PIL RGB image from a path or an already-loaded PIL image."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow is a dependency
        raise DataError("reading images needs Pillow (pip install pillow)") from err
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image {source}: {err}") from None


# --------------------------------------------------------------------------------------------
# Model families and text layout
# --------------------------------------------------------------------------------------------


def _unwrap(adapter_or_model: Adapter | nn.Module) -> nn.Module:
    return adapter_or_model.model if isinstance(adapter_or_model, Adapter) else adapter_or_model


def model_family(model: nn.Module) -> str:
    """ "clip", "blip" (BLIP-2 / InstructBLIP) or an error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "clip":
        return "clip"
    if model_type in ("blip-2", "instructblip") or hasattr(config, "num_query_tokens"):
        return "blip"
    raise ModelError(f"model type {model_type!r} has no image-text data layout in ecoflap")


def _is_seq2seq(model: nn.Module) -> bool:
    use_decoder_only = getattr(model.config, "use_decoder_only_language_model", None)
    if use_decoder_only is not None:
        return not use_decoder_only
    return bool(getattr(model.language_model.config, "is_encoder_decoder", False))


def _uses_qformer_text(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) == "instructblip"


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _image_processor(processor: Any) -> Any:
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ModelError("the processor has no image_processor")
    return image_processor


def _pixel_values(processor: Any, images: Sequence[Any]) -> torch.Tensor:
    loaded = [load_image(image) for image in images]
    return _image_processor(processor)(images=loaded, return_tensors="pt")["pixel_values"]


def target_answer(record: Record) -> str:
    """The answer to train on: "answer", else the most frequent of "answers" (first on ties)."""
    if isinstance(record.get("answer"), str):
        return record["answer"]
    answers = record["answers"]
    counts = Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a)))


def ground_truth_answers(record: Record) -> list[str]:
    if _is_str_list(record.get("answers")):
        return list(record["answers"])
    return [record["answer"]]


def prompt_and_target(record: Record, caption_prompt: str, question_template: str) -> tuple[str, str]:
    """(prompt, target) for a caption or VQA record."""
    if "question" in record and "caption" not in record:
        return question_template.format(question=record["question"]), target_answer(record)
    return caption_prompt, record["caption"]


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer: Any, model: nn.Module) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    text_config = getattr(model.config, "text_config", model.config)
    pad = getattr(text_config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def _pad(rows: Sequence[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def _mask(rows: Sequence[list[int]], left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, left=left)


def _blip_text(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str | None]],
    max_text_len: int,
    generation: bool,
) -> Batch:
    """Token layout of a BLIP-2 / InstructBLIP batch.

    Decoder-only LM: ``[image]*Q [bos] prompt target [eos]``, labels only on ``target [eos]``;
    for generation ``[image]*Q [bos] prompt``, left-padded. FlanT5: encoder
    ``[image]*Q prompt [eos]``, labels ``target [eos]`` (padding -100).
    """
    from ecoflap_cli.models.blip2 import check_image_tokens, image_token_id

    config = model.config
    image = [image_token_id(config)] * int(config.num_query_tokens)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = _pad_id(tokenizer, model)
    batch: Batch = {}
    if _is_seq2seq(model):
        if eos is None:
            raise ModelError("the tokenizer has no eos token, which T5 inputs and labels end with")
        enc_rows, label_rows = [], []
        for prompt, target in pairs:
            enc_rows.append(image + _encode(tokenizer, prompt)[: max_text_len - 1] + [eos])
            if target is not None:
                label_rows.append(_encode(tokenizer, target)[: max_text_len - 1] + [eos])
        batch["input_ids"] = _pad(enc_rows, pad)
        batch["attention_mask"] = _mask(enc_rows)
        if label_rows:
            batch["labels"] = _pad(label_rows, IGNORE_INDEX)
            batch["decoder_attention_mask"] = _mask(label_rows)
    else:
        begin = [bos] if bos is not None else []
        end = [eos] if eos is not None else []
        start = image + begin
        rows, label_rows = [], []
        for prompt, target in pairs:
            prompt_ids = _encode(tokenizer, prompt)
            if target is None:
                rows.append(start + prompt_ids[: max(max_text_len - len(begin), 0)])
                continue
            # tokenize prompt and target together (as the model reads them); the prompt's own
            # token count marks where the loss starts
            full = _encode(tokenizer, f"{prompt} {target}" if prompt else target)
            body = full[: max(max_text_len - len(begin) - len(end), 1)]
            n_prompt = min(len(prompt_ids), len(body))
            ids = start + body + end
            labels = [IGNORE_INDEX] * (len(start) + n_prompt) + body[n_prompt:] + end
            rows.append(ids)
            label_rows.append(labels)
        left = generation  # a decoder-only LM continues from the last position of every row
        batch["input_ids"] = _pad(rows, pad, left=left)
        batch["attention_mask"] = _mask(rows, left=left)
        if label_rows:
            batch["labels"] = _pad(label_rows, IGNORE_INDEX)
    check_image_tokens(config, batch["input_ids"])
    return batch


def _qformer_text(processor: Any, prompts: Sequence[str], max_text_len: int) -> Batch:
    qformer_tokenizer = getattr(processor, "qformer_tokenizer", None)
    if qformer_tokenizer is None:
        raise ModelError("InstructBLIP needs a processor with a qformer_tokenizer")
    encoded = qformer_tokenizer(
        list(prompts), padding=True, truncation=True, max_length=max_text_len, return_tensors="pt"
    )
    return {
        "qformer_input_ids": encoded["input_ids"],
        "qformer_attention_mask": encoded["attention_mask"],
    }


def record_text(record: Record, class_template: str = DEFAULT_CLASS_TEMPLATES[0]) -> str:
    """The text paired with an image for CLIP: caption, question + answer, or class prompt."""
    if "caption" in record:
        return record["caption"]
    if "question" in record:
        return f"{record['question']} {target_answer(record)}"
    if "class_name" in record:
        return fill_template(class_template, record["class_name"])
    raise DataError("a record needs a caption, a question with an answer, or a class name")


def fill_template(template: str, class_name: str) -> str:
    return template.replace("{class_name}", class_name).replace("{}", class_name)


def _clip_text(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_text_len: int) -> Batch:
    text_config = getattr(model.config, "text_config", model.config)
    limit = getattr(text_config, "max_position_embeddings", None)
    length = min(max_text_len, limit) if limit else max_text_len
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=length, return_tensors="pt")
    input_ids = encoded["input_ids"]
    eos = getattr(text_config, "eos_token_id", None)
    # CLIP pools the text at its eos token (configs with eos_token_id == 2 use argmax instead)
    if eos is not None and eos != 2 and not bool((input_ids == eos).any(dim=-1).all()):
        raise DataError(
            f"CLIP text ids must contain the eos token {eos} (the text is pooled there); the "
            "tokenizer does not add it"
        )
    return {"input_ids": input_ids, "attention_mask": encoded["attention_mask"]}


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def make_multimodal_batches(
    adapter_or_model: Adapter | nn.Module,
    processor: Any,
    records: Sequence[Record],
    batch_size: int,
    max_text_len: int,
    *,
    caption_prompt: str = DEFAULT_CAPTION_PROMPT,
    question_template: str = DEFAULT_QUESTION_TEMPLATE,
) -> list[Batch]:
    """Calibration batches with exactly what the family's adapter ``loss``/``forward`` need.

    - BLIP-2: ``pixel_values``, ``input_ids`` (image tokens first), ``attention_mask``,
      ``labels`` (-100 on image tokens, bos, prompt and padding); FlanT5 adds
      ``decoder_attention_mask`` and its labels are the target only.
    - InstructBLIP: the same plus ``qformer_input_ids`` / ``qformer_attention_mask`` (the
      prompt or question, through the processor's Q-Former tokenizer).
    - CLIP: ``pixel_values``, ``input_ids``, ``attention_mask``; a trailing batch of one pair is
      merged into the previous batch (the contrastive loss of one pair is always 0).

    Captions are trained after ``caption_prompt``; questions are asked with
    ``question_template`` (``{question}``) and trained on the answer (the most frequent of
    "answers"). ``max_text_len`` bounds the text tokens (image tokens not counted).
    """
    model = _unwrap(adapter_or_model)
    family = model_family(model)
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if max_text_len < 2:
        raise DataError(f"max_text_len must be at least 2, got {max_text_len}")
    if not records:
        raise DataError("no image-text records to make batches from")
    chunks = _chunks(list(records), batch_size)
    if family == "clip":
        if len(records) < 2:
            raise DataError("CLIP's contrastive loss needs at least 2 image-text pairs")
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            last = chunks.pop()
            chunks[-1] = list(chunks[-1]) + list(last)
        if len(chunks[0]) < 2:
            raise DataError("CLIP's contrastive loss needs batches of at least 2 image-text pairs")
    tokenizer = _tokenizer(processor)
    batches: list[Batch] = []
    for chunk in chunks:
        batch: Batch = {"pixel_values": _pixel_values(processor, [r["image"] for r in chunk])}
        if family == "clip":
            batch.update(_clip_text(model, tokenizer, [record_text(r) for r in chunk], max_text_len))
        else:
            pairs = [prompt_and_target(r, caption_prompt, question_template) for r in chunk]
            batch.update(_blip_text(model, tokenizer, pairs, max_text_len, generation=False))
            if _uses_qformer_text(model):
                batch.update(_qformer_text(processor, [p for p, _ in pairs], max_text_len))
        batches.append(batch)
    return batches


# --------------------------------------------------------------------------------------------
# Evaluation tasks
# --------------------------------------------------------------------------------------------


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
    parts = []
    for chunk in _chunks(list(images), batch_size):
        pixels = _pixel_values(processor, chunk).to(device, _float_dtype(model))
        parts.append(_features(model.get_image_features(pixel_values=pixels)))
    return torch.cat(parts)


@torch.no_grad()
def _text_features(
    model: nn.Module, processor: Any, texts: Sequence[str], batch_size: int, max_text_len: int
) -> torch.Tensor:
    device = _device(model)
    tokenizer = _tokenizer(processor)
    parts = []
    for chunk in _chunks(list(texts), batch_size):
        encoded = _to(_clip_text(model, tokenizer, chunk, max_text_len), device)
        parts.append(_features(model.get_text_features(**encoded)))
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

    Each class's text embedding is the normalised mean of its prompts' normalised embeddings
    (one prompt per template, ``{}`` or ``{class_name}`` standing for the class name); an image
    is assigned the class of highest cosine similarity. Keys ``top{k}``, ``n_images``,
    ``n_classes``.
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
    logits = (images @ classes.T).tolist()
    accuracy = metrics.zero_shot_accuracy(logits, [r["label"] for r in records], tuple(topk))
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
    """Image-text retrieval Recall@K (percent) in both directions.

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
    similarity = (images @ texts.T).tolist()
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
    """Generated text (prompt removed) for each (image, prompt) of a BLIP-2 / InstructBLIP model."""
    if model_family(model) != "blip":
        raise ModelError("generation tasks need a BLIP-2 or InstructBLIP model")
    model.eval()
    device = _device(model)
    tokenizer = _tokenizer(processor)
    texts: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk_images = images[start : start + batch_size]
        chunk_prompts = list(prompts[start : start + batch_size])
        batch = {"pixel_values": _pixel_values(processor, chunk_images)}
        batch.update(
            _blip_text(model, tokenizer, [(p, None) for p in chunk_prompts], max_text_len, generation=True)
        )
        if _uses_qformer_text(model):
            batch.update(_qformer_text(processor, chunk_prompts, max_text_len))
        batch = _to(batch, device)
        batch["pixel_values"] = batch["pixel_values"].to(_float_dtype(model))
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, **generate_kwargs}
        output = model.generate(**batch, **kwargs)
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
    **generate_kwargs: Any,
) -> dict[str, float]:
    """Captioning with ``generate``, scored by CIDEr-D against every caption of the image.

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
    score, _ = metrics.cider_d(candidates, [references[i] for i in images])
    return {"cider_d": 100.0 * score, "n_images": len(images)}
