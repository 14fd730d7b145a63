"""Image-text calibration and evaluation data from local files, and the multimodal eval tasks.

Data formats:

- a JSONL file, one record per line: ``{"image": "rel/path.png", "caption": "..."}`` or
  ``{"image": ..., "question": "...", "answer": "..."}`` / ``{..., "answers": ["...", ...]}``;
  image paths are relative to the JSONL file's folder (absolute paths are kept);
- an image folder with one subfolder per class (zero-shot classification).

Images go through the model's own processor (``processor.image_processor``) after loading with
Pillow and converting to RGB. Text is laid out exactly as each family trains on it: the family's
adapter does it (``Adapter.calibration_text``, ``prompt_inputs``, ``text_inputs``), so nothing
here depends on the model family.

Eval tasks (:func:`clip_zero_shot`, :func:`clip_retrieval` for image-text matching models such
as CLIP and SigLIP; :func:`vqa_eval`, :func:`caption_eval` for models that generate text from an
image, such as BLIP-2, InstructBLIP and LLaVA) return plain dicts of metrics computed with
:mod:`ecoflap_cli.evaluation.metrics`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoflap_cli.data.text import read_utf8
from ecoflap_cli.errors import DataError, ModelError
from ecoflap_cli.files import atomic_file, write_atomic
from ecoflap_cli.models import get_adapter
from ecoflap_cli.models.base import Adapter
from ecoflap_cli.models.layout import IGNORE_INDEX

__all__ = [
    "DEFAULT_IMAGE_TEXT_DATASET",
    "IGNORE_INDEX",
    "RecordTexts",
    "default_image_text_records",
    "make_multimodal_batches",
    "read_class_folders",
    "read_image_text_jsonl",
]

Record = dict[str, Any]
Batch = dict[str, torch.Tensor]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
DEFAULT_CAPTION_PROMPT = "a photo of"
DEFAULT_QUESTION_TEMPLATE = "Question: {question} Answer:"
DEFAULT_CLASS_TEMPLATES = ("a photo of a {}.",)

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
                f'{where}: a question record needs "answer" (a string) or "answers" (a non-empty list of strings)'
            )
        return
    raise DataError(f'{where}: the record needs "caption", or "question" with an answer')


def read_image_text_jsonl(path: str | Path) -> list[Record]:
    """Read caption / VQA records; each record's "image" becomes an absolute path that exists."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image-text file {path} not found")
    records: list[Record] = []
    for lineno, line in enumerate(read_utf8(path).splitlines(), start=1):
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
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"image {source} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS:,} pixels): "
            "a decompression bomb, or an image to shrink first"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image {source}: {err}") from None


# --------------------------------------------------------------------------------------------
# Record text and calibration batches
# --------------------------------------------------------------------------------------------


def _adapter(adapter_or_model: Adapter | nn.Module) -> Adapter:
    """The family adapter (built from the model when a bare model is given)."""
    if isinstance(adapter_or_model, Adapter):
        return adapter_or_model
    return get_adapter(adapter_or_model)


def _image_processor(processor: Any) -> Any:
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ModelError("the processor has no image_processor")
    return image_processor


def pixel_tensor(processor: Any, images: Sequence[Any]) -> torch.Tensor:
    loaded = [load_image(image) for image in images]
    return _image_processor(processor)(images=loaded, return_tensors="pt")["pixel_values"]


def target_answer(record: Record) -> str:
    """The answer to train on: "answer", else the most frequent of "answers" (first on ties)."""
    if isinstance(record.get("answer"), str):
        return record["answer"]
    answers: list[str] = record["answers"]
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


def record_text(record: Record, class_template: str = DEFAULT_CLASS_TEMPLATES[0]) -> str:
    """The text paired with an image by a matching model: caption, question + answer, or class prompt."""
    if "caption" in record:
        return record["caption"]
    if "question" in record:
        return f"{record['question']} {target_answer(record)}"
    if "class_name" in record:
        return fill_template(class_template, record["class_name"])
    raise DataError("a record needs a caption, a question with an answer, or a class name")


def fill_template(template: str, class_name: str) -> str:
    return template.replace("{class_name}", class_name).replace("{}", class_name)


@dataclass(frozen=True)
class RecordTexts:
    """A record's text in both shapes an adapter may ask for (``models.base.RecordText``)."""

    caption_prompt: str = DEFAULT_CAPTION_PROMPT
    question_template: str = DEFAULT_QUESTION_TEMPLATE
    class_template: str = DEFAULT_CLASS_TEMPLATES[0]

    def pair(self, record: Record) -> tuple[str, str]:
        return prompt_and_target(record, self.caption_prompt, self.question_template)

    def text(self, record: Record) -> str:
        return record_text(record, self.class_template)


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _calibration_chunks(adapter: Adapter, records: Sequence[Record], batch_size: int) -> list[Sequence[Any]]:
    """Records in batches of ``batch_size``; a trailing batch smaller than the family's loss needs
    (``min_batch_pairs``: two for a contrastive loss) joins the previous batch."""
    least = adapter.min_batch_pairs
    if len(records) < least:
        raise DataError(f"{adapter.display_name}'s loss needs at least {least} image-text pairs")
    chunks = chunked(list(records), batch_size)
    if len(chunks) > 1 and len(chunks[-1]) < least:
        last = chunks.pop()
        chunks[-1] = list(chunks[-1]) + list(last)
    if len(chunks[0]) < least:
        raise DataError(f"{adapter.display_name}'s loss needs batches of at least {least} image-text pairs")
    return chunks


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

    Each batch holds ``pixel_values`` (the model's own image processor) and the text the
    adapter lays out (``Adapter.calibration_text``): for a generative family (BLIP-2,
    InstructBLIP, LLaVA) the record's (prompt, target) with labels on the target only; for a
    matching family (CLIP, SigLIP) the record's one text, and a trailing batch too small for the
    loss is merged into the previous batch. See docs/models.md for each family's layout.

    Captions are trained after ``caption_prompt``; questions are asked with
    ``question_template`` (``{question}``) and trained on the answer (the most frequent of
    "answers"). ``max_text_len`` bounds the text tokens (image tokens not counted).
    """
    adapter = _adapter(adapter_or_model)
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if max_text_len < 2:
        raise DataError(f"max_text_len must be at least 2, got {max_text_len}")
    if not records:
        raise DataError("no image-text records to make batches from")
    texts = RecordTexts(caption_prompt, question_template)
    batches: list[Batch] = []
    for chunk in _calibration_chunks(adapter, records, batch_size):
        batch: Batch = {"pixel_values": pixel_tensor(processor, [r["image"] for r in chunk])}
        batch.update(adapter.calibration_text(processor, chunk, max_text_len, texts))
        batches.append(batch)
    return batches


# --------------------------------------------------------------------------------------------
# The default image-text calibration set (from the hub)
# --------------------------------------------------------------------------------------------

#: Conceptual Captions 3M (web images with alt-text captions), as WebDataset shards with the
#: images inside (``jpg``, ``txt``): the set the ECoFLaP reference calibrates BLIP-2 on (its jobs
#: are named ``cc3m-...`` and read ``num_data_first_stage 128`` pairs). Streamed: only the shards
#: that the seeded shuffle reads are downloaded, never the whole set.
DEFAULT_IMAGE_TEXT_DATASET = "pixparse/cc3m-wds"
IMAGE_COLUMNS = ("jpg", "image", "png", "jpeg", "webp")
CAPTION_COLUMNS = ("txt", "caption", "text", "captions", "sentences")


def _column(row: dict[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def _row_caption(row: dict[str, Any]) -> str | None:
    value = _column(row, CAPTION_COLUMNS)
    if isinstance(value, list):
        value = next((v.get("raw", v.get("text")) if isinstance(v, dict) else v for v in value), None)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return " ".join(value.split()) if isinstance(value, str) and value.strip() else None


def _row_image(row: dict[str, Any]) -> Any:
    """The row's image as a PIL RGB image, or None when it has none or it cannot be decoded."""
    import io

    value = _column(row, IMAGE_COLUMNS)
    if isinstance(value, dict):  # an undecoded datasets Image: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        value = io.BytesIO(value)
    if value is None:
        return None
    try:
        return load_image(value)
    except DataError:
        return None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_") or "dataset"


def default_image_text_records(
    samples: int,
    seed: int,
    *,
    dataset: str = DEFAULT_IMAGE_TEXT_DATASET,
    split: str = "train",
    shuffle_buffer: int = 1000,
    cache: str | Path | None = None,
) -> list[Record]:
    """``samples`` image-caption pairs from a hub dataset (default: CC3M), as the records
    :func:`read_image_text_jsonl` returns (``{"image": absolute path, "caption": text}``).

    The dataset is streamed through ``datasets`` (shuffled with ``seed`` in a buffer of
    ``shuffle_buffer`` rows); ``dataset`` may also be a local directory written by
    ``Dataset.save_to_disk`` (read the same way). A row needs an image column (``jpg``, ``image``,
    ...) and a caption column (``txt``, ``caption``, ``captions``, ...); rows whose image does not
    decode or whose caption is empty are skipped. The images are written as PNG files with a
    ``records.jsonl`` beside them under ``cache`` (default ``$ECOFLAP_CACHE/calibration/...``),
    which is read back with :func:`read_image_text_jsonl`, so a later call with the same
    arguments needs no network and the batches equal those of ``--calib records.jsonl``.

    Without ``datasets`` or without the hub, one line: a ``MissingDependencyError`` or a
    ``DataError`` naming the dataset and ``--calib``.
    """
    from ecoflap_cli.errors import MissingDependencyError

    if samples < 1:
        raise DataError(f"the number of calibration pairs must be at least 1, got {samples}")
    local = Path(dataset).expanduser()
    is_local = local.is_dir()
    name = str(local.resolve()) if is_local else dataset
    if cache is None:
        from ecoflap_cli.data.assets import cache_dir

        tag = hashlib.sha1(name.encode()).hexdigest()[:8] if is_local else _slug(dataset)
        cache = cache_dir() / "calibration" / f"{tag}-{_slug(split)}-seed{seed}-n{samples}-b{shuffle_buffer}"
    folder = Path(cache)
    listing = folder / "records.jsonl"
    if listing.is_file():
        return read_image_text_jsonl(listing)
    hint = "pass local image-text pairs with --calib FILE.jsonl"
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise MissingDependencyError("datasets", f"the default image-text calibration set ({dataset}; or {hint})",
                                     "hub") from None  # fmt: skip
    pairs: list[tuple[Any, str]] = []
    try:
        if is_local:
            stream = datasets.load_from_disk(str(local))
            if isinstance(stream, datasets.DatasetDict):
                stream = stream[split]
            stream = stream.to_iterable_dataset()
        else:
            stream = datasets.load_dataset(dataset, split=split, streaming=True)
        for row in stream.shuffle(seed=seed, buffer_size=shuffle_buffer):
            caption, image = _row_caption(row), _row_image(row)
            if caption is not None and image is not None:
                pairs.append((image, caption))
                if len(pairs) == samples:
                    break
    except Exception as exc:  # network, auth, a missing dataset or split: all end the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"local dataset {name}" if is_local else f"hub dataset {dataset!r}"
        raise DataError(f"cannot load the default image-text calibration set, {where} ({first}); {hint}") from None
    if not pairs:
        raise DataError(f"{name} holds no image-caption pairs (an image column and a caption column); {hint}")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, caption) in enumerate(pairs):
        file = f"{index:05d}.png"
        with atomic_file(folder / file) as partial:
            image.save(partial, format="PNG")
        lines.append(json.dumps({"image": file, "caption": caption}) + "\n")
    write_atomic(listing, "".join(lines).encode("utf-8"))  # last: a folder without it is never complete
    return read_image_text_jsonl(listing)


# --------------------------------------------------------------------------------------------
# Evaluation tasks
# --------------------------------------------------------------------------------------------
