"""SigLIP (ViT + text tower, sigmoid loss) on a tiny random model with a real offline
SiglipProcessor: the adapter's towers, the max-length text layout the model pools its last
position of, the loss, the eval tasks' ranking against the model's own sigmoid scores, and
score -> allocate -> prune -> eval through the CLI with a reload by its own class and processor."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest_vlm import SIGLIP_TEXT, make_processor, make_siglip, save_model_dir, write_data
from torch import nn
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.data.multimodal import (
    load_image,
    make_multimodal_batches,
    read_class_folders,
    read_image_text_jsonl,
)
from ecoflap_cli.errors import DataError
from ecoflap_cli.evaluation.vlm import (
    clip_retrieval,
    clip_zero_shot,
)
from ecoflap_cli.models import adapter_class, get_adapter
from ecoflap_cli.models.siglip import SiglipAdapter

LENGTH = SIGLIP_TEXT["max_position_embeddings"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("siglip-data"))


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory):
    return make_processor("siglip", tmp_path_factory.mktemp("siglip-processor"))


def test_registry_knows_the_family_before_a_model_exists() -> None:
    import transformers

    cls = adapter_class("siglip")
    assert cls is SiglipAdapter and cls.eval_tasks == ("zero_shot", "retrieval") and cls.min_batch_pairs == 2
    assert getattr(transformers, cls.loader_class) is transformers.SiglipModel
    assert type(get_adapter(make_siglip())) is SiglipAdapter


def test_towers_and_what_stays_dense() -> None:
    adapter = get_adapter(make_siglip())
    assert adapter.towers() == ["vision", "text"]
    assert adapter.tower_paths() == {"vision": "vision_model.encoder.layers", "text": "text_model.encoder.layers"}
    assert not adapter.loss_through_last_block  # the loss reads both towers
    prunable = {n for b in adapter.blocks() for n in b.linears}
    assert "text_model.encoder.layers.1.self_attn.q_proj" in prunable
    assert "vision_model.encoder.layers.0.mlp.fc2" in prunable
    everything = {n for n, m in adapter.model.named_modules() if isinstance(m, nn.Linear)}
    assert everything - prunable == {"text_model.head", "vision_model.head.attention.out_proj",
                                     "vision_model.head.mlp.fc1", "vision_model.head.mlp.fc2"}  # fmt: skip
    assert [adapter.default_compare_group(b) for b in adapter.blocks()] == ["matrix"] * 2 + ["row"] * 2


def test_text_is_padded_to_the_position_table_without_a_mask(processor, data: dict) -> None:
    """SigLIP pools the last position: the layout must be the processor's padding="max_length"."""
    model = make_siglip()
    adapter = get_adapter(model)
    texts = ["a red circle", "a blue square on a yellow background"]
    ours = adapter.text_inputs(processor, texts, max_text_len=4)  # max_text_len does not apply
    reference = processor(text=texts, padding="max_length", max_length=LENGTH, return_tensors="pt")
    assert list(ours) == ["input_ids"] and ours["input_ids"].shape == (2, LENGTH)
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    with torch.no_grad():
        got = model.get_text_features(**ours).pooler_output
        shorter = model.get_text_features(**processor(text=texts, padding=True, return_tensors="pt")).pooler_output
    assert not torch.allclose(got, shorter, atol=1e-4)  # another length is another embedding


def test_batches_and_loss(processor, data: dict) -> None:
    adapter = get_adapter(make_siglip())
    captions = read_image_text_jsonl(data["captions"])[:5]
    batches = make_multimodal_batches(adapter, processor, captions, 2, 16)
    # the trailing single pair joins the previous batch: the loss needs negatives
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, LENGTH]), torch.Size([3, LENGTH])]
    assert all(set(b) == {"pixel_values", "input_ids"} for b in batches)
    with pytest.raises(DataError, match="at least 2"):
        make_multimodal_batches(adapter, processor, captions[:1], 2, 16)
    first = batches[0]
    with torch.no_grad():
        loss = float(adapter.loss(first))
        swapped = float(adapter.loss(dict(first, pixel_values=first["pixel_values"].flip(0))))
        blank = float(adapter.loss(dict(first, pixel_values=torch.zeros_like(first["pixel_values"]))))
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    assert abs(loss - swapped) > 1e-5 and abs(loss - blank) > 1e-5
    assert adapter.loss_sample_weights(first) is None  # the pairwise loss couples the samples


def test_eval_ranks_as_the_models_sigmoid_scores(processor, data: dict) -> None:
    model = make_siglip(seed=3)
    names, items = read_class_folders(data["classes"])
    result = clip_zero_shot(model, processor, data["classes"], ["a {}"], topk=(1,))
    images = [load_image(r["image"]) for r in items]
    inputs = processor(text=[f"a {n}" for n in names], images=images, padding="max_length",
                       max_length=LENGTH, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits_per_image
    probs = torch.sigmoid(logits)
    hits = (probs.argmax(dim=1) == torch.tensor([r["label"] for r in items])).float().mean()
    assert result["top1"] == pytest.approx(100 * float(hits))
    retrieval = clip_retrieval(model, processor, read_image_text_jsonl(data["captions"]))
    assert retrieval["n_images"] == 6 and retrieval["i2t_r10"] == retrieval["t2i_r10"] == 100.0


# --------------------------------------------------------------------------------------------
# Through the CLI
# --------------------------------------------------------------------------------------------


def run_cli(command: str, cwd: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, shlex.split(command), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def cli_ok(command: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    result = run_cli(command, cwd, monkeypatch)
    assert result.exit_code == 0, f"{command}\n{result.stderr}"
    return result.stdout


def test_cli_score_allocate_prune_eval_and_reload(data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoProcessor, SiglipModel

    model = save_model_dir("siglip", tmp_path / "model")
    captions = data["captions"]
    cli_ok(f"score -m {model} --calib {captions} --samples 6 --batch-size 3 -o scores.json", tmp_path, monkeypatch)
    cli_ok("allocate scores.json -s 0.5 -o plan.json", tmp_path, monkeypatch)
    cli_ok(
        f"prune -m {model} --plan plan.json --calib {captions} --samples 7 --batch-size 3 -o out", tmp_path, monkeypatch
    )
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert {g["tower"] for g in plan["groups"]} == {"vision", "text"}
    assert plan["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    planned = {t["name"]: int(t["zeros"]) for g in plan["groups"] for t in g["tensors"]}

    dense = dict(SiglipModel.from_pretrained(model).named_parameters())
    pruned = dict(SiglipModel.from_pretrained(tmp_path / "out").named_parameters())
    assert pruned.keys() == dense.keys() and planned and set(planned) <= pruned.keys()
    for name, value in pruned.items():
        if name in planned:
            assert int((value == 0).sum()) == planned[name], name
            kept = value != 0
            assert torch.equal(value[kept], dense[name][kept]), name
        else:
            assert torch.equal(value, dense[name]), f"{name} is not in the plan but changed"
    assert type(AutoProcessor.from_pretrained(tmp_path / "out")).__name__ == "SiglipProcessor"
    from ecoflap_cli.io.pruned import load_pruned

    assert type(load_pruned(tmp_path / "out")) is SiglipModel  # the package's loader too

    stdout = cli_ok(
        f"eval out --images {data['classes']} --template 'a {{}}' --retrieval {captions} "
        f"--compare {model} --batch-size 3 -o -",
        tmp_path,
        monkeypatch,
    )
    results = json.loads(stdout)
    assert results["summary"]["mismatches"] == 0
    assert results["summary"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert list(results["tasks"]) == ["zero_shot", "retrieval"]
    for side in ("pruned", "dense"):
        assert 0 <= results["tasks"]["zero_shot"][side]["top1"] <= 100
        assert results["tasks"]["retrieval"][side]["i2t_r10"] == 100.0

    (tmp_path / "text.txt").write_text("a photo of a red circle . " * 20)
    for options, message in (
        (f"--vqa {data['vqa']}", "--vqa needs a BLIP-2 / InstructBLIP model or a LLaVA model"),
        ("--text text.txt", "not a causal language model"),
    ):
        refused = run_cli(f"eval out {options} -o r.json", tmp_path, monkeypatch)
        assert refused.exit_code != 0 and message in refused.stderr, refused.stderr
    assert "SigLIP: use --images / --retrieval" in refused.stderr
