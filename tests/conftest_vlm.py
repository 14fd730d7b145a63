"""Fixture builders for the vision-language tests: tiny random models, real offline processors,
small drawn images and the JSONL / class-folder data formats.

Imported by tests/test_vlm.py (not a conftest.py, so nothing here runs for other test files).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Tokenizer layout shared by every tiny model: the models' special token ids below match it.
SPECIAL = ["<pad>", "</s>", "<unk>", "<s>", "<image>"]
PAD, EOS, UNK, BOS, IMAGE = range(5)
WORDS = [
    "a", "an", "the", "photo", "of", "picture", "image", "question", "answer", "what", "color",
    "is", "shape", "red", "green", "blue", "yellow", "white", "black", "circle", "square",
    "triangle", "on", "background", "small", "big", "two", "one", "three", "and", "with", "in",
    "there", "how", "many", ":", "?", ".", ",",
]  # fmt: skip
VOCAB = 100  # every tiny model's vocabulary (> tokenizer size, like real padded vocabularies)
NUM_QUERY_TOKENS = 4

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, initializer_range=0.2)  # fmt: skip
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=VOCAB, max_position_embeddings=64, cross_attention_frequency=1,
               pad_token_id=PAD, initializer_range=0.2)  # fmt: skip
SPECIAL_IDS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
OPT_TEXT = dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                **SPECIAL_IDS)  # fmt: skip
LLAMA_TEXT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, **SPECIAL_IDS)  # fmt: skip
T5_TEXT = dict(model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
               num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=8, relative_attention_max_distance=16,
               pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)  # fmt: skip
CLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=32, **SPECIAL_IDS)  # fmt: skip
#: SigLIP pads every text to its position table: 16 keeps the tiny model's texts short
SIGLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=16, **SPECIAL_IDS)  # fmt: skip
#: LLaVA reads the vision hidden states after layer -2: with three layers, the last is unread
LLAVA_VISION = dict(VISION, model_type="clip_vision_model", num_hidden_layers=3)
#: image tokens per image: (32 / 8)^2 patches + the class token, which "default" drops
LLAVA_IMAGE_TOKENS = 16

#: case name -> (model class name, language-model text config or None for CLIP)
CASES = {
    "blip2-opt": ("blip-2", OPT_TEXT),
    "blip2-llama": ("blip-2", LLAMA_TEXT),
    "blip2-t5": ("blip-2", T5_TEXT),
    "instructblip-opt": ("instructblip", OPT_TEXT),
    "instructblip-t5": ("instructblip", T5_TEXT),
    "clip": ("clip", None),
}
BLIP_CASES = [c for c, (kind, _) in CASES.items() if kind != "clip"]


# --------------------------------------------------------------------------------------------
# Tokenizer and processors
# --------------------------------------------------------------------------------------------


def make_tokenizer():
    """A real fast tokenizer built offline: lower-cased word level, ``<s> ... </s>`` around text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=64,
    )


def _blip_image_processor():
    try:
        from transformers import BlipImageProcessorPil as cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import BlipImageProcessor as cls
    return cls(size={"height": 32, "width": 32})


def _clip_image_processor():
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as cls
    return cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _siglip_image_processor():
    try:
        from transformers import SiglipImageProcessorPil as cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import SiglipImageProcessor as cls
    return cls(size={"height": 32, "width": 32})


def make_processor(kind: str, folder: Path):
    """The family's real processor class, saved with save_pretrained and reloaded from disk."""
    from transformers import Blip2Processor, CLIPProcessor, InstructBlipProcessor, LlavaProcessor, SiglipProcessor

    tokenizer = make_tokenizer()
    if kind == "llava":
        # the processor expands "<image>" in the text, so the tokenizer must keep it whole
        tokenizer.add_tokens(["<image>"], special_tokens=True)
        cls = LlavaProcessor
        processor = cls(image_processor=_clip_image_processor(), tokenizer=tokenizer, patch_size=8,
                        vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    elif kind == "siglip":
        cls = SiglipProcessor
        processor = cls(image_processor=_siglip_image_processor(), tokenizer=tokenizer)
    elif kind == "blip-2":
        cls = Blip2Processor
        processor = cls(image_processor=_blip_image_processor(), tokenizer=tokenizer,
                        num_query_tokens=NUM_QUERY_TOKENS)  # fmt: skip
    elif kind == "instructblip":
        cls = InstructBlipProcessor
        processor = cls(image_processor=_blip_image_processor(), tokenizer=tokenizer,
                        qformer_tokenizer=make_tokenizer(), num_query_tokens=NUM_QUERY_TOKENS)  # fmt: skip
    else:
        cls = CLIPProcessor
        processor = cls(image_processor=_clip_image_processor(), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    reloaded = cls.from_pretrained(folder)
    assert reloaded.tokenizer.convert_tokens_to_ids("<image>") == IMAGE
    return reloaded


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def make_model(case: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised model in eval mode (dropout off), float32."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        CLIPConfig,
        CLIPModel,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    kind, text = {**CASES, **EXTRA_CASES}[case]
    torch.manual_seed(seed)
    if kind in ("llava", "siglip"):
        return (make_llava if kind == "llava" else make_siglip)(seed)
    if kind == "clip":
        config = CLIPConfig(text_config=dict(CLIP_TEXT), vision_config=dict(VISION), projection_dim=16)
        model = CLIPModel(config)
    else:
        config_cls, model_cls = {
            "blip-2": (Blip2Config, Blip2ForConditionalGeneration),
            "instructblip": (InstructBlipConfig, InstructBlipForConditionalGeneration),
        }[kind]
        config = config_cls(vision_config=dict(VISION), qformer_config=dict(QFORMER),
                            text_config=dict(text), num_query_tokens=NUM_QUERY_TOKENS,
                            image_token_index=IMAGE)  # fmt: skip
        model = model_cls(config)
        # random init leaves the query tokens at zero: give them content so the Q-Former output
        # (and therefore the loss) depends on the image in an interesting way
        with torch.no_grad():
            model.query_tokens.normal_(0, 1.0)
        model.generation_config.pad_token_id = PAD
        model.generation_config.eos_token_id = EOS
        model.language_model.generation_config.pad_token_id = PAD
        model.language_model.generation_config.eos_token_id = EOS
    return model.float().eval()


def make_llava(seed: int = 0, **config: object) -> torch.nn.Module:
    """A tiny LLaVA: CLIP vision tower (3 layers, the last unread), LLaMA language model."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    settings = dict(vision_config=dict(LLAVA_VISION), text_config=dict(LLAMA_TEXT), image_token_index=IMAGE,
                    image_seq_length=LLAVA_IMAGE_TOKENS) | config  # fmt: skip
    model = LlavaForConditionalGeneration(LlavaConfig(**settings))
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model.float().eval()


def make_siglip(seed: int = 0) -> torch.nn.Module:
    """A tiny SigLIP: ViT and text towers of two layers each."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(text_config=dict(SIGLIP_TEXT), vision_config=dict(VISION))
    return SiglipModel(config).float().eval()


#: the families that have their own test files (not in CASES: the shared tests branch on CASES)
EXTRA_CASES = {"llava": ("llava", LLAMA_TEXT), "siglip": ("siglip", None)}


# --------------------------------------------------------------------------------------------
# Images and data files
# --------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (240, 220, 40), "white": (250, 250, 250), "black": (10, 10, 10)}  # fmt: skip
#: (file name, shape, shape colour, background colour)
PICTURES = [
    ("red_circle.png", "circle", "red", "white"),
    ("blue_square.png", "square", "blue", "yellow"),
    ("green_triangle.png", "triangle", "green", "black"),
    ("yellow_circle.png", "circle", "yellow", "blue"),
    ("white_square.png", "square", "white", "red"),
    ("black_triangle.png", "triangle", "black", "green"),
]


def draw(shape: str, colour: str, background: str, size: int = 48):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size + 8), COLOURS[background])
    pen = ImageDraw.Draw(image)
    box = (8, 10, size - 8, size - 2)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(size // 2, 10), (8, size - 2), (size - 8, size - 2)], fill=COLOURS[colour])
    return image


def write_data(root: Path) -> dict[str, Path]:
    """Images, a caption JSONL, a VQA JSONL and a class folder below ``root``."""
    images = root / "images"
    images.mkdir(parents=True)
    caption_lines, vqa_lines = [], []
    for name, shape, colour, background in PICTURES:
        draw(shape, colour, background).save(images / name)
        caption = f"a {colour} {shape} on a {background} background"
        caption_lines.append({"image": f"images/{name}", "caption": caption})
        vqa_lines.append({"image": f"images/{name}", "question": f"what color is the {shape}?",
                          "answers": [colour, colour, colour, f"{colour} {shape}"]})  # fmt: skip
    # a second caption for the first image (several references per image)
    caption_lines.append({"image": "images/red_circle.png", "caption": "a red circle"})
    # one single-answer record ("answer": str)
    vqa_lines.append({"image": "images/blue_square.png", "question": "what shape is there?",
                      "answer": "square"})  # fmt: skip
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in caption_lines))
    vqa = root / "vqa.jsonl"
    vqa.write_text("".join(json.dumps(r) + "\n" for r in vqa_lines))
    classes = root / "classes"
    for name, shape, colour, background in PICTURES:
        folder = classes / shape
        folder.mkdir(parents=True, exist_ok=True)
        draw(shape, colour, background).save(folder / name)
    (classes / "circle" / "notes.txt").write_text("not an image")
    return {"root": root, "captions": captions, "vqa": vqa, "classes": classes}


def processor_for(processors: dict[str, object], case: str) -> object:
    return processors[CASES[case][0]]


def save_model_dir(case: str, folder: Path, seed: int = 0) -> Path:
    """A tiny model saved as a Hugging Face directory with its processor (what `ecoflap` loads)."""
    model = make_model(case, seed=seed)
    model.save_pretrained(folder)
    make_processor({**CASES, **EXTRA_CASES}[case][0], folder)
    return folder
