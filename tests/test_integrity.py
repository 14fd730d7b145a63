"""Integrity and determinism: weights that match their config, shard files inside their checkpoint,
recorded sha256 checksums, packed tensors checked before they are expanded, packed checkpoints that
plain transformers refuses, fuzzed artifacts that end in clean errors, and byte-identical runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from ecoflap_cli.cli.app import app
from ecoflap_cli.errors import ArtifactError, EcoflapError
from ecoflap_cli.io import artifacts
from ecoflap_cli.io import packed as packed_module
from ecoflap_cli.io.checkpoint import convert_checkpoint
from ecoflap_cli.io.inspect import inspect_artifact
from ecoflap_cli.io.layout import CHECKSUMS_NAME, verify_checksums, weight_files
from ecoflap_cli.io.packed import (
    INDEX_FILE,
    INDEX_KEY,
    PACKED_INDEX_FILE,
    PART_SEPARATOR,
    check_bitmask_parts,
    load_sharded,
    pack_bitmask,
)
from ecoflap_cli.io.pruned import load_pruned

os.environ["HF_HUB_OFFLINE"] = "1"
runner = CliRunner(env={"HF_HUB_OFFLINE": "1"})


def cli(*args: object, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def one_error_line(result) -> str:
    """The run failed with exit code 2 and exactly one ``error:`` line, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def prune(model: Path, out: Path, calib: Path, *extra: str) -> Path:
    """A one-shot prune (scores, plan and weights) of a tiny model, as small as it gets."""
    cli(
        "prune", "-m", model, "-o", out, "-s", "0.5", "--calib", calib, "--samples", "2", "--score-samples", "2",
        "--seqlen", "16", "--device", "cpu", *extra,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama, calib_text) -> dict[str, Path]:
    """Tiny LLaMA pruned once, written dense and packed, each in several shards with an index."""
    root = tmp_path_factory.mktemp("integrity")
    return {
        "dense": prune(tiny_llama, root / "dense", calib_text, "--max-shard-size", "20KB"),
        "packed": prune(tiny_llama, root / "packed", calib_text, "--max-shard-size", "20KB", "--packed"),
    }


def copy_of(source: Path, tmp_path: Path, name: str = "work") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target, symlinks=True)
    return target


def first_shard(directory: Path) -> Path:
    return weight_files(directory)[0]


# --- checksums --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "packed"])
def test_checksums_are_recorded_for_every_weight_file(checkpoints, kind):
    directory = checkpoints[kind]
    recorded = json.loads((directory / CHECKSUMS_NAME).read_text())
    index = PACKED_INDEX_FILE if kind == "packed" else INDEX_FILE
    files = [f.name for f in weight_files(directory)]
    assert len(files) > 1
    model_files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert recorded["algorithm"] == "sha256" and sorted(recorded["files"]) == sorted([*files, index, *model_files])
    assert verify_checksums(directory) is None
    assert inspect_artifact(str(directory))["integrity"] == "verified"


@pytest.mark.parametrize("kind", ["dense", "packed"])
def test_a_flipped_weight_byte_is_one_error_naming_the_file(checkpoints, kind, tmp_path):
    work = copy_of(checkpoints[kind], tmp_path)
    shard = first_shard(work)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # a data byte: the file still parses, one weight changed
    shard.write_bytes(bytes(data))
    for args in (
        ["eval", work, "--device", "cpu"],
        ["inspect", work],
        ["convert", work, "-o", tmp_path / "out", "--to", "dense" if kind == "packed" else "packed"],
    ):
        line = one_error_line(cli(*args, ok=False))
        assert shard.name in line and "corrupted" in line and "sha256" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(ArtifactError, match=f"{shard.name} is corrupted"):
        load_pruned(work)
    # --no-verify / verify=False skip the check: the changed byte is a valid weight value
    assert cli("inspect", work, "--no-verify").exit_code == 0
    assert load_pruned(work, verify=False) is not None


def test_a_checkpoint_without_checksums_loads_with_a_note(checkpoints, tmp_path):
    work = copy_of(checkpoints["packed"], tmp_path)
    (work / CHECKSUMS_NAME).unlink()
    result = cli("inspect", work)
    assert "records no checksums" in result.stderr and "error:" not in result.stderr
    with pytest.warns(UserWarning, match="records no checksums"):
        load_pruned(work)
    assert convert_checkpoint(work, tmp_path / "dense", "dense")["integrity"] == "unrecorded"
    assert verify_checksums(tmp_path / "dense") is None  # the converted copy records its own


def test_a_broken_checksums_file_is_an_error(checkpoints, tmp_path):
    work = copy_of(checkpoints["dense"], tmp_path)
    (work / CHECKSUMS_NAME).write_text('{"format": "ecoflap.checksums", "files": [1]}')
    with pytest.raises(ArtifactError, match="not an ecoflap checksums file"):
        verify_checksums(work)
    doc = {"format": "ecoflap.checksums", "algorithm": "sha256", "files": {"../escape.safetensors": "0" * 64}}
    (work / CHECKSUMS_NAME).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="not a file name"):
        verify_checksums(work)


# --- shard indexes stay inside the checkpoint -------------------------------------------------


def _point_index_at(work: Path, index_name: str, target: str) -> None:
    index_path = work / index_name
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"].values()))
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["dense", "packed"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_naming_a_file_outside_the_checkpoint_is_refused(checkpoints, kind, how, tmp_path):
    work = copy_of(checkpoints[kind], tmp_path)
    index_name = PACKED_INDEX_FILE if kind == "packed" else INDEX_FILE
    shard = first_shard(work)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(shard, outside)
    if how == "dotdot":
        _point_index_at(work, index_name, "../outside.safetensors")
    elif how == "absolute":
        _point_index_at(work, index_name, str(outside))
    else:
        shard.unlink()
        shard.symlink_to(outside)
    message = "outside the checkpoint directory|not a file name in the checkpoint directory"
    for call in (
        lambda: load_pruned(work, verify=False),
        lambda: inspect_artifact(str(work), verify=False),
        lambda: load_sharded(work),
        lambda: convert_checkpoint(work, tmp_path / "out", "dense", verify=False),
    ):
        with pytest.raises(ArtifactError, match=message):
            call()
    for args in (["eval", work, "--device", "cpu", "--no-verify"], ["inspect", work, "--no-verify"]):
        line = one_error_line(cli(*args, ok=False))
        assert "outside the checkpoint directory" in line or "not a file name" in line
    assert not (tmp_path / "out").exists()


# --- weights must match the config ------------------------------------------------------------


@pytest.mark.parametrize("layers", [6, 2])
def test_config_that_does_not_match_the_weights_is_refused(tiny_llama, calib_text, layers, tmp_path):
    model = copy_of(tiny_llama, tmp_path, "model")
    config = json.loads((model / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    config["num_hidden_layers"] = layers
    (model / "config.json").write_text(json.dumps(config))
    common = ["--calib", calib_text, "--samples", "2", "--seqlen", "16", "--device", "cpu"]
    for args in (
        ["prune", "-m", model, "-o", tmp_path / "out", "-s", "0.5", "--score-samples", "2", *common],
        ["score", "-m", model, "-o", tmp_path / "scores.json", *common],
        ["eval", model, "--device", "cpu"],
    ):
        line = one_error_line(cli(*args, ok=False))
        assert "does not match its config.json" in line
        assert ("lacks weight" if layers > 4 else "no place for") in line and "model.layers." in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "scores.json").exists()


def test_config_with_other_shapes_than_the_weights_is_refused_naming_them(tiny_llama, checkpoints, tmp_path):
    """Wrong-shape weights are named too (transformers' own error named none of them)."""
    for name, source in (("model", tiny_llama), ("ckpt", checkpoints["dense"])):
        work = copy_of(source, tmp_path, name)
        config = json.loads((work / "config.json").read_text())
        config["intermediate_size"] += 8
        (work / "config.json").write_text(json.dumps(config))
        line = one_error_line(cli("eval", work, "--device", "cpu", "--no-verify", ok=False))
        assert "does not match its config.json" in line and "wrong shape" in line and "mlp.down_proj.weight" in line
    with pytest.raises(ArtifactError, match="wrong shape: model.layers.0.mlp"):
        load_pruned(work, verify=False)


@pytest.mark.parametrize("kind", ["dense", "packed"])
def test_pruned_checkpoint_with_an_edited_config_is_refused(checkpoints, kind, tmp_path):
    work = copy_of(checkpoints[kind], tmp_path)
    config = json.loads((work / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (work / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="config.json was edited or corrupted"):  # checksums cover it
        load_pruned(work)
    with pytest.raises(ArtifactError, match="model.layers.3"):
        load_pruned(work, verify=False)
    line = one_error_line(cli("eval", work, "--device", "cpu", "--no-verify", ok=False))
    assert "does not match its config.json" in line


# --- packed checkpoints and loaders that cannot read them -------------------------------------


def test_plain_transformers_refuses_a_packed_checkpoint(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    packed = checkpoints["packed"]
    with pytest.raises(ValueError, match=r"ecoflap_cli\.api\.load_pruned.*ecoflap convert"):
        AutoModelForCausalLM.from_pretrained(packed)
    # without the config marker transformers still finds no weights of its own, and fails
    work = copy_of(packed, tmp_path)
    config = json.loads((work / "config.json").read_text())
    del config["transformers_weights"], config["ecoflap_packed"]
    (work / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match="no file named"):
        AutoModelForCausalLM.from_pretrained(work)
    # ecoflap's own loaders read it, and its dense conversion loads anywhere, with equal weights
    model = load_pruned(packed)
    assert not hasattr(model.config, "transformers_weights") and not hasattr(model.config, "ecoflap_packed")
    convert_checkpoint(packed, tmp_path / "dense", "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


# --- packed tensors are checked before they are expanded --------------------------------------


@pytest.fixture
def no_expansion(monkeypatch):
    """Fail the test if a bitmask is expanded to bits (the step before the dense tensor)."""

    def refuse(_packed: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a bitmask was expanded")

    monkeypatch.setattr(packed_module, "_unpack_bits", refuse)


def _rewrite_packed_shard(work: Path, edit) -> Path:
    """Apply ``edit(tensors, index)`` to the first packed shard holding a bitmask tensor."""
    for shard in weight_files(work):
        with safe_open(str(shard), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            meta = dict(fh.metadata())
        index = json.loads(meta[INDEX_KEY])
        name = next((n for n, e in index.items() if e["layout"] == "bitmask"), None)
        if name is not None:
            edit(tensors, index, name)
            meta[INDEX_KEY] = json.dumps(index)
            save_file(tensors, str(shard), metadata=meta)
            return shard
    raise AssertionError("no bitmask tensor")


def test_all_zero_bitmask_is_refused_before_expanding(checkpoints, tmp_path, no_expansion):
    work = copy_of(checkpoints["packed"], tmp_path)

    def zero_mask(tensors, _index, name):
        key = f"{name}{PART_SEPARATOR}bitmask"
        tensors[key] = torch.zeros_like(tensors[key])

    _rewrite_packed_shard(work, zero_mask)
    for call in (lambda: load_pruned(work, verify=False), lambda: inspect_artifact(str(work), verify=False)):
        with pytest.raises(ArtifactError, match="bitmask keeps 0 entries but .* values are stored"):
            call()


def test_inflated_packed_tensor_is_refused_before_expanding(checkpoints, tmp_path, no_expansion):
    """A small file declaring a huge, consistent, all-zero tensor: loading refuses it against the
    model's shape before expanding; inspect counts it from the mask without expanding."""
    work = copy_of(checkpoints["packed"], tmp_path)
    rows, cols = 4096, 4096  # 64 MiB as fp32, 2 MiB of mask
    inflated = {}

    def inflate(tensors, index, name):
        dtype = tensors[f"{name}{PART_SEPARATOR}values"].dtype
        for part in ("values", "bitmask", "shape", "row_offsets"):
            tensors.pop(f"{name}{PART_SEPARATOR}{part}")
        parts = pack_bitmask(torch.zeros(rows, cols, dtype=dtype))
        tensors.update({f"{name}{PART_SEPARATOR}{p}": t for p, t in parts.items()})
        index[name]["shape"] = [rows, cols]
        inflated["name"] = name

    shard = _rewrite_packed_shard(work, inflate)
    assert shard.stat().st_size < 4 * 2**20
    with pytest.raises(ArtifactError, match=f"{inflated['name']} has shape \\[{rows}, {cols}\\], the model expects"):
        load_pruned(work, verify=False)
    summary = inspect_artifact(str(work), verify=False)
    assert summary["storage"]["layout"] == "packed"
    assert any(b["params"] >= rows * cols for b in summary["blocks"])


def test_bitmask_parts_are_checked_without_expanding(no_expansion):
    parts = pack_bitmask(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))
    assert check_bitmask_parts(parts)[2].tolist() == [2, 1]
    bad = dict(parts, values=parts["values"][:-1])
    with pytest.raises(ArtifactError, match="bitmask keeps 3 entries but 2 values"):
        check_bitmask_parts(bad)
    padded = dict(parts, bitmask=parts["bitmask"] | 0x80)
    with pytest.raises(ArtifactError, match="padding bits"):
        check_bitmask_parts(padded)


# --- fuzzing every artifact reader ------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging) when the body runs longer than ``seconds``."""

    def expire(_signum, _frame):
        raise TimeoutError(f"reader ran longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


MUTATIONS = st.one_of(
    st.tuples(
        st.just("flip"),
        st.sampled_from(["anywhere", "head"]),  # "head": the first 2 KiB, where headers and JSON keys are
        st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=6),
    ),
    st.tuples(st.just("truncate"), st.sampled_from(["anywhere", "head"]), st.integers(0, 2**31)),
)


def mutate(path: Path, mutation) -> bool:
    """Apply a byte flip or truncation to ``path``; whether its bytes changed."""
    kind, region, detail = mutation
    data = bytearray(path.read_bytes())
    span = min(len(data), 2048) if region == "head" else len(data)
    if kind == "flip":
        for position, xor in detail:
            data[position % span] ^= xor
        changed = bytes(data) != path.read_bytes()
        path.write_bytes(bytes(data))
        return changed
    path.write_bytes(bytes(data[: detail % span]))
    return True


def clean(call) -> object:
    """Run a reader: it must return, or raise an EcoflapError (never another exception), in time."""
    with time_limit(60), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return call()
        except EcoflapError as exc:
            return exc


FUZZ = settings(
    max_examples=int(os.environ.get("ECOFLAP_FUZZ_EXAMPLES", "30")),
    deadline=None,  # time_limit bounds each reader instead: tiny models load in well under a second
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=not os.environ.get("ECOFLAP_FUZZ_RANDOM"),  # CI: the same examples every run
)


@FUZZ
@given(document=st.sampled_from(["scores.json", "plan.json"]), mutation=MUTATIONS)
def test_fuzzed_documents_give_clean_errors(checkpoints, tmp_path_factory, document, mutation):
    work = copy_of(checkpoints["dense"], tmp_path_factory.mktemp("fuzz"))
    path = work / document
    mutate(path, mutation)
    validate = artifacts.validate_scores if document == "scores.json" else artifacts.validate_plan
    clean(lambda: validate(artifacts.read_json(str(path)), str(path)))
    clean(lambda: inspect_artifact(str(path)))
    if document == "plan.json":  # a checkpoint's own plan is read by inspect
        clean(lambda: inspect_artifact(str(work), verify=False))


WEIGHT_TARGETS = ["dense index", "dense shard", "packed index", "packed shard"]


@FUZZ
@given(target=st.sampled_from(WEIGHT_TARGETS), shard=st.integers(0, 100), mutation=MUTATIONS)
def test_fuzzed_weights_give_clean_errors_and_never_pass_verification(
    checkpoints, tmp_path_factory, target, shard, mutation
):
    kind, what = target.split()
    root = tmp_path_factory.mktemp("fuzz")
    work = copy_of(checkpoints[kind], root)
    files = weight_files(work)
    path = (
        (work / (PACKED_INDEX_FILE if kind == "packed" else INDEX_FILE))
        if what == "index"
        else files[shard % len(files)]
    )
    if not mutate(path, mutation):
        return
    # corrupted weight bytes are always detected, and the error names the file
    with pytest.raises(ArtifactError, match=path.name.replace(".", r"\.")):
        verify_checksums(work)
    for reader in (
        lambda: inspect_artifact(str(work), verify=True),
        lambda: load_pruned(work, verify=True),
        lambda: convert_checkpoint(work, root / "out", "dense", verify=True),
    ):
        assert isinstance(clean(reader), ArtifactError)
    assert not (root / "out").exists()
    # unverified, every reader still ends cleanly: a result, or one EcoflapError
    clean(lambda: inspect_artifact(str(work), verify=False))
    clean(lambda: load_pruned(work, verify=False))
    clean(lambda: convert_checkpoint(work, root / "out", "packed" if kind == "dense" else "dense", verify=False))


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--packed", "--max-shard-size", "20KB")], ids=["dense", "packed-sharded"])
def test_identical_runs_write_identical_bytes(tiny_llama, calib_text, tmp_path, extra):
    """Two one-shot prunes with the same inputs and seed write the same files, byte for byte; the
    documents differ only in their run-specific fields (artifacts.RUN_SPECIFIC_FIELDS), which the
    content hashes leave out."""
    first = prune(tiny_llama, tmp_path / "out", calib_text, *extra).rename(tmp_path / "first")
    second = prune(tiny_llama, tmp_path / "out", calib_text, *extra)  # same path: the report names it
    names = sorted(p.name for p in second.iterdir())
    assert names == sorted(p.name for p in first.iterdir())
    documents = {"scores.json", "plan.json", "ecoflap_report.json"}
    assert documents <= set(names)
    for name in names:
        a, b = (first / name).read_bytes(), (second / name).read_bytes()
        if name not in documents:
            assert a == b, name
            continue
        doc_a, doc_b = json.loads(a), json.loads(b)
        for field in artifacts.RUN_SPECIFIC_FIELDS:
            doc_a.pop(field, None), doc_b.pop(field, None)
        assert doc_a == doc_b, name
    plan = json.loads((second / "plan.json").read_text())
    assert plan["scores_hash"] == artifacts.doc_hash(json.loads((first / "scores.json").read_text()))
    report = json.loads((second / "ecoflap_report.json").read_text())
    assert report["plan_hash"] == artifacts.doc_hash(json.loads((first / "plan.json").read_text()))


def test_safetensors_metadata_is_written_in_sorted_order(tmp_path):
    state = {"b.weight": torch.zeros(4, 8), "a.weight": torch.ones(4, 8)}
    meta = {f"key{i}": str(i) for i in (5, 1, 9, 3, 7, 0, 8, 2, 6, 4)}
    for packed in (False, True):
        directory = tmp_path / str(packed)
        packed_module.save_sharded(state, directory, packed=packed, max_shard_bytes=10**6, metadata=meta)
        (path,) = weight_files(directory)
        raw = path.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert list(header["__metadata__"]) == sorted(header["__metadata__"])
        assert list(header)[0] == "__metadata__"


def test_a_plain_model_directory_gets_no_checksum_note(tiny_llama, eval_text):
    """Checksums are ecoflap's; a model directory from elsewhere never had any: no note there."""
    result = cli("eval", tiny_llama, "--text", eval_text, "--seqlen", "32", "--max-windows", "2", "--device", "cpu")
    assert result.exit_code == 0 and "checksums" not in result.stderr
