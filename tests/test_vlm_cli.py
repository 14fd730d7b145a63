"""The CLI on tiny vision-language checkpoints saved with their processors: score -> allocate ->
prune -> eval for BLIP-2 (OPT, LLaMA, FlanT5), InstructBLIP and CLIP; joint and per-tower
budgets; the Wanda comparison-group override; the eval tasks with a dense comparison; one real
shell pipe."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest_vlm import CASES, PICTURES, save_model_dir, write_data
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.data.multimodal import (
    read_image_text_jsonl,
)
from ecoflap_cli.evaluation.vlm import (
    caption_eval,
    clip_retrieval,
    clip_zero_shot,
    vqa_eval,
)
from ecoflap_cli.io.loading import load_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ECOFLAP = f"{shlex.quote(sys.executable)} -m ecoflap_cli"
MODEL_CLASS = {"blip-2": "Blip2ForConditionalGeneration",
               "instructblip": "InstructBlipForConditionalGeneration", "clip": "CLIPModel"}  # fmt: skip
PROCESSOR_CLASS = {"blip-2": "Blip2Processor", "instructblip": "InstructBlipProcessor",
                   "clip": "CLIPProcessor"}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("vlm-cli-data"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """case -> a saved tiny model directory (model + processor), built once per module."""
    root = tmp_path_factory.mktemp("vlm-models")
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            made[case] = save_model_dir(case, root / case)
        return made[case]

    return get


def run_cli(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def cli_ok(command: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    code, out, err = run_cli(shlex.split(command), cwd, monkeypatch)
    assert code == 0, f"{command}\n{err}"
    return out, err


def model_class(case: str):
    import transformers

    return getattr(transformers, MODEL_CLASS[CASES[case][0]])


def planned_zeros(plan: dict) -> dict[str, int]:
    return {t["name"]: int(t["zeros"]) for g in plan["groups"] for t in g["tensors"]}


def check_checkpoint(case: str, dense_dir: Path, out: Path) -> dict:
    """Reload with the family's own class and AutoProcessor; zeros as planned; the rest untouched."""
    from transformers import AutoProcessor

    plan = json.loads((out / "plan.json").read_text())
    planned = planned_zeros(plan)
    cls = model_class(case)
    dense = dict(cls.from_pretrained(dense_dir).named_parameters())
    pruned_model = cls.from_pretrained(out).eval()
    pruned = dict(pruned_model.named_parameters())
    assert pruned.keys() == dense.keys()
    assert planned and set(planned) <= pruned.keys()
    for name, value in pruned.items():
        if name in planned:
            assert int((value == 0).sum()) == planned[name], name
            # Wanda only zeroes weights: every kept weight is the dense one, bit for bit
            kept = value != 0
            assert torch.equal(value[kept], dense[name][kept]), name
        else:
            assert torch.equal(value, dense[name]), f"{name} is not in the plan but changed"
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == PROCESSOR_CLASS[CASES[case][0]]
    return {"plan": plan, "model": pruned_model, "processor": processor}


def generate_answers(model, processor, image_path: str) -> str:
    """What a user does with the reloaded checkpoint: processor in, generate, decode."""
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=image, text="Question: what color is the circle? Answer:", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    if not model.config.text_config.is_encoder_decoder:  # a decoder-only LM returns the prompt too
        output = output[:, inputs["input_ids"].shape[1] :]
    new = output
    assert new.shape[1] >= 1
    return processor.batch_decode(new, skip_special_tokens=True)[0]


EVAL_TASKS = {
    "blip": "--vqa {vqa} --captions {captions} --max-new-tokens 3",
    "clip": "--images {classes} --template 'a photo of a {{}}.' --template 'a {{}}' --retrieval {captions}",
}


def family(case: str) -> str:
    return "clip" if CASES[case][0] == "clip" else "blip"


# --------------------------------------------------------------------------------------------
# Every family through the stages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_stages_reload_and_eval(
    case: str, model_dir, data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_dir(case)
    captions = data["captions"]
    cli_ok(f"score -m {model} --calib {captions} --samples 6 --batch-size 3 -o scores.json", tmp_path, monkeypatch)
    _, err = cli_ok("allocate scores.json -s 0.5 -o plan.json", tmp_path, monkeypatch)
    assert "budget per tower" in err and "vision" in err
    cli_ok(
        f"prune -m {model} --plan plan.json --calib {captions} --samples 7 --batch-size 4 -o out", tmp_path, monkeypatch
    )
    out = tmp_path / "out"
    checked = check_checkpoint(case, model, out)
    plan = checked["plan"]
    assert plan == json.loads((tmp_path / "plan.json").read_text())
    assert plan["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    towers = {g["tower"] for g in plan["groups"]}
    if case == "clip":
        assert towers == {"vision", "text"}
    elif case.endswith("-t5"):
        assert towers == {"vision", "language-encoder", "language-decoder"}
    else:
        assert towers == {"vision", "language"}
    report = json.loads((out / "ecoflap_report.json").read_text())
    assert report["calibration"]["source"] == str(captions) and report["calibration"]["samples"] == 7
    if family(case) == "blip":
        image = str(data["root"] / "images" / "red_circle.png")
        assert isinstance(generate_answers(checked["model"], checked["processor"], image), str)

    tasks = EVAL_TASKS[family(case)].format(**{k: str(v) for k, v in data.items()})
    stdout, err = cli_ok(f"eval out {tasks} --compare {model} --batch-size 3 -o -", tmp_path, monkeypatch)
    results = json.loads(stdout)
    assert results["summary"]["mismatches"] == 0
    assert results["summary"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert results["dense_model"] == str(model)
    assert "vision-language tasks" in err and "dense" in err
    names = ["zero_shot", "retrieval"] if family(case) == "clip" else ["vqa", "captioning"]
    assert list(results["tasks"]) == names
    for name in names:
        for side in ("pruned", "dense"):
            metrics = results["tasks"][name][side]
            scores = {k: v for k, v in metrics.items() if not k.startswith("n_") and k != "time_s"}
            assert scores and all(0 <= v <= (1000 if k == "cider_d" else 100) for k, v in scores.items())
    # the dense column is what the library computes on the input model with the same settings
    dense = load_model(str(model))
    if family(case) == "clip":
        want = clip_zero_shot(dense.model, dense.processor, data["classes"], ["a photo of a {}.", "a {}"], batch_size=3)
        got = results["tasks"]["zero_shot"]["dense"]
        assert {k: got[k] for k in want} == want and got["n_classes"] == 3
        want = clip_retrieval(dense.model, dense.processor, read_image_text_jsonl(captions), batch_size=3)
        assert {k: results["tasks"]["retrieval"]["dense"][k] for k in want} == want
        assert results["tasks"]["zero_shot"]["templates"] == ["a photo of a {}.", "a {}"]
    else:
        want = vqa_eval(
            dense.model, dense.processor, read_image_text_jsonl(data["vqa"]), max_new_tokens=3, batch_size=3
        )
        assert {k: results["tasks"]["vqa"]["dense"][k] for k in want} == want
        want = caption_eval(
            dense.model, dense.processor, read_image_text_jsonl(captions), max_new_tokens=3, batch_size=3
        )
        assert {k: results["tasks"]["captioning"]["dense"][k] for k in want} == want
        assert results["tasks"]["vqa"]["question_template"] == "Question: {question} Answer:"
        assert results["tasks"]["captioning"]["prompt"] == "a photo of"
        assert results["tasks"]["captioning"]["cider_tokenizer"] in ("coco-ptb-java", "ptb-python")


def test_real_shell_pipe_blip2_opt(model_dir, data: dict, tmp_path: Path) -> None:
    model, captions = model_dir("blip2-opt"), data["captions"]
    command = (
        f"{ECOFLAP} score -m {model} --calib {captions} --samples 6 --batch-size 3 -o - "
        f"| {ECOFLAP} allocate - --sparsity 0.6 -o - "
        f"| tee plan.json "
        f"| {ECOFLAP} prune -m {model} --plan - --calib {captions} --samples 7 --batch-size 4 -o out "
        f"&& {ECOFLAP} eval out --vqa {data['vqa']} --max-new-tokens 2 -o - > results.json"
    )
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "budget per tower" in result.stderr and "VQA" in result.stderr
    checked = check_checkpoint("blip2-opt", model, tmp_path / "out")
    assert checked["plan"] == json.loads((tmp_path / "plan.json").read_text())
    assert checked["plan"]["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["summary"]["mismatches"] == 0 and "vqa" in results["tasks"]
    generate_answers(checked["model"], checked["processor"], str(data["root"] / "images" / PICTURES[1][0]))


# --------------------------------------------------------------------------------------------
# Joint and per-tower budgets
# --------------------------------------------------------------------------------------------


def tower_sparsity_from_eval(results: dict) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for row in results["tensors"]:
        entry = totals.setdefault(row["tower"], [0, 0])
        entry[0] += row["zeros"]
        entry[1] += row["params"]
    return {tower: zeros / params for tower, (zeros, params) in totals.items()}


@pytest.mark.parametrize("include_qformer", [False, True])
def test_joint_budget_and_per_tower(
    include_qformer: bool, model_dir, data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, captions = model_dir("blip2-opt"), data["captions"]
    qformer = " --include-qformer" if include_qformer else ""
    target = 0.6
    cli_ok(
        f"score -m {model} --calib {captions} --samples 6 --batch-size 3{qformer} -o scores.json", tmp_path, monkeypatch
    )
    # the default for several towers is the paper's rule (auto), and the plan says so
    _, joint_err = cli_ok(f"allocate scores.json -s {target} -o joint.json", tmp_path, monkeypatch)
    _, tower_err = cli_ok(f"allocate scores.json -s {target} --per-tower -o towers.json", tmp_path, monkeypatch)
    joint = json.loads((tmp_path / "joint.json").read_text())
    per_tower = json.loads((tmp_path / "towers.json").read_text())
    towers = ["vision", "qformer", "language"] if include_qformer else ["vision", "language"]
    assert list(joint["towers"]) == list(per_tower["towers"]) == towers
    for err in (joint_err, tower_err):  # the plan table names each block's tower and each tower's budget
        assert "budget per tower" in err and all(t in err for t in towers)
    groups = len(joint["groups"])
    total = sum(g["params"] for g in joint["groups"])

    # joint budget: one global count, exact to rounding; towers are free to differ
    assert joint["allocator"]["name"] == "ecoflap" and "towers" in joint["allocator"]["chosen"]
    assert joint["allocator"]["per_tower"] is False
    assert abs(sum(g["zeros"] for g in joint["groups"]) - round(total * target)) <= groups
    assert joint["achieved_sparsity"] == pytest.approx(target, abs=groups / total)
    sparsities = [joint["towers"][t]["sparsity"] for t in towers]
    assert max(sparsities) - min(sparsities) > 0.05, joint["towers"]
    cap = joint["allocator"]["max_sparsity"]
    assert all(g["sparsity"] <= cap + 1e-9 for g in joint["groups"])
    # the tower with more importance per weight keeps more of its weights
    by_score = sorted(
        towers, key=lambda t: sum(g["score"] for g in joint["groups"] if g["tower"] == t) / joint["towers"][t]["params"]
    )
    assert joint["towers"][by_score[0]]["sparsity"] >= joint["towers"][by_score[-1]]["sparsity"]

    # per tower: each tower holds the target on its own
    assert per_tower["allocator"]["per_tower"] is True
    for tower in towers:
        entry = per_tower["towers"][tower]
        blocks = sum(1 for g in per_tower["groups"] if g["tower"] == tower)
        assert entry["sparsity"] == pytest.approx(target, abs=blocks / entry["params"]), (tower, entry)

    # both plans prune to exactly what they say, tower by tower
    for name in ("joint", "towers"):
        cli_ok(
            f"prune -m {model} --plan {name}.json --calib {captions} --samples 6{qformer} -o {name}-out",
            tmp_path,
            monkeypatch,
        )
        stdout, _ = cli_ok(f"eval {name}-out -o -", tmp_path, monkeypatch)
        results = json.loads(stdout)
        plan = json.loads((tmp_path / f"{name}.json").read_text())
        assert results["summary"]["mismatches"] == 0
        achieved = tower_sparsity_from_eval(results)
        assert achieved == pytest.approx({t: plan["towers"][t]["sparsity"] for t in towers}, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Wanda comparison group per tower
# --------------------------------------------------------------------------------------------


def row_spread(weight: torch.Tensor) -> int:
    """max - min zeros per output row: <= 1 when rows were compared separately."""
    per_row = (weight == 0).sum(dim=1)
    return int(per_row.max() - per_row.min())


def spreads(out: Path) -> dict[str, list[int]]:
    model = model_class("blip2-opt").from_pretrained(out)
    params = dict(model.named_parameters())
    plan = json.loads((out / "plan.json").read_text())
    found: dict[str, list[int]] = {}
    for g in plan["groups"]:
        for t in g["tensors"]:
            found.setdefault(g["tower"], []).append(row_spread(params[t["name"]]))
    return found


def test_compare_group_override(model_dir, data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, captions = model_dir("blip2-opt"), data["captions"]
    common = f"-m {model} --sparsity 0.5 --allocator uniform --calib {captions} --samples 6"
    cli_ok(f"prune {common} -o default", tmp_path, monkeypatch)
    cli_ok(
        f"prune {common} --compare-group vision=row --compare-group language=matrix -o swapped", tmp_path, monkeypatch
    )
    default, swapped = spreads(tmp_path / "default"), spreads(tmp_path / "swapped")
    # defaults: the whole matrix for the ViT (rows end up uneven), per row for the language model
    assert max(default["vision"]) > 1 and max(default["language"]) <= 1
    # overridden: exactly the other way round
    assert max(swapped["vision"]) <= 1 and max(swapped["language"]) > 1
    report = json.loads((tmp_path / "swapped" / "ecoflap_report.json").read_text())
    assert report["compare_groups"] == {"vision": "row", "language": "matrix"}
    for out in ("default", "swapped"):
        stdout, _ = cli_ok(f"eval {out} -o -", tmp_path, monkeypatch)
        assert json.loads(stdout)["summary"]["mismatches"] == 0

    code, _, err = run_cli(shlex.split(f"prune {common} --compare-group vision=columns -o bad"), tmp_path, monkeypatch)
    assert code != 0 and "TOWER=row|matrix" in err and not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------
# eval: refusals and formats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "options", "message"),
    [
        ("clip", "--vqa {vqa}", "--vqa needs a BLIP-2 / InstructBLIP model"),
        ("clip", "--text {text}", "not a causal language model"),
        ("blip2-opt", "--images {classes}", "--images needs a CLIP model"),
        ("blip2-t5", "--text {text}", "encoder-decoder language model"),
        ("blip2-opt", "--vqa {captions}", "holds no question records"),
        ("blip2-opt", "--captions {root}/missing.jsonl", "not found"),
        ("clip", "--images {classes} --template 'a photo'", "has no {}"),
        ("clip", "--template 'a {{}}'", "go with --images"),
        ("blip2-opt", "--vqa {vqa} --question-template 'Q:'", "no {question} placeholder"),
        ("clip", "--images {root}/images", "no class subfolders"),
    ],
)
def test_eval_refuses_with_one_line(
    case: str, options: str, message: str, model_dir, data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "text.txt").write_text("a photo of a red circle . " * 20)
    values = {k: str(v) for k, v in data.items()} | {"text": str(tmp_path / "text.txt")}
    command = f"eval {model_dir(case)} {options.format(**values)} -o res.json"
    code, _out, err = run_cli(shlex.split(command), tmp_path, monkeypatch)
    assert code != 0 and message in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "res.json").exists()


def test_eval_blip2_perplexity_is_its_language_model(
    model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--text on BLIP-2 measures the language model on text alone, the same as the LM by itself."""
    from ecoflap_cli.data.text import tokenize_documents
    from ecoflap_cli.evaluation.measure import perplexity, windows_for_eval

    model = model_dir("blip2-llama")
    text = tmp_path / "text.txt"
    text.write_text("a photo of a red circle on a white background . " * 12)
    stdout, err = cli_ok(f"eval {model} --text {text} --seqlen 16 -o -", tmp_path, monkeypatch)
    got = json.loads(stdout)["perplexity"]["pruned"]
    loaded = load_model(str(model))
    windows = windows_for_eval(tokenize_documents(loaded.tokenizer, [text.read_text()]), 16, None)
    assert got == pytest.approx(perplexity(loaded.model.language_model, windows))
    assert "perplexity" in err


def test_qformer_plan_without_include_qformer_is_refused(
    model_dir, data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, captions = model_dir("blip2-opt"), data["captions"]
    cli_ok(
        f"score -m {model} --calib {captions} --samples 4 --batch-size 2 --include-qformer -o s.json",
        tmp_path,
        monkeypatch,
    )
    cli_ok("allocate s.json -s 0.5 --allocator uniform -o p.json --no-show", tmp_path, monkeypatch)
    code, _, err = run_cli(
        shlex.split(f"prune -m {model} --plan p.json --calib {captions} --samples 4 --batch-size 2 -o out"),
        tmp_path,
        monkeypatch,
    )
    assert code != 0 and "--include-qformer" in err and not (tmp_path / "out").exists()
