"""The Python API: the documented example runs, the one-shot call gives the CLI's weights bit for
bit, arguments are checked before any model is loaded, and importing it loads no torch."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from ecoflap_cli import api
from ecoflap_cli.cli.app import app
from ecoflap_cli.errors import EcoflapError, ModelError, PlanError

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def documented_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, "docs/api.md has no python example"
    return blocks[0]


def test_the_documented_example_runs(tiny_llama, calib_text, eval_text, tmp_path, monkeypatch):
    code = documented_example()
    for name, value in (("MODEL", tiny_llama), ("CALIB", calib_text), ("TEXT", eval_text)):
        code, count = re.subn(rf"^{name} = .*$", f"{name} = {str(value)!r}", code, flags=re.M)
        assert count == 1, name
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the documented example, as written
    for out in ("pruned", "pruned-packed"):
        assert (tmp_path / out / "ecoflap_report.json").is_file() and (tmp_path / out / "README.md").is_file()
    result, results = namespace["result"], namespace["results"]
    assert result.report["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    # both models measured (on a random tiny model pruning need not raise the perplexity)
    pruned, dense = results["perplexity"]["pruned"], results["perplexity"]["dense"]
    assert math.isfinite(pruned) and dense > 1 and pruned != dense
    # the in-memory model was pruned in place, to what the saved checkpoint holds
    saved = load_file(tmp_path / "pruned" / "model.safetensors")
    state = namespace["model"].state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    assert "## Quality" in (tmp_path / "pruned-packed" / "README.md").read_text()
    assert "perplexity" in (tmp_path / "pruned-packed" / "README.md").read_text()


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, dense or packed, and the raw bytes of its weight files."""
    from ecoflap_cli.io.packed import find_weights, load_sharded

    raw = {f.name: f.read_bytes() for f in find_weights(directory)[1]}
    return {
        **load_sharded(directory),
        **{f"file:{n}": torch.frombuffer(bytearray(b), dtype=torch.uint8) for n, b in raw.items()},
    }


@pytest.mark.parametrize("packed", [False, True])
def test_oneshot_in_memory_equals_the_cli_bit_for_bit(packed, tiny_llama, calib_text, tmp_path):
    options = ["--samples", "8", "--seqlen", "32", "--score-samples", "4", "--device", "cpu"]
    command = ["prune", "-m", str(tiny_llama), "-s", "0.5", "--calib", str(calib_text), *options]
    cli_out, api_out = tmp_path / "cli" / "out", tmp_path / "api" / "out"  # one name: the cards name it
    command += ["-o", str(cli_out), *(["--packed"] if packed else [])]
    cli = CliRunner().invoke(app, command)
    assert cli.exit_code == 0, cli.output
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    result = api.oneshot(
        model=model,
        tokenizer=tokenizer,
        sparsity=0.5,
        calib=calib_text,
        samples=8,
        seqlen=32,
        score_samples=4,
        output=api_out,
        packed=packed,
    )
    assert result.model is model and result.output == api_out
    for name in ("plan.json", "scores.json", "ecoflap_report.json"):
        a = json.loads((cli_out / name).read_text())
        b = json.loads((api_out / name).read_text())
        assert result.documents[name] == b
        for doc in (a, b):  # when it ran, not what it did
            doc.pop("created", None), doc.pop("timings", None)
        # the request differs only in how the model was given (a path, or in memory) and the device
        requests = [doc.pop("request", {}) for doc in (a, b)]
        for request in requests:
            request.pop("model", None), request.pop("device", None)
        assert requests[0] == requests[1], name
        assert a == b, name
    cli_weights, api_weights = _weights(cli_out), _weights(api_out)
    assert cli_weights.keys() == api_weights.keys()
    for name, tensor in cli_weights.items():
        assert tensor.dtype == api_weights[name].dtype and torch.equal(tensor, api_weights[name]), name
    assert (cli_out / "README.md").read_text() == (api_out / "README.md").read_text()


def test_stages_on_a_path_write_what_the_cli_writes(tiny_opt, calib_text, tmp_path):
    scores = api.score(tiny_opt, calib=calib_text, samples=4, seqlen=32, method="zeroth", output=tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == scores and scores["method"]["name"] == "zeroth"
    plan = api.allocate(tmp_path / "s.json", 0.5, allocator="ecoflap", output=tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text()) == plan and plan["allocator"]["name"] == "ecoflap"
    cli = CliRunner().invoke(
        app, ["allocate", str(tmp_path / "s.json"), "-s", "0.5", "--allocator", "ecoflap", "-o", "-"]
    )
    assert cli.exit_code == 0
    from_cli = json.loads(cli.stdout)
    assert {k: v for k, v in from_cli.items() if k != "created"} == {k: v for k, v in plan.items() if k != "created"}
    result = api.prune(tiny_opt, plan=tmp_path / "p.json", calib=calib_text, samples=4, seqlen=32, solver="magnitude")
    assert result.output is None and result.scores is None
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: api.prune(m, sparsity=1.5), PlanError, r"--sparsity must be in \[0, 1\)"),
        (lambda m: api.prune(m), EcoflapError, "exactly one of"),
        (lambda m: api.prune(m, sparsity=0.5, solver="nope"), PlanError, "unknown solver"),
        (lambda m: api.prune(m, sparsity=0.5, allocator="owl", score_method="zeroth"), PlanError, "takes scoring"),
        (lambda m: api.prune(m, sparsity=0.5, nm="2:4"), EcoflapError, "--nm needs a uniform plan"),
        (lambda m: api.prune(m, sparsity=0.5, nm="4:2"), EcoflapError, "0 < N < M"),
        (lambda m: api.prune(m, sparsity=0.5, allocator_settings={"lam": 2.0}), PlanError, "lam"),
        (lambda m: api.prune(m, sparsity=0.5, output="-"), EcoflapError, "writes a checkpoint directory"),
        (lambda m: api.prune(m, sparsity=0.5, compare_groups={"lm": "col"}), EcoflapError, "row|matrix"),
        (lambda m: api.score(m, method="zeroth", settings={"metric": "x"}), PlanError, "applies to --method first"),
        (lambda m: api.score(m, method="zeroth", settings={"eps": -1.0}), PlanError, "eps"),
        (lambda m: api.score(m, device_mapp="auto"), EcoflapError, "unknown option 'device_mapp'"),
        (lambda m: api.allocate({"format": "x"}, 0.5), EcoflapError, "expected a scores file"),
        (lambda m: api.allocate({}, 0.5, allocator="ecoflap", settings={"max_sparsity": 0.4}), PlanError, "below"),
    ],
)
def test_arguments_are_checked_before_loading(call, error, message, tmp_path):
    missing = str(tmp_path / "no-such-model")  # loading it would fail with another message
    with pytest.raises(error, match=message):
        call(missing)


def test_in_memory_model_refuses_placement_options(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(ModelError, match="already loaded: device_map"):
        api.load(model, device_map="auto")
    loaded = api.load(model, tokenizer="tok", dtype="auto", device="auto")  # defaults are no placement
    assert loaded.model is model and loaded.processor == "tok"


def test_output_exists_is_refused_before_work(tiny_llama, calib_text, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(EcoflapError, match="exists"):
        api.oneshot(model=tiny_llama, sparsity=0.5, calib=calib_text, output=tmp_path / "out")
    with pytest.raises(EcoflapError, match="exists"):
        api.score(tiny_llama, calib=calib_text, output=tmp_path / "out")


def test_importing_the_api_loads_no_torch():
    probe = "import sys, ecoflap_cli.api; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    probe = "from ecoflap_cli.api import load_pruned, model_class; print(callable(load_pruned))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"


def test_cli_commands_run_through_the_orchestrator(monkeypatch, tiny_llama, tmp_path):
    """`ecoflap score/prune` hand the orchestrator the request they parsed."""
    seen = {}

    def fake(name):
        def record(*args, **kwargs):
            seen[name] = (args, kwargs)
            raise EcoflapError("stop here")

        return record

    from ecoflap_cli.stages import orchestrator

    monkeypatch.setattr(orchestrator, "score", fake("score"))
    monkeypatch.setattr(orchestrator, "prune", fake("prune"))
    runner = CliRunner()
    result = runner.invoke(app, shlex.split(f"score -m {tiny_llama} --method zeroth --eps 0.01 -o -"))
    assert result.exit_code == 2 and "stop here" in result.output
    request = seen["score"][0][0]
    assert request.settings == {"eps": 0.01} and request.method == "zeroth"
    result = runner.invoke(app, shlex.split(f"prune -m {tiny_llama} -s 0.5 --nm 2:4 --allocator uniform -o x"))
    request = seen["prune"][0][0]
    assert result.exit_code == 2 and request.nm == "2:4" and request.sparsity == 0.5
