"""lm-evaluation-harness tasks through ``ecoflap eval --tasks``: the local cloze task built from the
Wikipedia test split, on tiny models (dense and packed give the same numbers), user task folders
offline, and one-line errors for unknown tasks and a missing lm-eval."""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.data import assets, cloze

pytest.importorskip("lm_eval")

sys.path.insert(0, str(Path(__file__).parent))

from tiny import WORDS  # noqa: E402


def cloze_text(articles: int = 8, sentences: int = 8, seed: int = 0) -> str:
    """Articles (blank-line separated) of capitalised sentences over the tiny tokenizer's words."""
    rng = random.Random(seed)
    out = []
    for _ in range(articles):
        body = []
        for _ in range(sentences):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 10))]
            body.append(" ".join(words).capitalize() + ".")
        out.append(" ".join(body))
    return "\n\n".join(out)


@pytest.fixture
def wiki_cache(tmp_path, monkeypatch) -> Path:
    """An empty ecoflap cache whose 'Wikipedia test split' is a small text (no download)."""
    cache = tmp_path / "cache"
    test_split = tmp_path / "wiki_test.txt"
    test_split.write_text(cloze_text(), encoding="utf-8")
    monkeypatch.setenv("ECOFLAP_CACHE", str(cache))
    monkeypatch.setattr(assets, "wikipedia_splits", lambda: {"test": test_split})
    return cache


def run_cli(args: list[str], cwd: Path, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# --- the cloze builder ------------------------------------------------------------------------


def test_cloze_records_follow_the_rules():
    text = cloze_text(articles=5, seed=3)
    records = cloze.cloze_records(text)
    assert records and records == cloze.cloze_records(text)  # deterministic
    for r in records:
        assert r["text"] == f"{r['context']} {r['target']}"
        assert r["target"].isalpha() and len(r["target"]) >= cloze.MIN_TARGET_CHARS
        assert len(r["context"].split()) >= cloze.MIN_CONTEXT_WORDS
        assert r["target"].lower() in r["context"].lower().replace(".", " ").split()
        assert not r["context"].endswith(" ")
    # a passage never crosses an article: it is a prefix of its own article
    articles = text.split("\n\n")
    for r in records:
        assert articles[r["article"]].startswith(r["context"])
    assert cloze.cloze_records(text, max_records=3) == records[:3]


def test_cloze_needs_several_sentences(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("Short text without any passage long enough.", encoding="utf-8")
    with pytest.raises(Exception, match="yields no cloze passages"):
        cloze.write_cloze_file(one, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_real_wikipedia_slice_builds_cloze_passages(tmp_path, monkeypatch):
    """The builder on a slice of the real Wikipedia test split (when the asset is cached)."""
    real = Path(os.environ.get("ECOFLAP_CACHE", Path.home() / ".cache" / "ecoflap")) / "wiki_test.txt"
    if not real.is_file():
        pytest.skip("the Wikipedia test split is not cached (python -m ecoflap_cli.data.assets)")
    articles = real.read_text(encoding="utf-8").split("\n\n")[:60]
    test_split = tmp_path / "wiki_test.txt"
    test_split.write_text("\n\n".join(articles), encoding="utf-8")
    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "wikipedia_splits", lambda: {"test": test_split})
    path = cloze.wiki_cloze_file()
    assert path == tmp_path / "cache" / cloze.WIKI_CLOZE_FILE
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) >= 10
    assert all(r["text"].endswith(" " + r["target"]) and r["target"].isalpha() for r in records)
    mtime = path.stat().st_mtime_ns
    assert cloze.wiki_cloze_file() == path and path.stat().st_mtime_ns == mtime  # built once


# --- eval --tasks on tiny models --------------------------------------------------------------


def expected_cloze(model_dir: Path, records: list[dict]) -> tuple[float, float]:
    """acc and perplexity of the target word computed here directly: the log-likelihood of the
    target's tokens after the context, and whether they are the greedy continuation."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hits, lls = 0, []
    for r in records:
        context = tokenizer(r["context"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(r["context"] + " " + r["target"], add_special_tokens=False)["input_ids"]
        target = whole[len(context) :]
        # the passage's last tokens that fit the context length (lm-eval cuts from the left)
        ids = torch.tensor([(context + target)[-(model.config.max_position_embeddings + 1) :]])
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits.log_softmax(-1)[0, -len(target) :]
        lls.append(float(logits[torch.arange(len(target)), torch.tensor(target)].sum()))
        hits += int(logits.argmax(-1).tolist() == target)
    return hits / len(records), math.exp(-sum(lls) / len(lls))


def test_wiki_cloze_on_a_tiny_model(tiny_llama, wiki_cache, tmp_path, monkeypatch):
    code, out, err = run_cli(shlex.split(f"eval {tiny_llama} --tasks wiki_cloze --limit 6 -o -"), tmp_path, monkeypatch)
    assert code == 0, err
    results = json.loads(out)
    section = results["lm_eval"]
    assert section["tasks"] == {"wiki_cloze": section["tasks"]["wiki_cloze"]}
    metrics = section["tasks"]["wiki_cloze"]["pruned"]
    assert metrics["n_samples"] == 6 and metrics["n_shot"] == 0 and section["limit"] == 6
    built = wiki_cache / cloze.WIKI_CLOZE_FILE  # the task's data, built on first use
    records = [json.loads(line) for line in built.read_text(encoding="utf-8").splitlines()]
    assert records == cloze.cloze_records(cloze_text())
    acc, ppl = expected_cloze(tiny_llama, records[:6])
    assert metrics["acc"] == pytest.approx(acc)
    assert metrics["perplexity"] == pytest.approx(ppl, rel=1e-4)
    # an unpruned model is not called pruned; the table is on stderr
    assert results["pruned_checkpoint"] is False
    assert "lm-eval tasks" in err and "wiki_cloze" in err and "pruned" not in err


def test_dense_and_packed_checkpoints_give_the_same_numbers(tiny_llama, calib_text, wiki_cache, tmp_path, monkeypatch):
    prune = f"prune -m {tiny_llama} -s 0.5 --allocator uniform --calib {calib_text} --samples 4 --seqlen 32 -o dense"
    assert run_cli(shlex.split(prune), tmp_path, monkeypatch)[0] == 0
    assert run_cli(shlex.split("convert dense --to packed -o packed"), tmp_path, monkeypatch)[0] == 0
    found = {}
    for name in ("dense", "packed"):
        args = f"eval {name} --tasks wiki_cloze --tasks wiki_cloze --limit 5 -o {name}.json"
        if name == "packed":
            args += f" --compare {tiny_llama}"
        code, _, err = run_cli(shlex.split(args), tmp_path, monkeypatch)
        assert code == 0, err
        found[name] = json.loads((tmp_path / f"{name}.json").read_text())
    dense_ck, packed_ck = (found[n]["lm_eval"]["tasks"]["wiki_cloze"] for n in ("dense", "packed"))
    assert dense_ck["pruned"] == packed_ck["pruned"]
    assert found["packed"]["pruned_checkpoint"] and found["packed"]["lm_eval"]["tasks"].keys() == {"wiki_cloze"}
    # --compare: the dense model's numbers, computed independently here
    acc, ppl = expected_cloze(tiny_llama, cloze.cloze_records(cloze_text())[:5])
    assert packed_ck["dense"]["acc"] == pytest.approx(acc)
    assert packed_ck["dense"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert packed_ck["pruned"]["perplexity"] != packed_ck["dense"]["perplexity"]
    assert found["packed"]["lm_eval"]["time_s"].keys() == {"pruned", "dense"}


def test_unknown_task_is_one_error_line_before_any_model_loads(tmp_path, monkeypatch):
    code, _, err = run_cli(
        shlex.split("eval ./no/such/model --tasks wiki_cloze,wiki_clozee --limit 2"), tmp_path, monkeypatch
    )
    assert code != 0
    assert error_lines(err) == ["error: unknown lm-eval task 'wiki_clozee' (did you mean wiki_cloze?)"]


def test_missing_lm_eval_is_one_error_line(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    code, _, err = run_cli(shlex.split(f"eval {tiny_llama} --tasks wiki_cloze"), tmp_path, monkeypatch)
    assert code != 0
    lines = error_lines(err)
    assert len(lines) == 1 and "pip install 'ecoflap[lmeval]'" in lines[0], err


def test_lm_eval_options_need_tasks(tiny_llama, tmp_path, monkeypatch):
    code, _, err = run_cli(shlex.split(f"eval {tiny_llama} --limit 3"), tmp_path, monkeypatch)
    assert code != 0 and len(error_lines(err)) == 1 and "go with --tasks" in err


def test_user_task_folder_runs_offline_in_a_real_process(tiny_llama, tmp_path):
    """A task YAML of the user's own (--include-path) reading a local JSON-lines file with the
    ``datasets`` JSON loader, with the hub and datasets switched offline."""
    data = tmp_path / "my_cloze.jsonl"
    records = cloze.cloze_records(cloze_text(seed=5))[:4]
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_cloze.yaml").write_text(
        "task: my_cloze\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood\ntest_split: test\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: \"{{' ' + target}}\"\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf_datasets")
    result = subprocess.run(
        [sys.executable, "-m", "ecoflap_cli", "eval", str(tiny_llama), "--include-path", str(tasks)]
        + ["--tasks", "my_cloze", "-o", "-"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)["lm_eval"]["tasks"]["my_cloze"]["pruned"]
    acc, _ = expected_cloze(tiny_llama, records)
    assert metrics["n_samples"] == 4 and metrics["acc"] == pytest.approx(acc)
    assert "Traceback" not in result.stderr
