"""Loading and labelling options around ``ecoflap eval`` (issue 15): eval's placement options
(device map, memory budget, disk offload), hub ``--revision`` / ``--cache-dir`` on score, prune and
eval, ``prune -o -`` refused, and an unpruned model not called "pruned"."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.errors import ModelError
from ecoflap_cli.io import loading


def run_cli(args: list[str], cwd: Path, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_prune_to_stdout_is_refused_before_loading(tmp_path, monkeypatch):
    code, _, err = run_cli(shlex.split("prune -m ./no/such/model --sparsity 0.5 -o -"), tmp_path, monkeypatch)
    assert code != 0
    assert error_lines(err) == ["error: prune writes a checkpoint directory, not a stream: give -o DIR instead of -o -"]
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize(
    "command",
    [
        "score -m MODEL --calib CALIB --samples 2 --seqlen 16 -o s.json",
        "prune -m MODEL --sparsity 0.5 --calib CALIB --samples 2 --seqlen 16 -o out",
        "eval MODEL --text CALIB",
    ],
)
def test_revision_and_cache_dir_reach_the_loader(command, tiny_llama, calib_text, tmp_path, monkeypatch):
    seen = []

    def stop(source, opts=None):
        seen.append(opts)
        raise ModelError("stopped after the options were seen")

    monkeypatch.setattr(loading, "load_model", stop)
    args = command.replace("MODEL", str(tiny_llama)).replace("CALIB", str(calib_text))
    code, _, err = run_cli(shlex.split(args) + ["--revision", "v1.2", "--cache-dir", "hub"], tmp_path, monkeypatch)
    assert code != 0 and "stopped after the options were seen" in err
    assert [(o.revision, o.cache_dir) for o in seen] == [("v1.2", "hub")]


def test_revision_and_cache_dir_go_to_from_pretrained(tiny_llama, monkeypatch):
    import transformers

    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("revision"), kwargs.get("cache_dir")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    opts = loading.LoadOptions(device="cpu", revision="main", cache_dir="/tmp/hub-cache")
    loaded = loading.load_model(str(tiny_llama), opts)
    assert loaded.model is not None
    names = {name for name, *_ in calls}
    assert {"AutoConfig", "AutoModelForCausalLM"} <= names
    assert all((rev, cache) == ("main", "/tmp/hub-cache") for _, rev, cache in calls)
    assert loading.LoadOptions().hub_kwargs() == {}  # nothing passed when not given


def test_eval_places_and_offloads_like_prune(tiny_llama, eval_text, tmp_path, monkeypatch):
    seen = []
    real = loading.load_model

    def spy(source, opts=None):
        seen.append(opts)
        return real(source, opts)

    monkeypatch.setattr(loading, "load_model", spy)
    base = f"eval {tiny_llama} --text {eval_text} --seqlen 32 --max-windows 4 -o -"
    found = []
    for extra in ("", "--device-map auto", "--device-map auto --max-memory cpu=20KB --offload-folder off"):
        code, out, err = run_cli(shlex.split(f"{base} {extra}"), tmp_path, monkeypatch)
        assert code == 0, err
        found.append(json.loads(out)["perplexity"]["pruned"])
    assert found[0] == pytest.approx(found[1], rel=1e-6) and found[0] == pytest.approx(found[2], rel=1e-6)
    assert [o.device_map for o in seen] == [None, "auto", "auto"]
    assert seen[2].max_memory == {"cpu": "20KB"} and seen[2].offload_folder == "off"
    assert any((tmp_path / "off").glob("*.dat"))  # weights really went to disk


def test_unpruned_model_is_not_labelled_pruned(tiny_llama, calib_text, eval_text, tmp_path, monkeypatch):
    ppl = f"--text {eval_text} --seqlen 32 --max-windows 2"
    code, out, err = run_cli(shlex.split(f"eval {tiny_llama} {ppl} -o -"), tmp_path, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["pruned_checkpoint"] is False
    assert f"model: {tiny_llama}" in err and "pruned" not in err
    prune = f"prune -m {tiny_llama} -s 0.5 --allocator uniform --calib {calib_text} --samples 2 --seqlen 16 -o out"
    assert run_cli(shlex.split(prune), tmp_path, monkeypatch)[0] == 0
    code, out, err = run_cli(shlex.split(f"eval out {ppl} --compare {tiny_llama} -o -"), tmp_path, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["pruned_checkpoint"] is True
    assert "pruned: out" in err and f"dense: {tiny_llama}" in err
