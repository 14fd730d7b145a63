"""Every checkpoint ecoflap writes carries a model card (README.md) whose numbers are the report's:
prune dense and packed, convert both ways; eval into the directory fills in the quality section."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.io.model_card import hub_id, render_card

runner = CliRunner(env={"HF_HUB_OFFLINE": "1"})


def cli(command: str) -> str:
    result = runner.invoke(app, shlex.split(command))
    assert result.exit_code == 0, result.output
    return result.output


def front_matter(card: str) -> dict[str, object]:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "no front matter"
    meta: dict[str, object] = {}
    key = ""
    for line in match.group(1).splitlines():
        if line.startswith("- "):
            meta.setdefault(key, []).append(line[2:])  # type: ignore[union-attr]
        else:
            key, _, value = line.partition(":")
            if value.strip():
                meta[key] = value.strip()
    return meta


def table_rows(card: str, header: str) -> list[list[str]]:
    lines = card.splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def assert_card_matches_report(directory: Path, layout: str) -> str:
    card = (directory / "README.md").read_text()
    report = json.loads((directory / "ecoflap_report.json").read_text())
    plan = json.loads((directory / "plan.json").read_text())
    meta = front_matter(card)
    assert meta["tags"] == ["pruned", "sparse", "ecoflap"]
    assert ("library_name" in meta) == (layout == "dense") and meta.get(
        "library_name", "transformers"
    ) == "transformers"
    assert "base_model" not in meta  # a local model, not a hub id
    # overall, from the report's tensors (the weights written)
    params = sum(t["numel"] for t in report["tensors"])
    zeros = sum(t["zeros"] for t in report["tensors"])
    assert f"Overall: **{pct(report['achieved_sparsity'])}** of the {params:,} weights" in card
    assert f"({zeros:,} zeros; target {pct(report['target_sparsity'])})" in card
    # per block: params and zeros summed over the block's tensors in the report
    tensors = {t["name"]: t for t in report["tensors"]}
    rows = table_rows(card, "| block | tower | params | zeros | sparsity | planned |")
    assert [r[0] for r in rows] == [g["name"] for g in plan["groups"]]
    for row, group in zip(rows, plan["groups"]):
        mine = [tensors[t["name"]] for t in group["tensors"]]
        block_params, block_zeros = sum(t["numel"] for t in mine), sum(t["zeros"] for t in mine)
        assert row[1:] == [
            group["tower"],
            str(block_params),
            str(block_zeros),
            pct(block_zeros / block_params),
            pct(group["sparsity"]),
        ]
    assert f"Solver (fine stage): {report['solver']}" in card
    assert f"Allocator: {plan['allocator']['name']}" in card
    calib = Path(report["calibration"]["source"]).name  # a base name: no absolute local path in a card
    assert f"Calibration for the solver: `{calib}`" in card and report["calibration"]["source"] not in card
    assert f"{report['calibration']['samples']} samples" in card
    if layout == "packed":
        assert "from ecoflap_cli.api import load_pruned" in card and f'load_pruned("{directory.name}")' in card
    else:
        assert f'from_pretrained("{directory.name}")' in card and "load_pruned" not in card
    return card


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_llama, calib_text) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cards")
    common = f"-m {tiny_llama} --calib {calib_text} --samples 8 --seqlen 32 --score-samples 4 --device cpu"
    cli(f"prune {common} -s 0.5 -o {root / 'dense'}")
    cli(f"prune {common} -s 0.6 --solver sparsegpt --packed -o {root / 'packed'}")
    return {"dense": root / "dense", "packed": root / "packed", "root": root}


def test_prune_writes_a_card_that_matches_the_report(pruned):
    card = assert_card_matches_report(pruned["dense"], "dense")
    assert "Scores (coarse stage): " in card and "Not measured yet" in card
    card = assert_card_matches_report(pruned["packed"], "packed")
    assert "sparsegpt" in card


def test_convert_rewrites_the_card_for_the_layout(pruned):
    root = pruned["root"]
    cli(f"convert {pruned['dense']} --to packed -o {root / 'dense-to-packed'}")
    cli(f"convert {pruned['packed']} --to dense -o {root / 'packed-to-dense'}")
    assert_card_matches_report(root / "dense-to-packed", "packed")
    assert_card_matches_report(root / "packed-to-dense", "dense")


def test_eval_into_the_checkpoint_fills_in_quality(pruned, tiny_llama, eval_text, tmp_path):
    directory = pruned["packed"]
    before = (directory / "README.md").read_text()
    cli(
        f"eval {directory} --text {eval_text} --seqlen 32 --max-windows 4 --compare {tiny_llama} "
        f"-o {directory}/eval.json"
    )
    results = json.loads((directory / "eval.json").read_text())
    card = assert_card_matches_report(directory, "packed")
    assert card != before and "Not measured yet" not in card
    rows = table_rows(card, "| metric | pruned | dense |")
    ppl = results["perplexity"]
    assert rows[0][1:] == [f"{ppl['pruned']:.2f}", f"{ppl['dense']:.2f}"]
    assert f"achieved sparsity {pct(results['summary']['achieved'])}" in card
    # eval written elsewhere leaves the card alone
    cli(f"eval {directory} --text {eval_text} --seqlen 32 --max-windows 2 -o {tmp_path / 'elsewhere.json'}")
    assert (directory / "README.md").read_text() == card
    # a converted copy keeps the results and its card shows them
    cli(f"convert {directory} --to dense -o {tmp_path / 'copy'}")
    assert table_rows((tmp_path / "copy" / "README.md").read_text(), "| metric | pruned | dense |") == rows


def test_base_model_front_matter_for_hub_ids(pruned):
    documents = {
        name: json.loads((pruned["dense"] / name).read_text())
        for name in ("ecoflap_report.json", "plan.json", "scores.json")
    }
    documents["ecoflap_report.json"]["model"]["id"] = "HuggingFaceTB/SmolLM2-135M"
    card = render_card(documents, "dense", "smollm2-pruned")
    assert front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "https://huggingface.co/HuggingFaceTB/SmolLM2-135M" in card
    assert hub_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_id("/tmp/model") is None and hub_id("model.gguf") is None and hub_id(None) is None


def test_a_failed_prune_leaves_no_card_behind(tiny_llama, calib_text, tmp_path):
    result = runner.invoke(
        app, shlex.split(f"prune -m {tiny_llama} -s 0.5 --calib {tmp_path / 'none.txt'} -o {tmp_path / 'out'}")
    )
    assert result.exit_code != 0 and not (tmp_path / "out").exists()


def test_quality_lists_every_measured_metric(pruned):
    documents = {
        name: json.loads((pruned["dense"] / name).read_text()) for name in ("ecoflap_report.json", "plan.json")
    }
    results = {
        "checkpoint": "x",
        "blocks": [],
        "summary": {"achieved": 0.5},
        "dense_model": "base",
        "tasks": {"captioning": {"cider_tokenizer": "ptb-python", "pruned": {"cider_d": 80.5, "n_images": 3}}},
        "lm_eval": {"tasks": {"cloze": {"pruned": {"acc": 0.25}, "dense": {"acc": 0.5}}}, "time_s": {"pruned": 1.0}},
    }
    card = render_card(documents, "dense", "out", [("eval.json", results)])
    rows = table_rows(card, "| metric | pruned | dense |")
    assert rows == [["captioning cider_d", "80.50", "-"], ["lm-eval cloze acc", "0.25", "0.50"]]
