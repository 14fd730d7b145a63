"""Vision-language adapters (BLIP-2 / InstructBLIP with OPT, LLaMA or FlanT5; CLIP), image-text
data and eval tasks, on tiny random models with real offline processors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest_vlm import (
    BLIP_CASES,
    BOS,
    CASES,
    EOS,
    IMAGE,
    NUM_QUERY_TOKENS,
    PAD,
    make_model,
    make_processor,
    make_tokenizer,
    processor_for,
    write_data,
)
from torch import nn

from ecoflap_cli.data.multimodal import (
    make_multimodal_batches,
    read_class_folders,
    read_image_text_jsonl,
)
from ecoflap_cli.engine.blockwise import capture_inputs, capture_outputs, run_block
from ecoflap_cli.engine.pruning import PruneSettings, prune_model
from ecoflap_cli.engine.scoring import ZerothOrderSettings, zeroth_order_scores
from ecoflap_cli.errors import DataError
from ecoflap_cli.evaluation.vlm import (
    caption_eval,
    clip_retrieval,
    clip_zero_shot,
    vqa_eval,
)
from ecoflap_cli.models import REGISTRY, get_adapter
from ecoflap_cli.models.base import Adapter, hidden_of
from ecoflap_cli.models.blip2 import Blip2Adapter, InstructBlipAdapter
from ecoflap_cli.models.clip import CLIPAdapter

ALL_CASES = list(CASES)
T5_CASES = [c for c in BLIP_CASES if c.endswith("-t5")]


@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("vlm-data"))


@pytest.fixture(scope="module")
def processors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("processors")
    return {kind: make_processor(kind, root / kind) for kind in ("blip-2", "instructblip", "clip")}


@pytest.fixture(scope="module")
def records(vlm_data: dict[str, Path]) -> list[dict]:
    """Caption and question records mixed (captions first, a question record in each batch)."""
    captions = read_image_text_jsonl(vlm_data["captions"])
    questions = read_image_text_jsonl(vlm_data["vqa"])
    return [captions[0], questions[1], captions[2], questions[3]]


def adapter_for(case: str, include_qformer: bool = False, seed: int = 0) -> Adapter:
    model = make_model(case, seed=seed)
    if CASES[case][0] == "clip":
        return get_adapter(model)
    return REGISTRY[model.config.model_type](model, include_qformer=include_qformer)


def batches_for(adapter: Adapter, processors: dict, case: str, records: list[dict]) -> list[dict]:
    return make_multimodal_batches(adapter, processor_for(processors, case), records, 2, 16)


# --------------------------------------------------------------------------------------------
# Block discovery
# --------------------------------------------------------------------------------------------


def test_registry_picks_the_family_adapter() -> None:
    expected = {"blip-2": Blip2Adapter, "instructblip": InstructBlipAdapter, "clip": CLIPAdapter}
    for case in ALL_CASES:
        adapter = get_adapter(make_model(case))
        assert type(adapter) is expected[CASES[case][0]]
        assert adapter.data_kind == "image-text"
        if CASES[case][0] != "clip":
            assert adapter.include_qformer is False


def test_get_adapter_passes_options_a_family_takes(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ecoflap_cli.models.causal_lm import CausalLMAdapter

    blip = get_adapter(make_model("blip2-opt"), include_qformer=True)
    assert type(blip) is Blip2Adapter and blip.include_qformer and "qformer" in blip.towers()
    instruct = get_adapter(make_model("instructblip-opt"), include_qformer=False)
    assert instruct.towers() == ["vision", "language"]
    # families without a Q-Former ignore the option
    clip = get_adapter(make_model("clip"), include_qformer=True)
    assert type(clip) is CLIPAdapter and clip.towers() == ["vision", "text"]
    causal = get_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), include_qformer=True)
    assert type(causal) is CausalLMAdapter and causal.towers() == ["language"]


def test_use_cache_only_where_the_forward_takes_it() -> None:
    class Strict(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids.float()

    class Tower(Adapter):
        def tower_paths(self) -> dict[str, str]:
            return {}

    strict = Tower(Strict())
    assert strict.no_cache() == {}
    batch = {"input_ids": torch.ones(1, 2), "labels": torch.ones(1, 2)}
    assert torch.equal(strict.forward(batch), torch.ones(1, 2))
    assert adapter_for("clip").no_cache() == {"use_cache": False}  # CLIPModel.forward takes **kwargs
    # BLIP-2 takes it through **kwargs and must get it: else the LM builds a cache that the block
    # capture would store among a block's inputs
    blip = adapter_for("blip2-opt")
    assert blip.no_cache() == {"use_cache": False}
    seen: dict = {}
    layer = blip.blocks("language")[0].module
    handle = layer.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    ids = torch.tensor([[IMAGE] * NUM_QUERY_TOKENS + [BOS, 10, 11, EOS]])
    with torch.no_grad():
        blip.forward({"pixel_values": torch.zeros(1, 3, 32, 32), "input_ids": ids})
    handle.remove()
    caches = {name: kw for name, kw in seen.items() if "cache" in name and name != "use_cache"}
    assert caches and all(kw is None for kw in caches.values()), caches


def _all_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("case", BLIP_CASES)
def test_blip_blocks(case: str) -> None:
    adapter = adapter_for(case)
    seq2seq = case.endswith("-t5")
    language = ["language-encoder", "language-decoder"] if seq2seq else ["language"]
    assert adapter.towers() == ["vision", *language]
    in_blocks = {name for b in adapter.blocks() for name in b.linears}
    vision0 = adapter.blocks("vision")[0]
    qkv = vision0.linears["vision_model.encoder.layers.0.self_attn.qkv"]
    assert isinstance(qkv, nn.Linear) and qkv.out_features == 3 * qkv.in_features
    assert "vision_model.encoder.layers.0.self_attn.qkv.weight" in vision0.tensor_names()
    parts = ("self_attn.qkv", "self_attn.projection", "mlp.fc1", "mlp.fc2")
    assert set(vision0.linears) == {f"vision_model.encoder.layers.0.{n}" for n in parts}
    dense = set(_all_linears(adapter.model)) - in_blocks
    assert "language_projection" in dense
    assert any(n.startswith("qformer.") for n in dense)
    assert any(n.endswith("lm_head") for n in dense)
    for name in in_blocks:
        assert not name.startswith(("qformer", "language_projection"))
        assert "lm_head" not in name and "embed" not in name and "relative_attention_bias" not in name
    # every linear of the vision and language blocks is prunable: nothing else is
    tower_prefixes = tuple(f"{p}." for p in adapter.tower_paths().values())
    assert in_blocks == {n for n in _all_linears(adapter.model) if n.startswith(tower_prefixes)}
    if seq2seq:
        assert adapter.tower_paths()["language-encoder"] == "language_model.encoder.block"
        assert adapter.tower_paths()["language-decoder"] == "language_model.decoder.block"
        decoder0 = adapter.blocks("language-decoder")[0]
        assert "language_model.decoder.block.0.layer.1.EncDecAttention.q" in decoder0.linears
    for block in adapter.blocks():
        assert adapter.default_compare_group(block) == ("matrix" if block.tower == "vision" else "row")

    with_qformer = adapter_for(case, include_qformer=True)
    assert with_qformer.towers() == ["vision", "qformer", *language]
    qformer = {n for b in with_qformer.blocks("qformer") for n in b.linears}
    assert "qformer.encoder.layer.0.crossattention.attention.key" in qformer
    assert "qformer.encoder.layer.1.attention.attention.query" in qformer
    assert qformer == {n for n in _all_linears(with_qformer.model) if n.startswith("qformer.encoder.layer.")}
    everything = {n for b in with_qformer.blocks() for n in b.linears}
    assert "language_projection" not in everything
    assert not any("lm_head" in n for n in everything)
    assert all(with_qformer.default_compare_group(b) == "row" for b in with_qformer.blocks("qformer"))


def test_clip_blocks() -> None:
    adapter = adapter_for("clip")
    assert adapter.towers() == ["vision", "text"]
    assert adapter.tower_paths() == {
        "vision": "vision_model.encoder.layers",
        "text": "text_model.encoder.layers",
    }
    in_blocks = {n for b in adapter.blocks() for n in b.linears}
    assert "text_model.encoder.layers.1.self_attn.q_proj" in in_blocks
    assert "vision_model.encoder.layers.0.mlp.fc2" in in_blocks
    assert set(_all_linears(adapter.model)) - in_blocks == {"visual_projection", "text_projection"}
    assert [adapter.default_compare_group(b) for b in adapter.blocks()] == ["matrix"] * 2 + ["row"] * 2


# --------------------------------------------------------------------------------------------
# Block-by-block replay equals the model's own forward
# --------------------------------------------------------------------------------------------


def _replay_tower(adapter: Adapter, tower: str, batches: list[dict], next_inputs=None) -> list[torch.Tensor]:
    next_inputs = next_inputs or adapter.next_inputs
    blocks = adapter.blocks(tower)
    finals = []
    with torch.no_grad():
        for item in capture_inputs(adapter, blocks[0], batches):
            for block in blocks:
                output = run_block(block, item)
                if block is not blocks[-1]:
                    item = next_inputs(block, output, item)
            finals.append(hidden_of(output))
    return finals


@pytest.mark.parametrize("case", ALL_CASES)
def test_block_replay_matches_forward(case: str, processors: dict, records: list[dict]) -> None:
    adapter = adapter_for(case, include_qformer=True)
    batches = batches_for(adapter, processors, case, records)
    for tower in adapter.towers():
        reference = capture_outputs(adapter, adapter.blocks(tower)[-1], batches)
        replayed = _replay_tower(adapter, tower, batches)
        assert len(replayed) == len(reference) == len(batches)
        for got, want in zip(replayed, reference, strict=True):
            torch.testing.assert_close(got, hidden_of(want), rtol=1e-5, atol=1e-6, msg=f"{case} {tower}")


@pytest.mark.parametrize("case", T5_CASES)
def test_t5_blocks_need_the_position_bias_handed_on(case: str, processors: dict, records: list[dict]) -> None:
    """The generic rule (same kwargs, new hidden) drops block 0's relative position bias."""
    adapter = adapter_for(case)
    batches = batches_for(adapter, processors, case, records)
    for tower in ("language-encoder", "language-decoder"):
        reference = capture_outputs(adapter, adapter.blocks(tower)[-1], batches)
        generic = _replay_tower(
            adapter, tower, batches, next_inputs=lambda b, o, i: Adapter.next_inputs(adapter, b, o, i)
        )
        assert not torch.allclose(generic[0], hidden_of(reference[0]), rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Calibration batches and losses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BLIP_CASES)
def test_blip_batch_layout(case: str, processors: dict, records: list[dict]) -> None:
    adapter = adapter_for(case)
    tokenizer = make_tokenizer()
    batches = make_multimodal_batches(adapter.model, processor_for(processors, case), records, 2, 16)
    assert [b["pixel_values"].shape for b in batches] == [torch.Size([2, 3, 32, 32])] * 2
    first = batches[0]
    ids, labels, mask = first["input_ids"], first["labels"], first["attention_mask"]
    assert torch.equal(ids[:, :NUM_QUERY_TOKENS], torch.full((2, NUM_QUERY_TOKENS), IMAGE))
    assert ((ids == IMAGE).sum(dim=1) == NUM_QUERY_TOKENS).all()
    caption = tokenizer(records[0]["caption"], add_special_tokens=False)["input_ids"]
    answer = tokenizer("blue", add_special_tokens=False)["input_ids"]  # most frequent of "answers"
    if case.endswith("-t5"):
        prompt = tokenizer("a photo of", add_special_tokens=False)["input_ids"]
        assert ids[0, : int(mask[0].sum())].tolist() == [IMAGE] * NUM_QUERY_TOKENS + prompt + [EOS]
        assert labels[0, : len(caption) + 1].tolist() == caption + [EOS]
        assert (labels[0, len(caption) + 1 :] == -100).all()
        assert labels[1, : len(answer) + 1].tolist() == answer + [EOS]
        assert torch.equal(first["decoder_attention_mask"], (labels != -100).long())
    else:
        assert (ids[:, NUM_QUERY_TOKENS] == BOS).all()
        assert (labels[ids == IMAGE] == -100).all() and (labels[:, NUM_QUERY_TOKENS] == -100).all()
        assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == PAD).all()
        # the loss covers exactly the caption (answer) tokens and the closing eos
        assert labels[0][labels[0] != -100].tolist() == caption + [EOS]
        assert labels[1][labels[1] != -100].tolist() == answer + [EOS]
        assert all(ids[i, int(mask[i].sum()) - 1] == EOS for i in range(2))  # right-padded
    if case.startswith("instructblip"):
        question = tokenizer("Question: what color is the square? Answer:")["input_ids"]
        assert first["qformer_input_ids"][1].tolist()[: len(question)] == question
    else:
        assert "qformer_input_ids" not in first
    # the adapter refuses a batch whose image tokens are missing (transformers would ignore the image)
    broken = dict(first, input_ids=torch.where(ids == IMAGE, torch.full_like(ids, 7), ids))
    with pytest.raises(DataError, match="image tokens"):
        adapter.loss(broken)


def test_clip_batches(processors: dict, vlm_data: dict) -> None:
    adapter = adapter_for("clip")
    captions = read_image_text_jsonl(vlm_data["captions"])[:5]
    batches = make_multimodal_batches(adapter, processors["clip"], captions, 2, 16)
    # the trailing single pair joins the previous batch: a one-pair contrastive loss is always 0
    assert [b["input_ids"].shape[0] for b in batches] == [2, 3]
    for batch in batches:
        assert ((batch["input_ids"] == EOS).sum(dim=1) == 1).all()
        assert batch["pixel_values"].shape[1:] == (3, 32, 32)
        assert float(adapter.loss(batch)) > 0
    with pytest.raises(DataError, match="at least 2"):
        make_multimodal_batches(adapter, processors["clip"], captions[:1], 2, 16)
    _, classes = read_class_folders(vlm_data["classes"])
    batch = make_multimodal_batches(adapter, processors["clip"], classes[:2], 2, 16)[0]
    tokens = make_tokenizer()("a photo of a circle.")["input_ids"]
    assert batch["input_ids"][0, : len(tokens)].tolist() == tokens


@pytest.mark.parametrize("case", ALL_CASES)
def test_the_image_changes_the_loss(case: str, processors: dict, records: list[dict]) -> None:
    adapter = adapter_for(case)
    batch = batches_for(adapter, processors, case, records)[0]
    swapped = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    blank = dict(batch, pixel_values=torch.zeros_like(batch["pixel_values"]))
    with torch.no_grad():
        loss, loss_swapped, loss_blank = (float(adapter.loss(b)) for b in (batch, swapped, blank))
    assert abs(loss - loss_swapped) > 1e-5
    assert abs(loss - loss_blank) > 1e-5


# --------------------------------------------------------------------------------------------
# Pruning and scoring drivers on every family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "include_qformer"), [(c, False) for c in ALL_CASES] + [("instructblip-opt", True)])
def test_wanda_prunes_exactly_the_planned_tensors(
    case: str, include_qformer: bool, processors: dict, records: list[dict]
) -> None:
    adapter = adapter_for(case, include_qformer=include_qformer)
    batches = batches_for(adapter, processors, case, records)
    model = adapter.model
    weights = dict(model.named_parameters())
    counts = {t: weights[t].numel() // 2 for b in adapter.blocks() for t in b.tensor_names()}
    assert all(weights[t].count_nonzero() == weights[t].numel() for t in counts)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = prune_model(adapter, counts, batches, PruneSettings(solver="wanda"))
    assert {r.name for r in results} == set(counts)
    assert all(r.zeros == r.planned_zeros for r in results)
    after = model.state_dict()
    for name, value in after.items():
        if name in counts:
            assert int((value == 0).sum()) == counts[name], name
        else:
            assert torch.equal(value, before[name]), f"{name} changed but was not planned"
    assert any(n.startswith("qformer.") for n in counts) == include_qformer


@pytest.mark.parametrize("case", ALL_CASES)
def test_zeroth_order_replay_agrees_with_full_forwards(case: str, processors: dict, records: list[dict]) -> None:
    adapter = adapter_for(case, include_qformer=True)
    batches = batches_for(adapter, processors, case, records)
    before = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    reused = zeroth_order_scores(adapter, batches, ZerothOrderSettings(reuse_activations=True))
    full = zeroth_order_scores(adapter, batches, ZerothOrderSettings(reuse_activations=False))
    assert list(reused) == [b.name for b in adapter.blocks()]
    for name, score in full.items():
        assert score > 0, name
        assert reused[name] == pytest.approx(score, rel=1e-5), name
    for name, value in adapter.model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("case", ALL_CASES)
def test_zeroth_order_linearized_head_agrees_with_exact_loss(case: str, processors: dict, records: list[dict]) -> None:
    """Every tower's blocks (vision, Q-Former, encoder, decoder) get the same estimates when the
    passes stop at the last block; CLIP, whose loss reads both towers, keeps the exact loss."""
    adapter = adapter_for(case, include_qformer=True)
    batches = batches_for(adapter, processors, case, records)
    exact = zeroth_order_scores(adapter, batches, ZerothOrderSettings(seed=2, head="exact"))
    auto = zeroth_order_scores(adapter, batches, ZerothOrderSettings(seed=2))
    if not adapter.loss_through_last_block:
        assert auto == exact
        return
    # the exact side differences two fp32 losses: about 1e-7 x L / eps = 5e-4 of noise per batch
    for name, score in exact.items():
        assert auto[name] == pytest.approx(score, rel=5e-3, abs=5e-4 * len(batches)), name


@pytest.mark.parametrize("case", ALL_CASES)
def test_head_gradient_per_sample_equals_whole_batch(case: str, processors: dict, records: list[dict]) -> None:
    """Where the adapter weighs each sample's loss (BLIP-2, InstructBLIP), dL/dh built one sample at
    a time equals the whole batch's; CLIP has no such weights (its loss couples the samples)."""
    from ecoflap_cli.engine.scoring import _head_gradient

    adapter = adapter_for(case, include_qformer=True)
    batch = batches_for(adapter, processors, case, records)[0]
    weights = adapter.loss_sample_weights(batch)
    if not adapter.loss_through_last_block:
        assert weights is None
        return
    assert weights is not None and sum(weights) == pytest.approx(1.0)
    assert len(weights) > 1  # the split path is taken
    final = adapter.blocks(adapter.towers()[-1])[-1]
    whole = _head_gradient(adapter, batch, final, split=False)
    split = _head_gradient(adapter, batch, final, split=True)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Reading data
# --------------------------------------------------------------------------------------------


def test_read_image_text_jsonl(vlm_data: dict, tmp_path: Path) -> None:
    captions = read_image_text_jsonl(vlm_data["captions"])
    assert len(captions) == 7
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in captions)
    questions = read_image_text_jsonl(vlm_data["vqa"])
    assert questions[0]["answers"][0] == "red" and questions[-1]["answer"] == "square"

    with pytest.raises(DataError, match="not found"):
        read_image_text_jsonl(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="no records"):
        read_image_text_jsonl(empty)
    image = json.dumps({"image": str(vlm_data["root"] / "images" / "red_circle.png"), "caption": "x"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(image + "\n" + image + "\n{not json\n")
    with pytest.raises(DataError, match="line 3"):
        read_image_text_jsonl(bad)
    missing_image = tmp_path / "missing_image.jsonl"
    missing_image.write_text(image + "\n" + json.dumps({"image": "nope.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"line 2: image file .*nope.png not found"):
        read_image_text_jsonl(missing_image)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"image": str(vlm_data["root"] / "images" / "red_circle.png")}) + "\n")
    with pytest.raises(DataError, match="line 1"):
        read_image_text_jsonl(no_text)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"image": "a.png", "question": "why?", "answers": []}) + "\n")
    with pytest.raises(DataError, match="answer"):
        read_image_text_jsonl(no_answer)


def test_read_class_folders(vlm_data: dict, tmp_path: Path) -> None:
    names, items = read_class_folders(vlm_data["classes"])
    assert names == ["circle", "square", "triangle"]
    assert len(items) == 6 and sorted({r["label"] for r in items}) == [0, 1, 2]
    assert all(r["image"].endswith(".png") and r["class_name"] == names[r["label"]] for r in items)
    with pytest.raises(DataError, match="not found"):
        read_class_folders(tmp_path / "none")
    with pytest.raises(DataError, match="no class subfolders"):
        read_class_folders(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_class_folders(tmp_path)


# --------------------------------------------------------------------------------------------
# Eval tasks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BLIP_CASES)
def test_generation_tasks_run(case: str, processors: dict, vlm_data: dict) -> None:
    model = make_model(case)
    processor = processor_for(processors, case)
    questions = read_image_text_jsonl(vlm_data["vqa"])[:3]
    captions = read_image_text_jsonl(vlm_data["captions"])[:3]
    vqa = vqa_eval(model, processor, questions, max_new_tokens=3, batch_size=2)
    assert vqa["n_questions"] == 3 and 0 <= vqa["vqa_accuracy"] <= 100 and 0 <= vqa["exact_match"] <= 100
    caps = caption_eval(model, processor, captions, max_new_tokens=4, batch_size=2)
    assert caps["n_images"] == 3 and caps["cider_d"] >= 0


@pytest.mark.parametrize("case", ["blip2-opt", "blip2-t5", "instructblip-opt"])
def test_generation_tasks_score_what_was_generated(
    case: str, processors: dict, vlm_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a generate that answers right, the metrics see exactly the answer (prompt removed)."""
    model = make_model(case)
    tokenizer = make_tokenizer()
    questions = read_image_text_jsonl(vlm_data["vqa"])
    questions = [questions[0], questions[1], questions[-1]]  # the last has one "answer"
    captions = read_image_text_jsonl(vlm_data["captions"])
    seq2seq = case.endswith("-t5")
    answers: list[list[str]] = []
    calls: list[dict] = []

    def fake_generate(**kwargs):
        calls.append(kwargs)
        rows = [tokenizer(a, add_special_tokens=False)["input_ids"] + [EOS] for a in answers.pop(0)]
        width = max(map(len, rows))
        new = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        if seq2seq:
            return torch.cat([torch.full((len(rows), 1), PAD), new], dim=1)
        return torch.cat([kwargs["input_ids"], new], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    answers[:] = [["red", "blue"], ["square"]]
    result = vqa_eval(model, processor_for(processors, case), questions, batch_size=2)
    assert result["exact_match"] == 100.0
    # answers [c, c, c, "c shape"]: leave-one-out soft accuracy (3 x 2/3 + 1) / 4 = 75%
    assert result["vqa_accuracy"] == pytest.approx(75.0)
    ids = calls[0]["input_ids"]
    assert ((ids == IMAGE).sum(dim=1) == NUM_QUERY_TOKENS).all()
    if not seq2seq:
        assert (calls[0]["attention_mask"][:, -1] == 1).all()  # left-padded for generation
    if case.startswith("instructblip"):
        assert "qformer_input_ids" in calls[0]

    answers[:] = [["a red circle on a white background", "a blue square on a yellow background"]]
    result = caption_eval(model, processor_for(processors, case), captions[:2], batch_size=2)
    assert result["n_images"] == 2 and result["cider_d"] > 100


def test_clip_tasks(processors: dict, vlm_data: dict) -> None:
    model = make_model("clip")
    processor = processors["clip"]
    zero_shot = clip_zero_shot(model, processor, vlm_data["classes"], ["a photo of a {}.", "a {class_name}"])
    assert zero_shot["n_images"] == 6 and zero_shot["n_classes"] == 3
    assert 0 <= zero_shot["top1"] <= 100 and "top5" not in zero_shot  # 3 classes: top-5 says nothing
    captions = read_image_text_jsonl(vlm_data["captions"])[:3]
    retrieval = clip_retrieval(model, processor, captions)
    assert retrieval["n_images"] == 3 and retrieval["n_texts"] == 3
    assert retrieval["i2t_r10"] == retrieval["t2i_r10"] == 100.0
    assert all(0 <= retrieval[f"{d}_r{k}"] <= 100 for d in ("i2t", "t2i") for k in (1, 5))
    # several captions of one image count as one image
    both = clip_retrieval(model, processor, read_image_text_jsonl(vlm_data["captions"]))
    assert both["n_images"] == 6 and both["n_texts"] == 7


def test_image_text_calibration_is_a_seeded_sample(vlm_data: dict, processors: dict) -> None:
    import random

    from ecoflap_cli.io.loading import LoadedModel
    from ecoflap_cli.stages.driver import CalibrationOptions, calibration_batches

    adapter = adapter_for("blip2-opt")
    loaded = LoadedModel(adapter.model, processors["blip-2"], "tiny")
    records = read_image_text_jsonl(vlm_data["captions"])

    def chosen(seed: int, samples: int) -> tuple[list, dict]:
        opts = CalibrationOptions(str(vlm_data["captions"]), samples, None, 8, seed)
        batches, prov = calibration_batches(loaded, adapter, opts)
        return batches, prov

    batches, prov = chosen(3, 4)
    want = [records[i] for i in sorted(random.Random(3).sample(range(len(records)), 4))]
    expected = make_multimodal_batches(adapter, processors["blip-2"], want, 8, 64)
    assert len(batches) == 1 and torch.equal(batches[0]["input_ids"], expected[0]["input_ids"])
    assert prov["samples"] == 4 and prov["seed"] == 3
    assert prov["tokens"] == int(expected[0]["attention_mask"].sum())
    everything, prov = chosen(0, 100)  # fewer records than asked: all of them, in file order
    assert prov["samples"] == len(records) == sum(b["input_ids"].shape[0] for b in everything)
