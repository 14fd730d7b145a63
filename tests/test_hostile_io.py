"""Hostile inputs to the io, evaluation and engine layers (issue 26): checksums that cover the config,
the Hugging Face cache layout (symlinks into ``blobs/``) read and escapes refused, non-finite numbers
refused, full disks as one line, the one rule for outputs, escaped model cards showing only their
own evaluations, the free-space estimate's margin, and lm-eval requests and prompts checked.

Where it fits, the inputs are generated (hypothesis strategies, mutated files, symlink trees). Each
test counts the cases it tried by class in ``CASES``; run with ``-s`` to see the counts printed at
the end of the module.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ecoflap_cli.errors import ArtifactError, DataError, EcoflapError, ModelError, PlanError
from ecoflap_cli.files import DiskError, disk_errors, write_atomic
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.checkpoint import (
    ESTIMATE_MARGIN,
    ESTIMATE_SLACK_BYTES,
    check_output_dir,
    convert_checkpoint,
    estimate_checkpoint_bytes,
    save_checkpoint,
)
from ecoflap_cli.io.layout import CHECKSUMS_NAME, check_integrity, verify_checksums
from ecoflap_cli.io.loading import LoadOptions, load_model
from ecoflap_cli.io.model_card import IDENTITY_KEY, checkpoint_identity, evaluations_in, render_card
from ecoflap_cli.io.outputs import check_output_path
from ecoflap_cli.io.packed import find_weights, save_packed

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

#: cases tried per class, over the whole module (printed at its end)
CASES: Counter[str] = Counter()
FUZZ = settings(
    max_examples=int(os.environ.get("ECOFLAP_FUZZ_EXAMPLES", "25")),
    deadline=None,
    derandomize=os.environ.get("ECOFLAP_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    total = sum(CASES.values())
    lines = [f"  {name}: {count}" for name, count in sorted(CASES.items())]
    sys.stderr.write(f"\ntest_hostile_io cases tried by class ({total} in all):\n" + "\n".join(lines) + "\n")


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


REPORT = {"tensors": [], "model": {"id": "model"}, "achieved_sparsity": 0.0, "target_sparsity": 0.0}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """The tiny LLaMA saved by ecoflap's writer, dense and packed (half of each linear zeroed)."""
    root = tmp_path_factory.mktemp("hostile")
    loaded = load_model(str(tiny_llama), LoadOptions(device="cpu"))
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if param.dim() == 2 and "layers" in name:
                param[:, ::2] = 0
    docs = {"ecoflap_report.json": REPORT}
    return {
        "dense": save_checkpoint(loaded, root / "dense", docs),
        "packed": save_checkpoint(loaded, root / "packed", docs, packed=True),
    }


def copy_of(directory: Path, tmp_path: Path, name: str = "work") -> Path:
    target = tmp_path / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(directory, target)
    return target


# --- integrity covers the config ----------------------------------------------------------------


def _edit_json(path: Path, key: str, value) -> None:
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("kind", ["dense", "packed"])
@pytest.mark.parametrize(("key", "value"), [("hidden_act", "relu"), ("rope_theta", 5.0)])
def test_an_edited_config_fails_verification_in_one_line(checkpoints, kind, key, value, tmp_path):
    work = copy_of(checkpoints[kind], tmp_path)
    recorded = json.loads((work / CHECKSUMS_NAME).read_text())["files"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= recorded.keys()
    assert check_integrity(work, True) == "verified"
    _edit_json(work / "config.json", key, value)
    for read in (
        verify_checksums,
        lambda d: load_model(str(d)),
        lambda d: convert_checkpoint(d, tmp_path / "c", "dense"),
    ):
        with pytest.raises(ArtifactError) as caught:
            read(work)
        assert "config.json was edited or corrupted" in one_line(caught.value)
        CASES["integrity: config edit refused"] += 1
    assert not (tmp_path / "c").exists()


MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


@FUZZ
@given(
    kind=st.sampled_from(["dense", "packed"]),
    file=st.sampled_from(MODEL_FILES),
    edit=st.one_of(
        st.tuples(st.just("key"), st.text(min_size=1, max_size=12), st.one_of(st.integers(), st.text(max_size=8))),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=8), st.none()),
        st.tuples(st.just("flip"), st.integers(min_value=0, max_value=10**6), st.integers(1, 255)),
        st.tuples(st.just("delete"), st.none(), st.none()),
    ),
)
def test_any_change_to_a_model_file_is_refused(checkpoints, kind, file, edit, tmp_path_factory):
    work = copy_of(checkpoints[kind], tmp_path_factory.mktemp("fuzz"))
    path = work / file
    what, a, b = edit
    before = path.read_bytes()
    if what == "key":
        doc = json.loads(before)
        doc[a] = b
        path.write_text(json.dumps(doc))
    elif what == "append":
        path.write_bytes(before + a)
    elif what == "flip":
        data = bytearray(before)
        data[a % len(data)] ^= b
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    if path.exists() and path.read_bytes() == before:
        return  # a key set to the value it had: nothing changed
    with pytest.raises(ArtifactError) as caught:
        verify_checksums(work)
    assert file in one_line(caught.value)
    CASES["integrity: mutated model file refused"] += 1


def test_weights_only_checksums_of_older_checkpoints_load_with_a_note(checkpoints, tmp_path):
    work = copy_of(checkpoints["dense"], tmp_path)
    doc = json.loads((work / CHECKSUMS_NAME).read_text())
    doc["version"] = 1
    doc["files"] = {k: v for k, v in doc["files"].items() if k.endswith(".safetensors")}
    (work / CHECKSUMS_NAME).write_text(json.dumps(doc))
    assert "weights only" in verify_checksums(work)
    assert check_integrity(work, True) == "weights verified"
    CASES["integrity: legacy checksums"] += 1


# --- the Hugging Face cache layout --------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(checkpoint: Path, hub: Path, repo: str = "org/pruned") -> Path:
    """Store ``checkpoint`` as the hub stores a download: ``models--org--name/blobs/<sha256>``, a
    snapshot of symlinks ``../../blobs/<sha256>`` and ``refs/main``; returns the snapshot."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    for file in sorted(checkpoint.iterdir()):
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snapshot


@pytest.mark.parametrize("kind", ["dense", "packed"])
def test_a_hub_cache_snapshot_is_read_by_every_reader(checkpoints, kind, tmp_path):
    snapshot = make_cache(checkpoints[kind], tmp_path / "hub")
    assert all(f.is_symlink() for f in snapshot.iterdir())
    assert verify_checksums(snapshot) is None
    loaded = load_model(str(snapshot), LoadOptions(device="cpu"))
    reference = load_model(str(checkpoints[kind]), LoadOptions(device="cpu"))
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), reference.model.state_dict().items()):
        assert torch.equal(a, b), name
    out = tmp_path / "converted"
    convert_checkpoint(snapshot, out, "dense" if kind == "packed" else "packed")
    assert not any(f.is_symlink() for f in out.iterdir())  # real files, copied from the blobs
    assert verify_checksums(out) is None
    CASES["cache layout: snapshot read"] += 3


def test_a_packed_checkpoint_loads_by_hub_id_offline(checkpoints, tmp_path):
    home = tmp_path / "hf"
    make_cache(checkpoints["packed"], home / "hub")
    code = (
        "import torch\n"
        "from ecoflap_cli.io.loading import load_model, LoadOptions\n"
        "from ecoflap_cli.io.pruned import load_pruned\n"
        "a = load_model('org/pruned', LoadOptions(device='cpu'))\n"
        "b = load_pruned('org/pruned')\n"
        "assert a.note is None and a.tokenizer is not None\n"
        "assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.state_dict().values()))\n"
        "print('zeros', int(sum((p == 0).sum() for p in a.model.parameters())))\n"
    )
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 0
    CASES["cache layout: packed by hub id"] += 2


#: where a snapshot's symlink may point: (label, allowed)
LINK_TARGETS = [
    ("blob", True),
    ("inside", True),
    ("other-repo-blob", False),
    ("outside", False),
    ("dangling", False),
    ("loop", False),
]


def _point(link: Path, snapshot: Path, target: str, hub: Path) -> None:
    """Make the snapshot file ``link`` a symlink of kind ``target`` to what it held."""
    data = link.read_bytes()
    link.unlink()
    digest = hashlib.sha256(data).hexdigest()
    if target == "blob":
        (snapshot.parent.parent / "blobs" / digest).write_bytes(data)
        link.symlink_to(Path("..") / ".." / "blobs" / digest)
    elif target == "inside":
        (snapshot / ("." + link.name + ".real")).write_bytes(data)
        link.symlink_to("." + link.name + ".real")
    elif target == "other-repo-blob":
        other = hub / "models--evil--repo" / "blobs"
        other.mkdir(parents=True, exist_ok=True)
        (other / digest).write_bytes(data)
        link.symlink_to(Path("..") / ".." / ".." / "models--evil--repo" / "blobs" / digest)
    elif target == "outside":
        secret = hub.parent / f"secret-{link.name}"
        secret.write_bytes(data)
        link.symlink_to(secret)
    elif target == "dangling":
        link.symlink_to(Path("..") / ".." / "blobs" / ("0" * 64))
    else:
        link.symlink_to(link.name)


@FUZZ
@given(
    kind=st.sampled_from(["dense", "packed"]),
    links=st.dictionaries(
        st.sampled_from(["weights", "config.json", "tokenizer.json", "README.md"]),
        st.sampled_from(LINK_TARGETS),
        min_size=1,
        max_size=3,
    ),
)
def test_symlink_trees_are_read_inside_and_refused_outside(checkpoints, kind, links, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tree")
    hub = tmp / "hub"
    snapshot = make_cache(checkpoints[kind], hub)
    weights = find_weights(snapshot)[1][0].name
    for file, (target, _) in links.items():
        _point(snapshot / (weights if file == "weights" else file), snapshot, target, hub)
    allowed = all(ok for _, ok in links.values())
    out = tmp / "out"
    if allowed:
        assert verify_checksums(snapshot) is None
        convert_checkpoint(snapshot, out, "dense")
        assert not any(f.is_symlink() for f in out.rglob("*"))
        CASES["cache layout: symlink inside read"] += 1
        return
    with pytest.raises((ArtifactError, ModelError)) as caught:
        convert_checkpoint(snapshot, out, "dense", verify=False)
    one_line(caught.value)
    assert not out.exists() and not [p for p in tmp.iterdir() if p.name.startswith(".out")]
    model_file_escapes = any(not ok and f != "README.md" for f, (_, ok) in links.items())
    if model_file_escapes:  # a weight or model file that escapes is refused by verification too
        with pytest.raises(ArtifactError):
            verify_checksums(snapshot)
    CASES["cache layout: escaping symlink refused"] += 1


def test_convert_never_copies_what_a_link_points_to_outside(checkpoints, tmp_path):
    work = copy_of(checkpoints["dense"], tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE")
    for name, target in (("notes.txt", secret / "id_rsa"), ("extra", secret)):
        link = work / name
        link.symlink_to(target)
        with pytest.raises(ArtifactError, match="outside the checkpoint"):
            convert_checkpoint(work, tmp_path / "out", "packed")
        assert not (tmp_path / "out").exists()
        link.unlink()
        CASES["cache layout: convert link escape"] += 1
    (work / "sub").mkdir()
    (work / "sub" / "deep").symlink_to(Path("..") / ".." / "secret" / "id_rsa")
    with pytest.raises(ArtifactError, match="outside the checkpoint"):
        convert_checkpoint(work, tmp_path / "out", "packed")
    CASES["cache layout: convert link escape"] += 1


# --- non-finite numbers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_names(tiny_llama) -> list[str]:
    model = load_model(str(tiny_llama), LoadOptions(device="cpu")).model
    return [n for n, p in model.named_parameters() if p.is_floating_point()]


@FUZZ
@given(data=st.data(), value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_non_finite_input_weight_is_one_line_naming_the_tensor(
    tiny_llama, float_names, data, value, tmp_path_factory
):
    from transformers import AutoModelForCausalLM

    name = data.draw(st.sampled_from(float_names))
    work = copy_of(tiny_llama, tmp_path_factory.mktemp("nan"))
    model = AutoModelForCausalLM.from_pretrained(work)
    param = dict(model.named_parameters())[name]
    index = data.draw(st.integers(0, param.numel() - 1))
    with torch.no_grad():
        param.view(-1)[index] = value
    model.save_pretrained(work)
    with pytest.raises(ModelError) as caught:
        load_model(str(work), LoadOptions(device="cpu"))
    line = one_line(caught.value)
    assert f"weight {name} holds" in line or (
        "embed_tokens" in name and "lm_head" in line  # tied: the same tensor, named by its other name
    ), line
    CASES["non-finite: weight refused at load"] += 1


def _llama_batches(n: int = 2, length: int = 16):
    ids = torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def _counts(adapter, sparsity: float = 0.5) -> dict[str, int]:
    return {
        f"{name}.weight": int(linear.weight.numel() * sparsity)
        for b in adapter.blocks()
        for name, linear in b.linears.items()
    }


@pytest.mark.parametrize("solver", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_pruning_an_in_memory_model_with_a_non_finite_weight_is_one_line(tiny_llama, solver, value):
    """The API may hand over a model ecoflap did not load: the engine refuses it too (SparseGPT
    used to fail with a traceback)."""
    from ecoflap_cli.engine.pruning import PruneSettings, prune_model
    from ecoflap_cli.models import get_adapter

    loaded = load_model(str(tiny_llama), LoadOptions(device="cpu"))
    adapter = get_adapter(loaded.model)
    block = adapter.blocks()[1]
    name = next(iter(block.linears))
    with torch.no_grad():
        block.linears[name].weight[0, 0] = value
    with pytest.raises(PlanError) as caught:
        prune_model(adapter, _counts(adapter), _llama_batches(), PruneSettings(solver))
    line = one_line(caught.value)
    assert block.name in line, line
    CASES["non-finite: engine refuses NaN weight"] += 1


def _overflowing_fp16(tiny_llama, scale: float):
    """The tiny LLaMA in float16 whose block 1 MLP inputs are scaled by ``scale`` (its norm's weight)."""
    from ecoflap_cli.models import get_adapter

    loaded = load_model(str(tiny_llama), LoadOptions(device="cpu", dtype="float16"))
    adapter = get_adapter(loaded.model)
    block = adapter.blocks()[1]
    with torch.no_grad():
        block.module.post_attention_layernorm.weight.mul_(scale)
    return adapter, block


def test_half_precision_overflow_is_caught_and_statistics_are_float32(tiny_llama):
    """Measured: the statistics accumulate in float32, so inputs near float16's largest value
    (65504) give finite statistics (their squares, 4e9, would overflow a float16 accumulator);
    inputs past it are infinite already in the forward pass, which no accumulator repairs: refused
    naming the block and the dtype."""
    from ecoflap_cli.engine.blockwise import capture_inputs, run_block
    from ecoflap_cli.engine.pruning import PruneSettings, _collect_statistics, propagate, prune_model

    adapter, block = _overflowing_fp16(tiny_llama, 1.0)
    inputs = capture_inputs(adapter, adapter.blocks()[0], _llama_batches())
    inputs = propagate(adapter, adapter.blocks()[0], inputs, None)
    # scale block 1's MLP inputs so that their largest is about 30000: finite in float16
    norm = block.module.post_attention_layernorm.weight
    probe = {}
    gate = f"{block.name}.mlp.gate_proj"
    handle = block.linears[gate].register_forward_hook(lambda m, a, o: probe.update(x=a[0].abs().max()))
    with torch.no_grad():
        run_block(block, inputs[0])
        factor = 30000.0 / float(probe["x"])
        norm.mul_(factor)
    handle.remove()
    stats = _collect_statistics(block, inputs, "col_sq", [gate])[gate]
    assert stats.dtype == torch.float32 and bool(torch.isfinite(stats).all())
    assert float(stats.max()) > torch.finfo(torch.float16).max  # a float16 accumulator would be inf
    CASES["non-finite: fp32 statistics of large fp16 activations"] += 1
    with torch.no_grad():
        norm.mul_(100.0)  # past 65504: infinite activations
    with pytest.raises(PlanError) as caught:
        prune_model(adapter, _counts(adapter), _llama_batches(), PruneSettings("wanda"))
    line = one_line(caught.value)
    assert block.name in line and "float16" in line, line
    CASES["non-finite: fp16 overflow refused"] += 1


def test_a_non_finite_score_is_refused_naming_the_block(tiny_llama):
    from ecoflap_cli.engine.scoring import first_order_scores

    adapter, block = _overflowing_fp16(tiny_llama, 1e6)
    with pytest.raises(PlanError) as caught:
        first_order_scores(adapter, _llama_batches())
    assert "score is" in one_line(caught.value)
    CASES["non-finite: score refused"] += 1


# --- disk full ------------------------------------------------------------------------------------


@pytest.fixture
def full_fs(tmp_path):
    """A real, small file system (a 64 KiB tmpfs); skipped where mounting is not permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    except OSError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_is_one_line_for_every_writer(full_fs, tiny_llama, checkpoints):
    loaded = load_model(str(tiny_llama), LoadOptions(device="cpu"))
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    writers = {
        "checkpoint dense": lambda: save_checkpoint(loaded, full_fs / "dense", {"ecoflap_report.json": REPORT}),
        "checkpoint packed": lambda: save_checkpoint(
            loaded, full_fs / "packed", {"ecoflap_report.json": REPORT}, packed=True
        ),
        "safetensors (packed file)": lambda: save_packed(state, full_fs / "p.safetensors"),
        "json document": lambda: artifacts.emit_json({"x": "y" * 200_000}, str(full_fs / "doc.json")),
        "write_atomic": lambda: write_atomic(full_fs / "blob", b"z" * 200_000),
        "convert": lambda: convert_checkpoint(checkpoints["dense"], full_fs / "conv", "packed"),
    }
    for what, write in writers.items():
        with pytest.raises(DiskError) as caught:
            write()
        line = one_line(caught.value)
        assert "the disk is full" in line and str(full_fs) in line, (what, line)
        assert caught.value.exit_code == 4
        assert not list(full_fs.iterdir()), (what, list(full_fs.iterdir()))  # no temporary left
        CASES["disk full: real tmpfs"] += 1


class FakeSafetensorError(Exception):
    """What safetensors raises: its own exception class, the OS error only quoted in the text."""


DISK = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "read-only"}


@FUZZ
@given(
    code=st.sampled_from([errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO]),
    shape=st.sampled_from(["oserror", "quoted", "chained", "wrapped-runtime"]),
)
def test_injected_disk_errors_of_any_library_become_one_line(code, shape, tmp_path_factory):
    message = os.strerror(code)
    if shape == "oserror":
        error: Exception = OSError(code, message)
    elif shape == "quoted":
        error = FakeSafetensorError(f"Error while serializing: I/O error: {message} (os error {code})")
    elif shape == "chained":
        try:
            try:
                raise OSError(code, message)
            except OSError as inner:
                raise RuntimeError("PytorchStreamWriter failed writing file data") from inner
        except RuntimeError as outer:
            error = outer
    else:
        error = RuntimeError(f"[enforce fail] {message} (os error {code})")
    target = tmp_path_factory.mktemp("inj") / "out.json"
    with pytest.raises(Exception) as caught, disk_errors(target):
        raise error
    if code in DISK:
        assert isinstance(caught.value, DiskError) and DISK[code] in one_line(caught.value)
        CASES["disk full: injected, converted"] += 1
    else:
        assert caught.value is error  # not a disk error: left as it was
        CASES["disk full: injected, other error untouched"] += 1


# --- the one rule for outputs ------------------------------------------------------------------


def _output_case(case: str, ckpt: Path, tmp: Path) -> tuple[Path, str]:
    """An output path of kind ``case``, and the kind of check it is made for."""
    weights = find_weights(ckpt)[1][0]
    if case == "the-input":
        return ckpt, "dir"
    if case == "weights-file":
        return weights, "file"
    if case == "config-file":
        return ckpt / "config.json", "results"
    if case == "nested-in-input":
        return ckpt / "sub" / "x.json", "file"
    if case == "dir-inside-input":
        return ckpt / "out", "dir"
    if case == "dir-containing-input":
        return ckpt.parent, "dir"
    if case == "symlink-to-weights":
        link = tmp / "link.json"
        link.symlink_to(weights)
        return link, "file"
    if case == "symlink-dir-into-input":
        link = tmp / "ln"
        link.symlink_to(ckpt)
        return link / "scores.json", "file"
    if case == "dangling-symlink":
        link = tmp / "dangling.json"
        link.symlink_to(tmp / "nowhere" / "x.json")
        return link, "file"
    if case == "dangling-parent":
        link = tmp / "gone"
        link.symlink_to(tmp / "nowhere")
        return link / "x.json", "file"
    if case == "long-name-238":
        return tmp / ("n" * 234 + ".json"), "file"
    if case == "long-dir-name":
        return tmp / ("d" * 240), "dir"
    if case == "long-component":
        return tmp / ("c" * 300) / "x.json", "file"
    if case == "long-path":
        return tmp.joinpath(*(["p" * 200] * 22)) / "x.json", "file"
    if case == "results-new-file-in-input":
        return ckpt / "eval-new.json", "results"
    if case == "fine-file":
        return tmp / "scores.json", "file"
    return tmp / "pruned", "dir"  # fine-dir


OUTPUT_CASES = {
    "the-input": False,
    "weights-file": False,
    "config-file": False,
    "nested-in-input": False,
    "dir-inside-input": False,
    "dir-containing-input": False,
    "symlink-to-weights": False,
    "symlink-dir-into-input": False,
    "dangling-symlink": False,
    "dangling-parent": False,
    "long-name-238": False,
    "long-dir-name": False,
    "long-component": False,
    "long-path": False,
    "results-new-file-in-input": True,
    "fine-file": True,
    "fine-dir": True,
}


@pytest.mark.parametrize("via", [False, True], ids=["check_output_path", "caller"])
@pytest.mark.parametrize("kind", ["dense", "packed"])
@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_the_output_rule(checkpoints, case, kind, via, tmp_path_factory):
    """Every output shape, against a dense and a packed input, through the rule itself and through
    the check its callers use (``check_output_dir`` / ``check_json_output``)."""
    tmp = tmp_path_factory.mktemp("rule")
    ckpt = copy_of(checkpoints[kind], tmp, "ckpt")
    out, check = _output_case(case, ckpt, tmp)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    inputs = [str(ckpt), str(tmp / "calib.txt")]
    if OUTPUT_CASES[case]:
        if not via:
            check_output_path(out, inputs, kind=check)
        elif check == "dir":
            check_output_dir(out, False, inputs=inputs)
        else:
            artifacts.check_json_output(str(out), False, inputs=inputs, kind=check)
        CASES["output rule: accepted"] += 1
        return
    with pytest.raises(ArtifactError) as caught:
        if not via:
            check_output_path(out, inputs, kind=check)
        elif check == "dir":
            check_output_dir(out, True, inputs=inputs)
        else:
            artifacts.check_json_output(str(out), True, inputs=inputs, kind=check)
    one_line(caught.value)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
    CASES["output rule: refused"] += 1


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "ecoflap_checksums.json", "tokenizer.json"])
def test_writing_results_over_a_checkpoint_file_is_refused_even_without_inputs(checkpoints, name, tmp_path):
    """The data loss of ``eval CKPT -o CKPT/model.safetensors --overwrite``: refused at the check
    and again by the writer, whoever calls them."""
    work = copy_of(checkpoints["dense"], tmp_path)
    target = work / name
    before = target.read_bytes()
    for kind in ("file", "results"):
        with pytest.raises(ArtifactError, match="would replace a file of the checkpoint"):
            artifacts.check_json_output(str(target), True, kind=kind)
    with pytest.raises(ArtifactError, match="would replace a file of the checkpoint"):
        artifacts.emit_json({"checkpoint": "x"}, str(target), overwrite=True)
    assert target.read_bytes() == before
    CASES["output rule: checkpoint file protected"] += 3


def test_a_blob_of_a_cache_snapshot_input_is_protected(checkpoints, tmp_path):
    snapshot = make_cache(checkpoints["dense"], tmp_path / "hub")
    blob = (snapshot / "model.safetensors").resolve()
    with pytest.raises(ArtifactError, match="a symlink in it points there"):
        check_output_path(blob, [snapshot], kind="file")
    CASES["output rule: refused"] += 1


# --- model cards -------------------------------------------------------------------------------

hostile_text = st.text(
    alphabet=st.sampled_from(list("ab|`*_[]()<>#!\n\r\t\\~-: /") + ["\u2028", "\x00", "é"]), min_size=1, max_size=30
)


def _card(source: str, task: str, metric: str, dense: str, tower: str, file: str) -> str:
    report = {
        "tensors": [{"name": "a.weight", "tower": tower, "numel": 10, "zeros": 5}],
        "achieved_sparsity": 0.5,
        "target_sparsity": 0.5,
        "model": {"id": "/home/alice/models/base-model", "class": "LlamaForCausalLM"},
        "solver": "wanda",
        "calibration": {"source": source, "samples": 2, "seqlen": 16, "seed": 0},
    }
    plan = {"groups": [{"name": tower, "tower": tower, "sparsity": 0.5, "tensors": [{"name": "a.weight"}]}]}
    results = {
        "checkpoint": "x",
        "blocks": [],
        "summary": {"achieved": 0.5},
        "dense_model": dense,
        "perplexity": {"pruned": 10.0, "dense": 9.0, "text": source, "windows": 2, "seqlen": 16},
        "tasks": {task: {"pruned": {metric: 1.5}}},
    }
    docs = {"ecoflap_report.json": report, "plan.json": plan}
    return render_card(docs, "dense", "out", [(file, results)])


@FUZZ
@given(source=hostile_text, task=hostile_text, metric=hostile_text, dense=hostile_text, tower=hostile_text)
def test_user_strings_cannot_inject_markdown(source, task, metric, dense, tower):
    calib = "/home/alice/data/" + source
    card = _card(calib, task, metric, "/home/alice/" + dense, tower, "eval.json")
    plain = _card("/home/alice/data/calib.txt", "t", "m", "/home/alice/d", "t", "eval.json")
    assert len(card.splitlines()) == len(plain.splitlines())  # no line injected
    for line, reference in zip(card.splitlines(), plain.splitlines()):
        if reference.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line)
            assert len(cells) == len(reference.split("|")), (line, reference)
    assert "/home/alice" not in card  # no absolute local path
    CASES["model card: hostile strings escaped"] += 1


def test_a_card_shows_only_evaluations_of_its_own_checkpoint(checkpoints, tmp_path):
    work = copy_of(checkpoints["dense"], tmp_path)
    own = {"checkpoint": str(work), "blocks": [], "summary": {"achieved": 0.5}, IDENTITY_KEY: checkpoint_identity(work)}
    (work / "mine.json").write_text(json.dumps(own))
    other = {**own, IDENTITY_KEY: "0" * 64}
    (work / "other.json").write_text(json.dumps(other))
    legacy = {k: v for k, v in own.items() if k != IDENTITY_KEY}
    (work / "legacy.json").write_text(json.dumps(legacy))
    assert [name for name, _ in evaluations_in(work)] == ["mine.json"]
    _edit_json(work / "config.json", "rope_theta", 1.0)
    (work / CHECKSUMS_NAME).write_text((work / CHECKSUMS_NAME).read_text().replace('"', '"', 1) + " ")
    assert evaluations_in(work) == []  # the checkpoint changed since: its old results are not its own
    CASES["model card: foreign evaluations left out"] += 4


# --- the free-space estimate ---------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_the_free_space_estimate_is_within_its_stated_margin(tiny_llama, packed, tmp_path):
    loaded = load_model(str(tiny_llama), LoadOptions(device="cpu"))
    counts = {}
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if param.dim() == 2 and "layers" in name:
                param[:, ::2] = 0
                counts[name] = param.numel() // 2
    report = {**REPORT, "tensors": [{"name": n, "tower": "t", "numel": 2 * c, "zeros": c} for n, c in counts.items()]}
    plan = {
        "groups": [
            {"name": n, "tower": "t", "sparsity": 0.5, "tensors": [{"name": n, "zeros": c}]} for n, c in counts.items()
        ]
    }
    needed = estimate_checkpoint_bytes(loaded.model, counts, packed, str(tiny_llama))
    out = save_checkpoint(loaded, tmp_path / "out", {"ecoflap_report.json": report, "plan.json": plan}, packed=packed)
    written = sum(f.stat().st_size for f in out.iterdir())
    assert written <= needed <= ESTIMATE_MARGIN * written + ESTIMATE_SLACK_BYTES, (written, needed)
    weights = estimate_checkpoint_bytes(loaded.model, counts, packed, weights_only=True)
    assert weights <= needed and weights < 2 * written  # what a resume state stores: no 32 MB guess
    CASES["estimate: within margin"] += 1


# --- lm-eval surfaces -----------------------------------------------------------------------------


@FUZZ
@given(
    limit=st.one_of(
        st.none(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-5, 10**6),
        st.booleans(),
        st.text(max_size=3),
    ),
    shots=st.one_of(st.none(), st.integers(-(10**12), 10**12), st.booleans(), st.floats(0, 3)),
)
@example(limit=None, shots=None)
@example(limit=0.5, shots=0)
@example(limit=10, shots=5)
@example(limit=3.0, shots=1000)
@example(limit=math.nan, shots=None)
@example(limit=math.inf, shots=None)
@example(limit=-1, shots=None)
@example(limit=None, shots=10**9)
@example(limit=None, shots=-1)
@example(limit=2.5, shots=None)
def test_lm_eval_requests_are_checked_when_made(limit, shots):
    from ecoflap_cli.evaluation.lm_eval_tasks import MAX_FEWSHOT, LmEvalRequest

    numeric = isinstance(limit, (int, float)) and not isinstance(limit, bool)
    good_limit = limit is None or (
        numeric and math.isfinite(limit) and limit > 0 and (limit < 1 or limit == int(limit))
    )
    good_shots = shots is None or (type(shots) is int and 0 <= shots <= MAX_FEWSHOT)
    if good_limit and good_shots:
        LmEvalRequest(["wiki_cloze"], num_fewshot=shots, limit=limit)
        CASES["lm-eval: valid request accepted"] += 1
        return
    with pytest.raises(DataError) as caught:
        LmEvalRequest(["wiki_cloze"], num_fewshot=shots, limit=limit)
    one_line(caught.value)
    CASES["lm-eval: bad request refused"] += 1


class _Instance:
    def __init__(self, context: str, continuation: str, kind: str = "loglikelihood") -> None:
        self.args, self.request_type = (context, continuation), kind


class _Task:
    """What check_task_prompts needs of an lm-eval task."""

    def __init__(self, shots: int, contexts: list[str], fail: Exception | None = None) -> None:
        self.shots, self.contexts, self.fail, self.instances = shots, contexts, fail, []

    def get_config(self, key: str):
        return {"num_fewshot": self.shots}[key]

    def build_all_requests(self, **kwargs) -> None:
        if self.fail is not None:
            raise self.fail
        self.instances = [_Instance(c, " end") for c in self.contexts]


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@FUZZ
@given(
    shots=st.integers(0, 5),
    words=st.integers(1, 60),
    unknown_share=st.sampled_from([0.0, 0.05, 0.3, 0.7]),
)
def test_task_prompts_past_the_context_or_unknown_to_the_tokenizer(shots, words, unknown_share):
    pytest.importorskip("lm_eval")
    from ecoflap_cli.evaluation.lm_eval_tasks import check_task_prompts

    tokenizer = _word_tokenizer(["known", "end"])
    unknown = round(words * unknown_share)
    context = " ".join(["zzz"] * unknown + ["known"] * (words - unknown))
    max_length = 32
    length = words + 1 + 1  # " end", and a BOS
    share = unknown / (words + 1)
    tasks = {"t": _Task(shots, [context])}
    if shots and length > max_length:
        with pytest.raises(DataError, match="shot prompt takes") as caught:
            check_task_prompts(tasks, tokenizer, max_length, None, "model")
        one_line(caught.value)
        CASES["lm-eval: few-shot prompt past context refused"] += 1
    elif share > 0.1:
        with pytest.raises(DataError, match="unknown to the model's tokenizer") as caught:
            check_task_prompts(tasks, tokenizer, max_length, None, "model")
        one_line(caught.value)
        CASES["lm-eval: unknown task text refused"] += 1
    else:
        truncated = check_task_prompts(tasks, tokenizer, max_length, None, "model")
        assert truncated == {"t": int(length > max_length)}  # 0-shot: truncated and reported
        CASES["lm-eval: prompt accepted (truncation reported)"] += 1


def test_a_few_shot_count_the_data_cannot_supply_is_one_line():
    pytest.importorskip("lm_eval")
    from ecoflap_cli.evaluation.lm_eval_tasks import check_task_prompts

    tasks = {"t": _Task(900, ["known"], fail=ValueError("Sample larger than population or is negative"))}
    with pytest.raises(DataError, match="cannot build its 900-shot prompts") as caught:
        check_task_prompts(tasks, _word_tokenizer(["known"]), 32, None, "model")
    one_line(caught.value)
    CASES["lm-eval: bad request refused"] += 1


def test_include_path_help_says_task_yamls_run_python():
    from ecoflap_cli.evaluation.lm_eval_tasks import INCLUDE_PATH_HELP

    assert "!function" in INCLUDE_PATH_HELP and "--trust-remote-code" in INCLUDE_PATH_HELP
    docs = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    assert "!function" in docs
    CASES["lm-eval: include-path warning"] += 1


def test_every_new_error_is_an_ecoflap_error():
    assert issubclass(DiskError, EcoflapError)
