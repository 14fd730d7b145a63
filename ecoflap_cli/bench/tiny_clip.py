"""A small CLIP trained here from public-domain clip art, so that pruning meets learned weights.

    python -m ecoflap_cli.bench.tiny_clip            # fetch, split, train, save (cached: instant 2nd time)
    python -m ecoflap_cli.bench.tiny_clip --epochs 2 --out DIR   # a miniature of the same recipe

No real CLIP can be had offline (see ASSETS.md), so one is trained from Debian packages, fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (nothing installed):

- ``openclipart-png`` (public domain): ten category folders are the classes (``CLASSES``); a
  caption is the class prompt, half the time followed by the subfolder and file-name words
  ("a photo of a food, fruit pineapple");
- ``tuxpaint-stamps-default`` (GPL-2): stamp images with a one-line English caption each; they are
  the captioned part (retrieval) and teach the text tower real sentences.

Images are composited on white (RGBA), padded to a square, resized to 64 x 64 and written as RGB
PNGs, so ``ecoflap eval`` reads exactly what the model was trained on. Files Pillow refuses as
decompression bombs, and SVGs, are skipped; byte-identical files are kept once, and a file found
in two classes is dropped. The split is by image, seeded: per class ``test_per_class`` test and
``valid_per_class`` valid images (class-balanced), the rest (at most ``train_per_class``) train;
the captioned images likewise (``captioned_test``, ``captioned_valid``). The model is a
transformers ``CLIPModel`` (both towers 4 x 192, patch 8) with a word-level tokenizer built from
the training captions (eos appended, ``eos_token_id`` set to it), saved with a ``CLIPProcessor``.

Written under ``$ECOFLAP_CACHE/tiny-clip`` (default ``~/.cache/ecoflap/tiny-clip``)::

    model/                      CLIPModel + CLIPProcessor (loads with ecoflap like any hub CLIP)
    data/{train,valid,test}/CLASS/*.png     class-balanced images (``ecoflap eval --images``)
    data/{train,valid,test}_captions.jsonl  captioned images (``--retrieval``; train is ``--calib``)
    data/calib.jsonl            training pairs for calibration (class prompts + captions)
    manifest.json               recipe, split sizes, training log, dense numbers

The dense numbers come from ``ecoflap eval`` (run as a subprocess, as a user would).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ecoflap_cli.data.assets import cache_dir

DEBS = ("openclipart-png", "tuxpaint-stamps-default")
#: openclipart category folders used as classes (those with at least 140 distinct images)
CLASSES = ("animals", "computer", "food", "office", "people", "recreation", "shapes", "signs_and_symbols",
           "tools", "transportation")  # fmt: skip
CAPTIONED = "captioned"  # the folder name of the tuxpaint images in the splits
TEMPLATE = "a photo of a {}."  # the zero-shot prompt (ecoflap eval's default template)
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3; eos is 3 (not 2: CLIP's legacy argmax)
IMAGE = 64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUTHOR_WORDS = frozenset({"ganson", "architetto", "archit", "architett", "andremarcel", "fr", "bw", "png",
                          "svg", "rollandin", "francesco", "ar", "openclipart", "by", "the", "and", "of"})  # fmt: skip

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Recipe:
    """Everything that decides the model: its hash names the cached build."""

    seed: int = 0
    classes: tuple[str, ...] = CLASSES
    test_per_class: int = 40
    valid_per_class: int = 20
    train_per_class: int = 300
    captioned_test: int = 150
    captioned_valid: int = 100
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    patch: int = 8
    projection: int = 128
    max_text_len: int = 32
    min_word_count: int = 2
    epochs: int = 24
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Data: fetch, list, split, render
# --------------------------------------------------------------------------------------------


def fetch_debs(root: Path, log: Log = stderr_log) -> Path:
    """``apt-get download`` both packages into ``root`` and ``dpkg-deb -x`` them; returns the tree."""
    tree = root / "tree"
    if (tree / ".done").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    debs = sorted(root.glob("*.deb"))
    if len(debs) < len(DEBS):

        def download() -> subprocess.CompletedProcess[str]:
            return subprocess.run(["apt-get", "download", *DEBS], cwd=root, capture_output=True, text=True)

        log(f"apt-get download {' '.join(DEBS)}")
        result = download()
        if result.returncode != 0:  # empty or stale package lists: update once and retry
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            result = download()
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download failed: {result.stderr.strip()[-300:]}")
        debs = sorted(root.glob("*.deb"))
    partial = root / "tree.part"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
    (partial / ".done").write_text("ok\n")
    shutil.rmtree(tree, ignore_errors=True)
    partial.rename(tree)
    return tree


def filename_words(path: Path, root: Path) -> list[str]:
    """Lower-case words of the subfolders below the class folder and of the file name."""
    parts = list(path.relative_to(root).parts[1:-1]) + [path.stem]
    words = re.findall(r"[a-z]+", " ".join(parts).lower().replace("_", " "))
    return [w for w in words if len(w) > 1 and w not in AUTHOR_WORDS]


def english_caption(txt: Path) -> str | None:
    """The first line of a tuxpaint ``.txt`` (English; the other lines are translations)."""
    try:
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    first = lines[0].strip() if lines else ""
    return first if first and "=" not in first.split(" ")[0] else None


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def list_items(tree: Path, classes: Sequence[str]) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """(class -> items, captioned items); each item ``{"src", "hash", "words"|"caption"}``.

    Byte-identical files are kept once (the first in sorted order); a hash found in two classes
    is dropped from both (an image cannot have two labels).
    """
    png_root = tree / "usr/share/openclipart/png"
    by_class: dict[str, dict[str, dict[str, Any]]] = {c: {} for c in classes}
    for name in classes:
        for file in sorted((png_root / name).rglob("*.png")):
            digest = _digest(file)
            by_class[name].setdefault(digest, {"src": str(file), "hash": digest,
                                               "words": filename_words(file, png_root)})  # fmt: skip
    owners = Counter(h for items in by_class.values() for h in items)
    classed = {c: [it for h, it in items.items() if owners[h] == 1] for c, items in by_class.items()}
    stamps = tree / "usr/share/tuxpaint/stamps"
    seen = set(owners)
    captioned: list[dict[str, Any]] = []
    for file in sorted(stamps.rglob("*.png")):
        caption = english_caption(file.with_suffix(".txt"))
        if caption is None:
            continue
        digest = _digest(file)
        if digest in seen:
            continue
        seen.add(digest)
        captioned.append({"src": str(file), "hash": digest, "caption": caption})
    return classed, captioned


def render(src: str | Path, dest: Path, size: int = IMAGE) -> bool:
    """Composite on white, pad to a square, resize to ``size``; False when Pillow refuses the file."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as image:
                image.draft("RGB", (size * 4, size * 4))
                image.load()
                rgba = image.convert("RGBA")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, ValueError, SyntaxError):
        return False
    width, height = rgba.size
    if width < 2 or height < 2:
        return False
    side = max(width, height)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((side - width) // 2, (side - height) // 2))
    out = canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    out.save(dest)
    return True


def split_items(
    classed: dict[str, list[dict[str, Any]]], captioned: list[dict[str, Any]], recipe: Recipe
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """split -> class (or ``CAPTIONED``) -> items, seeded and disjoint by image.

    Each class gives ``test_per_class`` test and ``valid_per_class`` valid items (so both are
    class-balanced) and at most ``train_per_class`` train items; a class with too few items for
    its test and valid share is an error."""
    rng = random.Random(recipe.seed)
    splits: dict[str, dict[str, list[dict[str, Any]]]] = {"train": {}, "valid": {}, "test": {}}
    need = recipe.test_per_class + recipe.valid_per_class
    for name in sorted(classed):
        items = sorted(classed[name], key=lambda it: it["hash"])
        rng.shuffle(items)
        if len(items) <= need:
            raise ValueError(f"class {name} has {len(items)} images, needs more than {need}")
        splits["test"][name] = items[: recipe.test_per_class]
        splits["valid"][name] = items[recipe.test_per_class : need]
        splits["train"][name] = items[need : need + recipe.train_per_class]
    items = sorted(captioned, key=lambda it: it["hash"])
    rng.shuffle(items)
    cut = recipe.captioned_test + recipe.captioned_valid
    splits["test"][CAPTIONED] = items[: recipe.captioned_test]
    splits["valid"][CAPTIONED] = items[recipe.captioned_test : cut]
    splits["train"][CAPTIONED] = items[cut:]
    return splits


def class_phrase(name: str) -> str:
    return name.replace("_", " ")


def write_data(splits: dict[str, dict[str, list[dict[str, Any]]]], data: Path, log: Log = stderr_log) -> dict[str, Any]:
    """Render every item into ``data`` and write the JSONL files; returns the split sizes.

    Items Pillow refuses are dropped here (after the split, so the split itself does not depend
    on Pillow's limits); their count is recorded."""
    sizes: dict[str, Any] = {}
    for split, groups in splits.items():
        counts: dict[str, int] = {}
        for name, items in groups.items():
            kept = []
            for item in items:
                folder = data / (f"{split}_{CAPTIONED}" if name == CAPTIONED else f"{split}/{name}")
                dest = folder / f"{item['hash'][:16]}.png"
                if dest.is_file() or render(item["src"], dest):
                    kept.append({**item, "image": str(dest)})
            counts[name] = len(kept)
            skipped = len(items) - len(kept)
            if skipped:
                log(f"{split}/{name}: skipped {skipped} unreadable or oversized image(s)")
            groups[name] = kept
        sizes[split] = counts
        with open(data / f"{split}_captions.jsonl", "w", encoding="utf-8") as out:
            for item in groups[CAPTIONED]:
                rel = Path(item["image"]).relative_to(data)
                out.write(json.dumps({"image": str(rel), "caption": item["caption"]}) + "\n")
    # calibration pairs from train only: every captioned image and the classed ones with their prompt
    rng = random.Random(1)
    calib = []
    for name, items in splits["train"].items():
        for item in items:
            image = str(Path(item["image"]).relative_to(data))
            text = item["caption"] if name == CAPTIONED else TEMPLATE.format(class_phrase(name))
            calib.append({"image": image, "caption": text})
    rng.shuffle(calib)
    with open(data / "calib.jsonl", "w", encoding="utf-8") as out:
        for rec in calib:
            out.write(json.dumps(rec) + "\n")
    return sizes


# --------------------------------------------------------------------------------------------
# Tokenizer, model, training
# --------------------------------------------------------------------------------------------


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def build_tokenizer(texts: Sequence[str], min_count: int, max_len: int) -> Any:
    """A word-level fast tokenizer: lower-case letter runs, [UNK] for rare words, [EOS] appended."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for t in texts for w in words_of(t))
    words = sorted(w for w, c in counts.items() if c >= min_count)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z]+"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = vocab["[EOS]"]
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", model_max_length=max_len)  # fmt: skip


def build_processor(tokenizer: Any) -> Any:
    from transformers import CLIPImageProcessor, CLIPProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                             image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))  # fmt: skip
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(recipe: Recipe, vocab_size: int, image_size: int = IMAGE) -> Any:
    import torch
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=recipe.hidden, intermediate_size=4 * recipe.hidden, num_hidden_layers=recipe.layers,
                 num_attention_heads=recipe.heads)  # fmt: skip
    text = dict(tower, vocab_size=vocab_size, max_position_embeddings=recipe.max_text_len,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    vision = dict(tower, image_size=image_size, patch_size=recipe.patch)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=recipe.projection)
    torch.manual_seed(recipe.seed)
    return CLIPModel(config)


def training_texts(name: str, item: dict[str, Any], rng: random.Random) -> str:
    """The text an item is trained with this epoch: a caption, or the class prompt (half the
    time followed by the file-name words)."""
    if name == CAPTIONED:
        return item["caption"]
    prompt = TEMPLATE.format(class_phrase(name))
    if item["words"] and rng.random() < 0.5:
        return f"{prompt[:-1]}, {' '.join(item['words'])}"
    return prompt


def pixel_tensor(processor: Any, paths: Sequence[str]) -> Any:
    import torch
    from PIL import Image

    out = []
    for start in range(0, len(paths), 256):
        images = []
        for p in paths[start : start + 256]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        out.append(processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(out)


def augment(pixels: Any, generator: Any) -> Any:
    """Random horizontal flip and a shift of up to 4 pixels (white fill), per image."""
    import torch

    n, _, h, w = pixels.shape
    flip = torch.rand(n, generator=generator) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    white = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(1, 3, 1, 1)
    padded = white.expand(n, 3, h + 8, w + 8).clone()
    padded[:, :, 4 : 4 + h, 4 : 4 + w] = pixels
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train(
    model: Any,
    processor: Any,
    examples: Sequence[tuple[str, dict[str, Any]]],
    recipe: Recipe,
    log: Log = stderr_log,
    monitor: Callable[[Any, int], dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Train in place with AdamW (cosine schedule after a linear warmup); returns the epoch log."""
    import torch

    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    pixels = pixel_tensor(processor, [item["image"] for _, item in examples])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                               {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))  # fmt: skip
    steps_per_epoch = max(1, len(examples) // recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    warmup = min(recipe.warmup_steps, max(1, total // 5))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    tokenizer = processor.tokenizer
    history: list[dict[str, Any]] = []
    for epoch in range(recipe.epochs):
        model.train()
        start, losses = time.perf_counter(), []
        order: list[int] = torch.randperm(len(examples), generator=generator).tolist()
        for step in range(steps_per_epoch):
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            texts = [training_texts(*examples[i], rng) for i in idx]
            enc = tokenizer(texts, padding=True, truncation=True, max_length=recipe.max_text_len, return_tensors="pt")
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        pixel_values=augment(pixels[idx], generator), return_loss=True)  # fmt: skip
            optim.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(out.loss.item())
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": round(sum(losses) / len(losses), 4),
                               "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        if monitor is not None:
            model.eval()
            row.update(monitor(model, epoch))
        history.append(row)
        log(" ".join(f"{k}={v}" for k, v in row.items()))
    model.eval()
    return history


def zero_shot_accuracy(model: Any, processor: Any, paths: Sequence[str], labels: Sequence[int],
                       classes: Sequence[str]) -> float:  # fmt: skip
    """Quick in-training monitor (the reported numbers come from ecoflap's own eval)."""
    import torch

    with torch.no_grad():
        prompts = [TEMPLATE.format(class_phrase(c)) for c in classes]
        enc = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        text = torch.nn.functional.normalize(_features(model.get_text_features(**enc)), dim=-1)
        pixels = pixel_tensor(processor, paths)
        image = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
        pred = (image @ text.T).argmax(-1)
    return round(float((pred == torch.tensor(list(labels))).float().mean()), 4)


def _features(output: Any) -> Any:
    return output if hasattr(output, "norm") else output.pooler_output


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def build(
    out: Path | None = None,
    recipe: Recipe | None = None,
    *,
    tree: Path | None = None,
    classed: dict[str, list[dict[str, Any]]] | None = None,
    captioned: list[dict[str, Any]] | None = None,
    evaluate: bool = True,
    log: Log = stderr_log,
) -> Path:
    """Build (or find cached) the model and data under ``out``; returns ``out``.

    ``classed`` / ``captioned`` replace the Debian images (the tests pass a handful built with
    Pillow); otherwise the packages are fetched into ``CACHE/debian``."""
    import torch

    recipe = recipe or Recipe()
    out = Path(out) if out is not None else cache_dir() / "tiny-clip"
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("recipe_key") == recipe.key() and (out / "model" / "config.json").is_file():
            if evaluate and "dense" not in manifest:
                manifest["dense"] = dense_numbers(out, log)
                manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
            log(f"cached: {out}")
            return out
    if classed is None or captioned is None:
        tree = tree or fetch_debs(cache_dir() / "debian", log)
        log("listing images")
        classed, captioned = list_items(tree, recipe.classes)
    splits = split_items(classed, captioned, recipe)
    work = Path(tempfile.mkdtemp(prefix=".tiny-clip-", dir=out.parent if out.parent.exists() else None))
    try:
        data = work / "data"
        data.mkdir(parents=True)
        log("rendering images")
        sizes = write_data(splits, data, log)
        log(f"split sizes: {json.dumps(sizes)}")
        classes = sorted(n for n in splits["train"] if n != CAPTIONED)
        examples = [(name, item) for name, items in sorted(splits["train"].items()) for item in items]
        texts = [training_texts(n, it, random.Random(0)) for n, it in examples]
        texts += [f"{TEMPLATE.format(class_phrase(n))[:-1]}, {' '.join(it['words'])}" for n, it in examples
                  if n != CAPTIONED]  # fmt: skip
        tokenizer = build_tokenizer(texts, recipe.min_word_count, recipe.max_text_len)
        processor = build_processor(tokenizer)
        model = build_model(recipe, len(tokenizer))
        log(f"CLIPModel: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
        valid = [(it["image"], classes.index(n)) for n, items in splits["valid"].items() if n != CAPTIONED
                 for it in items]  # fmt: skip

        def monitor(m: Any, epoch: int) -> dict[str, float]:
            if epoch % 4 != 3 and epoch != recipe.epochs - 1:
                return {}
            return {"valid_top1": zero_shot_accuracy(m, processor, [p for p, _ in valid], [y for _, y in valid],
                                                     classes)}  # fmt: skip

        started = time.perf_counter()
        history = train(model, processor, examples, recipe, log, monitor)
        train_seconds = round(time.perf_counter() - started, 1)
        model_dir = work / "model"
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        manifest = {"recipe": asdict(recipe), "recipe_key": recipe.key(), "split_sizes": sizes,
                    "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
                    "train_seconds": train_seconds, "torch_threads": torch.get_num_threads(),
                    "history": history}  # fmt: skip
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if evaluate:
        manifest = json.loads(manifest_path.read_text())
        manifest["dense"] = dense_numbers(out, log)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def ecoflap(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``ecoflap`` command (this interpreter's), as a user would; raise with its stderr."""
    cmd = [sys.executable, "-m", "ecoflap_cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-1500:]}")
    return result


def eval_split(model: str | Path, data: Path, split: str) -> dict[str, Any]:
    """``ecoflap eval MODEL --images DATA/SPLIT --retrieval DATA/SPLIT_captions.jsonl``: its tasks."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        ecoflap("eval", str(model), "--images", str(data / split), "--retrieval", str(data / f"{split}_captions.jsonl"),
                "--device", "cpu", "-o", str(out))  # fmt: skip
        results = json.loads(out.read_text())
    return {"tasks": results["tasks"], "summary": results.get("summary"), "blocks": results.get("blocks")}


def dense_numbers(out: Path, log: Log = stderr_log) -> dict[str, Any]:
    """Zero-shot top-1 and retrieval on valid and test, through ``ecoflap eval``."""
    numbers = {}
    for split in ("valid", "test"):
        numbers[split] = eval_split(out / "model", out / "data", split)["tasks"]
        log(f"dense {split}: {json.dumps(numbers[split])}")
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="Output directory (default: CACHE/tiny-clip).")
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    parser.add_argument("--no-eval", action="store_true", help="Skip the dense evaluation.")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    recipe = Recipe(seed=args.seed, epochs=args.epochs)
    out = build(args.out, recipe, evaluate=not args.no_eval)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
