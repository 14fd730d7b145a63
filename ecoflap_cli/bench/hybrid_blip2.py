"""A hybrid BLIP-2 with a real language model: tiny random ViT + Q-Former, SmolLM2-135M as the LM.

No real vision-language weights can be had offline (see ASSETS.md), so this model exercises the
real BLIP-2 module layout (ViT -> Q-Former -> projection -> LLaMA decoder) with real LM weights:

- ``Blip2Config`` with a tiny vision tower and Q-Former (random, seeded) and ``text_config`` =
  SmolLM2's ``LlamaConfig``; SmolLM2's weights are loaded into ``language_model`` (strictly);
- the image placeholder is SmolLM2's ``<empty_output>`` token (id 16, a code-notebook marker that
  plain text never produces) renamed ``<image>`` in the tokenizer: ``Blip2Processor`` finds
  ``<image>`` in the vocabulary and adds nothing, so the LM's vocabulary - and its text loss - stay
  exactly SmolLM2's (a new token would add a logit row and change every softmax);
- saved with a ``Blip2Processor`` (SmolLM2's tokenizer + a ``BlipImageProcessor``), so that
  ``Blip2ForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` reload it;
- calibration / eval data: image-caption JSONL files made from real clip-art with English
  captions (Debian ``tuxpaint-stamps-default``: ``apt-get download`` + ``dpkg-deb -x``, nothing
  installed), else scikit-image's bundled photos if that package is importable, else Pillow-drawn
  shapes.

    python -m ecoflap_cli.bench.hybrid_blip2 [--out DIR] [--run] [--sparsity 0.6]

builds ``DIR/model`` and ``DIR/data/{calib,eval}.jsonl`` (default ``~/.cache/ecoflap/hybrid-blip2``)
and prints the ``ecoflap`` commands; ``--run`` runs them (one-shot prune, then eval against the
dense hybrid) and writes ``DIR/summary.json`` with per-tower sparsities and stage times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ecoflap_cli.data.assets import cache_dir

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

#: Tiny random towers (ASSETS.md "Tiny model configs"), with 64-pixel images: 64 patches.
VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=8, initializer_range=0.2)  # fmt: skip
QFORMER: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=64, max_position_embeddings=64, cross_attention_frequency=1,
                               initializer_range=0.2)  # fmt: skip
NUM_QUERY_TOKENS = 8
#: SmolLM2's unused special token that becomes the image placeholder, and its new name
PLACEHOLDER, IMAGE_TOKEN = "<empty_output>", "<image>"
TUXPAINT = "tuxpaint-stamps-default"
IMAGE_PIXELS = 96  # data images are stored at most this large (the processor resizes to 64)

Log = Callable[[str], None]


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def image_tokenizer(tokenizer: Any) -> Any:
    """SmolLM2's tokenizer with ``<empty_output>`` renamed ``<image>`` (same id, same vocabulary)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    token_id = None
    for added in state["added_tokens"]:
        if added["content"] == PLACEHOLDER:
            added["content"], token_id = IMAGE_TOKEN, added["id"]
    vocab = state["model"]["vocab"]
    if token_id is None or vocab.get(PLACEHOLDER) != token_id or IMAGE_TOKEN in vocab:
        raise RuntimeError(f"the tokenizer has no special token {PLACEHOLDER!r} to turn into {IMAGE_TOKEN!r}")
    vocab[IMAGE_TOKEN] = vocab.pop(PLACEHOLDER)
    backend = Tokenizer.from_str(json.dumps(state))
    renamed = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
        model_max_length=tokenizer.model_max_length,
    )
    if getattr(tokenizer, "chat_template", None):
        renamed.chat_template = tokenizer.chat_template
    assert renamed.convert_tokens_to_ids(IMAGE_TOKEN) == token_id and len(renamed) == len(tokenizer)
    return renamed


def image_processor(size: int) -> Any:
    cls: type[BaseImageProcessor]  # the PIL variant where transformers has one
    try:
        from transformers import BlipImageProcessorPil as cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import BlipImageProcessor as cls
    return cls(size={"height": size, "width": size})


def build_hybrid(out: Path, gguf: Path | None = None, seed: int = 0, log: Log = _log, language: Any = None) -> Path:
    """Build and save the hybrid BLIP-2 (model + processor) into ``out``; returns ``out``.

    ``language``: SmolLM2 already loaded (a ``LoadedModel``; it is only read), else ``gguf`` (default:
    the cached SmolLM2 GGUF) is loaded.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    from ecoflap_cli.data.assets import smollm2
    from ecoflap_cli.io.loading import LoadOptions, load_model

    smol = language
    if smol is None:
        gguf = gguf or smollm2()
        log(f"loading SmolLM2 from {gguf}")
        smol = load_model(str(gguf), LoadOptions(dtype="float32", device="cpu"))
    lm, tokenizer = smol.model, image_tokenizer(smol.tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = Blip2Config(vision_config=dict(VISION), qformer_config=dict(QFORMER),
                         text_config=lm.config.to_dict(), num_query_tokens=NUM_QUERY_TOKENS,
                         image_token_index=image_id)  # fmt: skip
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).float().eval()
    model.language_model.load_state_dict(lm.state_dict(), strict=True)
    with torch.no_grad():  # random init leaves the query tokens at zero: give them content
        model.query_tokens.normal_(0, 1.0)
    for generation_config in (model.generation_config, model.language_model.generation_config):
        generation_config.bos_token_id = tokenizer.bos_token_id
        generation_config.eos_token_id = tokenizer.eos_token_id
        generation_config.pad_token_id = tokenizer.pad_token_id
    processor = Blip2Processor(image_processor=image_processor(VISION["image_size"]), tokenizer=tokenizer,
                               num_query_tokens=NUM_QUERY_TOKENS)  # fmt: skip
    if len(processor.tokenizer) != lm.config.vocab_size:
        raise RuntimeError("the processor added a token: the LM's vocabulary would no longer match")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"hybrid BLIP-2 saved to {out}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return out


# --------------------------------------------------------------------------------------------
# Image-caption data
# --------------------------------------------------------------------------------------------


def _flatten(image: Any) -> Any:
    """RGB on white (clip-art is transparent), at most IMAGE_PIXELS on its longer side."""
    from PIL import Image

    image = image.convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)
    rgb = canvas.convert("RGB")
    rgb.thumbnail((IMAGE_PIXELS, IMAGE_PIXELS))
    return rgb


def tuxpaint_pairs(work: Path, log: Log = _log) -> list[tuple[Path, str]]:
    """(png, English caption) pairs from the Debian package, downloaded and unpacked into ``work``."""
    root = work / "x" / "usr" / "share" / "tuxpaint" / "stamps"
    if not root.is_dir():
        work.mkdir(parents=True, exist_ok=True)
        for command in (["apt-get", "download", TUXPAINT], None):
            if command is None:
                debs = sorted(work.glob(f"{TUXPAINT}_*.deb"))
                if not debs:
                    raise RuntimeError("apt-get download produced no .deb")
                command = ["dpkg-deb", "-x", str(debs[-1]), str(work / "x")]
            log(" ".join(command))
            result = subprocess.run(command, cwd=work, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{command[0]} failed: {result.stderr.strip()[-300:]}")
        for deb in work.glob("*.deb"):
            deb.unlink()
        for sound in [*root.rglob("*.ogg"), *root.rglob("*.wav")]:  # only pictures and captions are used
            sound.unlink()
    pairs = []
    for text in sorted(root.rglob("*.txt")):
        png = text.with_suffix(".png")
        lines = text.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = lines[0].strip() if lines else ""
        if png.is_file() and caption and "=" not in caption:
            pairs.append((png, caption))
    if not pairs:
        raise RuntimeError(f"no png + caption pairs under {root}")
    return pairs


def _skimage_pairs() -> list[tuple[Any, str]]:
    from skimage import data  # noqa: PLC0415 - optional

    captions = {"astronaut": "an astronaut in a white space suit", "cat": "a cat with orange fur",
                "coffee": "a cup of coffee on a saucer", "rocket": "a rocket on a launch pad",
                "horse": "a black horse on a white background", "chelsea": "a tabby cat",
                "camera": "a man with a camera", "page": "a page of printed text"}  # fmt: skip
    from PIL import Image

    pairs = []
    for name, caption in captions.items():
        array = getattr(data, name)()
        if array.dtype == bool:
            array = array.astype("uint8") * 255
        pairs.append((Image.fromarray(array), caption))
    return pairs


def _drawn_pairs(count: int, seed: int) -> list[tuple[Any, str]]:
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
               "black": (10, 10, 10), "white": (250, 250, 250)}  # fmt: skip
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        shape = rng.choice(["circle", "square", "triangle"])
        colour, background = rng.sample(list(colours), 2)
        image = Image.new("RGB", (IMAGE_PIXELS, IMAGE_PIXELS), colours[background])
        pen = ImageDraw.Draw(image)
        box = (16, 16, IMAGE_PIXELS - 16, IMAGE_PIXELS - 16)
        if shape == "circle":
            pen.ellipse(box, fill=colours[colour])
        elif shape == "square":
            pen.rectangle(box, fill=colours[colour])
        else:
            low = IMAGE_PIXELS - 16
            pen.polygon([(IMAGE_PIXELS // 2, 16), (16, low), (low, low)], fill=colours[colour])
        pairs.append((image, f"a {colour} {shape} on a {background} background"))
    return pairs


def make_caption_data(
    out: Path, calib: int = 48, held_out: int = 16, seed: int = 0, source: str = "auto", log: Log = _log
) -> dict[str, Any]:
    """Write ``out/images/*.png``, ``out/calib.jsonl`` and ``out/eval.jsonl`` (disjoint images).

    ``source``: ``tuxpaint``, ``skimage``, ``drawn`` or ``auto`` (the first that works, in that
    order). Returns the paths and where the images came from.
    """
    from PIL import Image

    pairs: list[tuple[Any, str]] = []
    used = source
    for name in ["tuxpaint", "skimage", "drawn"] if source == "auto" else [source]:
        try:
            if name == "tuxpaint":
                pairs = list(tuxpaint_pairs(cache_dir() / "tuxpaint", log))
            elif name == "skimage":
                pairs = _skimage_pairs()
            elif name == "drawn":
                pairs = _drawn_pairs(calib + held_out, seed)
            else:
                raise ValueError(f"unknown image source {name!r}")
        except (ImportError, RuntimeError, OSError) as exc:
            log(f"image source {name} unavailable: {exc}")
            continue
        used = name
        break
    if not pairs:
        raise RuntimeError("no image source worked")
    random.Random(seed).shuffle(pairs)
    wanted = min(len(pairs), calib + held_out)
    n_eval = min(held_out, wanted // 4) if wanted < calib + held_out else held_out
    images = out / "images"
    shutil.rmtree(out, ignore_errors=True)
    images.mkdir(parents=True)
    lines = []
    for index, (item, caption) in enumerate(pairs[:wanted]):
        image = Image.open(item) if isinstance(item, Path) else item
        name = f"{index:04d}.png"
        _flatten(image).save(images / name)
        lines.append({"image": f"images/{name}", "caption": caption,
                      "source": item.name if isinstance(item, Path) else used})  # fmt: skip
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:n_eval]))
    (out / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[n_eval:]))
    log(f"{len(lines) - n_eval} calibration + {n_eval} held-out image-caption pairs from {used} in {out}")
    return {
        "calib": out / "calib.jsonl",
        "eval": out / "eval.jsonl",
        "source": used,
        "calib_pairs": len(lines) - n_eval,
        "eval_pairs": n_eval,
    }


# --------------------------------------------------------------------------------------------
# Checks: the image matters, and the text loss is SmolLM2's
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def text_losses(model: Any, tokenizer: Any, pixel_values: torch.Tensor, text: str) -> dict[str, float]:
    """Caption loss of the hybrid with the image seen, with the image masked out, with a blank
    image, and of its language model alone on the same text tokens.

    With the image tokens masked out of attention the text sees only itself at positions shifted
    by the number of image tokens; LLaMA's rotary attention depends on relative positions only, so
    that loss equals the language model's alone (up to float rounding). Every variant scores the
    same tokens: all but the first text token.
    """
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    image = torch.full((1, model.config.num_query_tokens), model.config.image_token_index)
    input_ids = torch.cat([image, ids], dim=1)
    # the LM alone cannot predict the first token (nothing before it): neither is it scored here
    labels = torch.cat([torch.full_like(image, -100), ids], dim=1)
    labels[:, image.shape[1]] = -100
    seen = torch.ones_like(input_ids)
    masked = seen.clone()
    masked[:, : image.shape[1]] = 0

    def loss(pixels: torch.Tensor, mask: torch.Tensor) -> float:
        return float(
            model(pixel_values=pixels, input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss
        )

    alone = float(model.language_model(input_ids=ids, labels=ids, use_cache=False).loss)
    return {
        "with_image": loss(pixel_values, seen),
        "blank_image": loss(torch.zeros_like(pixel_values), seen),
        "image_masked": loss(pixel_values, masked),
        "language_model_alone": alone,
    }


@torch.no_grad()
def caption_losses(model_dir: Path, records_file: Path, max_records: int = 16) -> dict[str, float]:
    """Mean caption loss of a saved (hybrid) BLIP-2 on image-caption records with the right
    images, with the images of the neighbouring records (rolled by one) and with blank images."""
    from ecoflap_cli.data.multimodal import make_multimodal_batches, read_image_text_jsonl
    from ecoflap_cli.io.loading import LoadOptions, load_model
    from ecoflap_cli.models import get_adapter

    loaded = load_model(str(model_dir), LoadOptions(dtype="float32", device="cpu"))
    adapter = get_adapter(loaded.model)
    records = read_image_text_jsonl(records_file)[:max_records]
    batches = make_multimodal_batches(adapter, loaded.processor, records, 8, 64)
    out = {}
    for name, change in (("matched", lambda px: px), ("rolled", lambda px: px.roll(1, dims=0)),
                         ("blank", torch.zeros_like)):  # fmt: skip
        losses = [float(adapter.loss({**b, "pixel_values": change(b["pixel_values"])})) for b in batches]
        out[name] = round(sum(losses) / len(losses), 4)
    return out


# --------------------------------------------------------------------------------------------
# The run: one-shot prune and eval through the CLI
# --------------------------------------------------------------------------------------------


def _run(command: list[str], log: Log, env: dict[str, str]) -> float:
    log("$ " + shlex.join(command))
    start = time.perf_counter()
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"command failed with exit code {result.returncode}: {shlex.join(command)}")
    return time.perf_counter() - start


def run_benchmark(
    root: Path,
    sparsity: float = 0.6,
    samples: int = 32,
    score_samples: int = 16,
    threads: int = 1,
    text: Path | None = None,
    windows: int = 8,
    seqlen: int = 256,
    log: Log = _log,
) -> dict[str, Any]:
    """``ecoflap prune`` (one-shot) and ``ecoflap eval`` on the hybrid; returns the summary."""
    model, data = root / "model", root / "data"
    pruned = root / f"pruned-{sparsity:g}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    ecoflap = [sys.executable, "-m", "ecoflap_cli"]
    prune_cmd = [*ecoflap, "prune", "--model", str(model), "--sparsity", f"{sparsity}",
                 "--calib", str(data / "calib.jsonl"), "--samples", str(samples),
                 "--score-samples", str(score_samples), "--batch-size", "8", "-o", str(pruned),
                 "--overwrite"]  # fmt: skip
    results_file = root / f"eval-{sparsity:g}.json"
    eval_cmd = [*ecoflap, "eval", str(pruned), "--captions", str(data / "eval.jsonl"),
                "--max-new-tokens", "8", "--compare", str(model), "--batch-size", "8",
                "-o", str(results_file), "--overwrite"]  # fmt: skip
    if text is not None:
        eval_cmd += ["--text", str(text), "--seqlen", str(seqlen), "--max-windows", str(windows)]
    prune_wall = _run(prune_cmd, log, env)
    eval_wall = _run(eval_cmd, log, env)
    plan = json.loads((pruned / "plan.json").read_text())
    scores = json.loads((pruned / "scores.json").read_text())
    report = json.loads((pruned / "ecoflap_report.json").read_text())
    results = json.loads(results_file.read_text())
    towers = {name: {"params": int(t["params"]), "sparsity": round(t["sparsity"], 6)}
              for name, t in plan["towers"].items()}  # fmt: skip
    blocks = [{"name": g["name"], "tower": g["tower"], "score": g["score"],
               "sparsity": round(g["sparsity"], 4)} for g in plan["groups"]]  # fmt: skip
    summary = {
        "model": str(model), "sparsity": sparsity, "threads": threads,
        "calibration": report["calibration"], "score_samples": score_samples,
        "towers": towers, "achieved_sparsity": report["achieved_sparsity"], "blocks": blocks,
        "times_s": {"score": scores["timings"]["score_s"], "prune": report["timings"]["prune_s"],
                    "prune_command_wall": round(prune_wall, 1), "eval_command_wall": round(eval_wall, 1)},
        "eval": {k: results[k] for k in ("summary", "perplexity", "tasks", "dense_model") if k in results},
        "caption_loss": {"dense": caption_losses(model, data / "eval.jsonl"),
                         "pruned": caption_losses(pruned, data / "eval.jsonl")},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }  # fmt: skip
    (root / f"summary-{sparsity:g}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build (and optionally prune) the hybrid BLIP-2 with SmolLM2 as its language model."
    )
    parser.add_argument("--out", type=Path, default=None, help="Directory (default CACHE/hybrid-blip2).")
    parser.add_argument("--images", default="auto", choices=("auto", "tuxpaint", "skimage", "drawn"))
    parser.add_argument("--calib-pairs", type=int, default=48)
    parser.add_argument("--eval-pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="Rebuild the model and data even if present.")
    parser.add_argument("--run", action="store_true", help="Run the one-shot prune and the eval.")
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--samples", type=int, default=32, help="Pruning calibration samples.")
    parser.add_argument("--score-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text", type=Path, default=None, help="Perplexity text (default: the Wikipedia test split).")
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.out or cache_dir() / "hybrid-blip2"
    root.mkdir(parents=True, exist_ok=True)
    model, data = root / "model", root / "data"
    if args.rebuild or not (model / "config.json").is_file():
        build_hybrid(model, seed=args.seed)
    if args.rebuild or not (data / "calib.jsonl").is_file():
        made = make_caption_data(data, args.calib_pairs, args.eval_pairs, args.seed, args.images)
        provenance = {k: str(v) for k, v in made.items()}
        (root / "data.json").write_text(json.dumps(provenance, indent=2) + "\n")
    pruned = root / f"pruned-{args.sparsity:g}"
    print(f"ecoflap prune --model {model} --sparsity {args.sparsity} --calib {data / 'calib.jsonl'} -o {pruned}")
    print(f"ecoflap eval {pruned} --captions {data / 'eval.jsonl'} --compare {model}")
    if args.run:
        text = args.text
        if text is None:
            from ecoflap_cli.data.assets import wikipedia_splits

            text = wikipedia_splits()["test"]
        summary = run_benchmark(root, args.sparsity, args.samples, args.score_samples, args.threads, text, args.windows)
        shown = ("towers", "achieved_sparsity", "times_s", "caption_loss")
        print(json.dumps({k: summary[k] for k in shown}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
