"""LLaVA (CLIP vision tower -> projector -> LLaMA) on a tiny random model with a real offline
LlavaProcessor: the adapter's towers (the unread last vision layer left out), the calibration
layout against the processor's own image-token expansion, the loss, and score -> allocate ->
prune -> eval through the CLI with a reload by its own class and processor."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest_vlm import (
    BOS,
    EOS,
    IMAGE,
    LLAVA_IMAGE_TOKENS,
    PAD,
    draw,
    make_llava,
    make_processor,
    make_tokenizer,
    save_model_dir,
    write_data,
)
from torch import nn
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.data.multimodal import make_multimodal_batches, read_image_text_jsonl
from ecoflap_cli.errors import DataError, ModelError
from ecoflap_cli.models import adapter_class, get_adapter
from ecoflap_cli.models.llava import LlavaAdapter


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("llava-data"))


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory):
    return make_processor("llava", tmp_path_factory.mktemp("llava-processor"))


@pytest.fixture(scope="module")
def records(data: dict[str, Path]) -> list[dict]:
    captions = read_image_text_jsonl(data["captions"])
    questions = read_image_text_jsonl(data["vqa"])
    return [captions[0], questions[1], captions[2], questions[3]]


def _linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_registry_knows_the_family_before_a_model_exists() -> None:
    import transformers

    cls = adapter_class("llava")
    assert cls is LlavaAdapter and cls.eval_tasks == ("vqa", "captioning")
    assert getattr(transformers, cls.loader_class) is transformers.LlavaForConditionalGeneration
    assert type(get_adapter(make_llava())) is LlavaAdapter


def test_towers_leave_the_unread_vision_layer_dense() -> None:
    adapter = get_adapter(make_llava())
    assert adapter.towers() == ["vision", "language"]
    assert adapter.tower_paths() == {"vision": "model.vision_tower.encoder.layers",
                                     "language": "model.language_model.layers"}  # fmt: skip
    # vision_feature_layer -2 of three layers: the model reads layers 0 and 1 only
    assert [b.name for b in adapter.blocks("vision")] == [f"model.vision_tower.encoder.layers.{i}" for i in (0, 1)]
    assert [b.index for b in adapter.blocks("language")] == [0, 1]
    prunable = {n for b in adapter.blocks() for n in b.linears}
    dense = _linears(adapter.model) - prunable
    assert {"lm_head", "model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"} <= dense
    assert {n for n in dense if n.startswith("model.vision_tower.encoder.layers.")} == {
        n for n in _linears(adapter.model) if n.startswith("model.vision_tower.encoder.layers.2.")
    }
    assert any("vision layer" in part for part in adapter.dense_parts())
    assert [adapter.default_compare_group(b) for b in adapter.blocks()] == ["matrix"] * 2 + ["row"] * 2
    # reading the last layer's output (-1) puts every vision layer in the tower
    every = get_adapter(make_llava(vision_feature_layer=-1))
    assert len(every.blocks("vision")) == 3 and not any("vision layer" in p for p in every.dense_parts())
    with pytest.raises(ModelError, match="several vision layers"):
        get_adapter(make_llava(vision_feature_layer=[-2, -3]))


def test_image_tokens_match_the_processor_and_config(processor) -> None:
    adapter = get_adapter(make_llava())
    inputs = processor(images=draw("circle", "red", "white"), text="<image> a photo of", return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE).sum()) == adapter.image_tokens() == LLAVA_IMAGE_TOKENS
    assert adapter.model.config.image_seq_length == LLAVA_IMAGE_TOKENS
    full = get_adapter(make_llava(vision_feature_select_strategy="full"))
    assert full.image_tokens() == LLAVA_IMAGE_TOKENS + 1  # the class token is kept


def test_batch_layout_and_loss(processor, records: list[dict]) -> None:
    adapter = get_adapter(make_llava())
    batches = make_multimodal_batches(adapter, processor, records, 2, 16)
    first = batches[0]
    ids, labels, mask = first["input_ids"], first["labels"], first["attention_mask"]
    start = [BOS] + [IMAGE] * LLAVA_IMAGE_TOKENS
    assert ids[:, : len(start)].tolist() == [start, start]
    # the same ids as the processor's own "<image>" expansion of the prompt, then the caption
    tokenizer = make_tokenizer()
    caption = tokenizer(records[0]["caption"], add_special_tokens=False)["input_ids"]
    prompt = processor(images=draw("circle", "red", "white"), text="<image>a photo of")["input_ids"][0][:-1]
    assert ids[0, : int(mask[0].sum())].tolist() == prompt + caption + [EOS]
    answer = tokenizer("blue", add_special_tokens=False)["input_ids"]
    assert labels[0][labels[0] != -100].tolist() == caption + [EOS]
    assert labels[1][labels[1] != -100].tolist() == answer + [EOS]
    assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == PAD).all()

    with torch.no_grad():
        loss = float(adapter.loss(first))
        swapped = float(adapter.loss(dict(first, pixel_values=first["pixel_values"].flip(0))))
        blank = float(adapter.loss(dict(first, pixel_values=torch.zeros_like(first["pixel_values"]))))
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    assert abs(loss - swapped) > 1e-5 and abs(loss - blank) > 1e-5
    weights = adapter.loss_sample_weights(first)
    assert weights is not None and sum(weights) == pytest.approx(1.0)
    broken = dict(first, input_ids=torch.where(ids == IMAGE, torch.full_like(ids, 7), ids))
    with pytest.raises(DataError, match="image tokens"):
        adapter.loss(broken)


def test_the_unread_vision_layer_cannot_change_the_loss(processor, records: list[dict]) -> None:
    """What leaving it out of the tower rests on: zeroing it leaves the loss bit for bit."""
    adapter = get_adapter(make_llava())
    batch = make_multimodal_batches(adapter, processor, records, 4, 16)[0]
    layers = adapter.model.model.vision_tower.encoder.layers
    with torch.no_grad():
        before = adapter.loss(batch)
        for linear in (m for m in layers[2].modules() if isinstance(m, nn.Linear)):
            linear.weight.zero_()
        assert torch.equal(adapter.loss(batch), before)
        for linear in (m for m in layers[1].modules() if isinstance(m, nn.Linear)):
            linear.weight.zero_()
        assert not torch.equal(adapter.loss(batch), before)


def test_perplexity_is_the_language_model_with_its_head() -> None:
    from ecoflap_cli.evaluation.measure import perplexity, perplexity_model

    model = make_llava()
    assert perplexity_model(model) is model
    windows = torch.randint(5, 40, (2, 12))
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=windows).last_hidden_state
        logits = model.lm_head(hidden)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert perplexity(model, windows) == pytest.approx(float(nll.exp()), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Through the CLI
# --------------------------------------------------------------------------------------------


def cli_ok(command: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, shlex.split(command), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, f"{command}\n{result.stderr}"
    return result.stdout


def test_cli_score_allocate_prune_eval_and_reload(data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = save_model_dir("llava", tmp_path / "model")
    captions, vqa = data["captions"], data["vqa"]
    cli_ok(f"score -m {model} --calib {captions} --samples 6 --batch-size 3 -o scores.json", tmp_path, monkeypatch)
    cli_ok("allocate scores.json -s 0.5 -o plan.json", tmp_path, monkeypatch)
    cli_ok(
        f"prune -m {model} --plan plan.json --calib {captions} --samples 6 --batch-size 3 -o out", tmp_path, monkeypatch
    )
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert {g["tower"] for g in plan["groups"]} == {"vision", "language"}
    assert "model.vision_tower.encoder.layers.2" not in {g["name"] for g in plan["groups"]}
    assert plan["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    planned = {t["name"]: int(t["zeros"]) for g in plan["groups"] for t in g["tensors"]}

    dense = dict(LlavaForConditionalGeneration.from_pretrained(model).named_parameters())
    pruned_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    pruned = dict(pruned_model.named_parameters())
    assert pruned.keys() == dense.keys() and planned and set(planned) <= pruned.keys()
    for name, value in pruned.items():
        if name in planned:
            assert int((value == 0).sum()) == planned[name], name
            kept = value != 0
            assert torch.equal(value[kept], dense[name][kept]), name
        else:
            assert torch.equal(value, dense[name]), f"{name} is not in the plan but changed"
    from ecoflap_cli.io.pruned import load_pruned

    assert type(load_pruned(tmp_path / "out")) is LlavaForConditionalGeneration  # the package's loader too
    loaded_processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert type(loaded_processor).__name__ == "LlavaProcessor"
    inputs = loaded_processor(images=draw("square", "blue", "yellow"), text="<image> what color is the square?",
                              return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        output = pruned_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]

    text = tmp_path / "text.txt"
    text.write_text("a photo of a red circle on a white background . " * 12)
    stdout = cli_ok(
        f"eval out --vqa {vqa} --captions {captions} --max-new-tokens 3 --text {text} --seqlen 16 "
        f"--compare {model} --batch-size 3 -o -",
        tmp_path,
        monkeypatch,
    )
    results = json.loads(stdout)
    assert results["summary"]["mismatches"] == 0
    assert results["summary"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert list(results["tasks"]) == ["vqa", "captioning"]
    for side in ("pruned", "dense"):
        assert 0 <= results["tasks"]["vqa"][side]["exact_match"] <= 100
        assert results["tasks"]["captioning"][side]["cider_d"] >= 0
    assert results["perplexity"]["pruned"] > 1 and results["perplexity"]["dense"] > 1

    monkeypatch.chdir(tmp_path)
    refused = CliRunner().invoke(app, shlex.split(f"eval out --images {data['classes']} -o r.json"))
    assert refused.exit_code != 0 and "--images needs a CLIP model or a SigLIP model" in refused.stderr
