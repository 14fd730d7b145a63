"""The shared helpers: atomic writes, size strings, content hashes, rounding, stopping a forward
pass, free memory, and the public scoring names."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ecoflap_cli.core.rounding import largest_remainder
from ecoflap_cli.core.solvers import split_count
from ecoflap_cli.engine import scoring
from ecoflap_cli.engine.blockwise import StopForward, stop_at
from ecoflap_cli.engine.memory import free_memory, memory_budget_check, total_memory
from ecoflap_cli.errors import EcoflapError, ModelError, PlanError
from ecoflap_cli.files import atomic_dir, atomic_file, write_atomic
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.checkpoint import parse_size
from ecoflap_cli.io.packed import INDEX_FILE, save_packed, save_sharded

UMASK = 0o027  # differs from the usual 022, so that a hard-coded 0o644 would show


@pytest.fixture
def umask() -> Iterator[int]:
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- atomic writes ------------------------------------------------------------------------------


def test_write_atomic_gives_umask_permissions_and_leaves_no_temp(tmp_path, umask):
    target = tmp_path / "sub" / "doc.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert mode(target) == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["doc.json"]


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "doc.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_every_writer_gives_the_same_permissions(tmp_path, umask):
    """artifacts, packed (one file, shards and their index) and checkpoint directories alike."""
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    artifacts.emit_json({"a": 1}, str(tmp_path / "plan.json"))
    state = {f"w{i}": torch.zeros(8, 8) for i in range(3)}
    save_packed(state, tmp_path / "one.safetensors")
    shards = save_sharded(state, tmp_path / "sharded", packed=False, max_shard_bytes=300)
    assert len(shards) > 2 and tmp_path / "sharded" / INDEX_FILE in shards
    private = tmp_path / "private.txt"
    private.write_text("x")
    private.chmod(0o600)
    with atomic_dir(tmp_path / "checkpoint") as staging:
        (staging / "nested").mkdir()
        (staging / "nested" / "config.json").write_text("{}")
        (staging / "copied.txt").write_bytes(private.read_bytes())
        (staging / "copied.txt").chmod(0o600)
    files = [
        tmp_path / "plan.json",
        tmp_path / "one.safetensors",
        *shards,
        tmp_path / "checkpoint" / "nested" / "config.json",
        tmp_path / "checkpoint" / "copied.txt",
    ]
    assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(file_mode) for f in files}
    for directory in (tmp_path / "checkpoint", tmp_path / "checkpoint" / "nested"):
        assert mode(directory) == dir_mode
    assert not list(tmp_path.glob(".*"))


def test_atomic_dir_replaces_or_keeps_the_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("failed")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- sizes and hashes ---------------------------------------------------------------------------


def test_parse_size_reads_bytes_and_units():
    assert parse_size("4096B") == 4096 and parse_size(" 5 gb ") == 5 * 10**9
    assert parse_size("1.5KiB") == 1536 and parse_size("3mb") == 3 * 10**6
    for bad in ("infGB", "nanGB", "1..5GB", "GB", "0GB"):
        with pytest.raises(EcoflapError, match="cannot read size"):
            parse_size(bad)


def test_content_hash_ignores_key_order_and_matches_doc_hash():
    a, b = {"x": 1, "y": [1, 2], "z": {"b": 2, "a": 1}}, {"z": {"a": 1, "b": 2}, "y": [1, 2], "x": 1}
    assert artifacts.content_hash(a) == artifacts.content_hash(b) == artifacts.doc_hash(b)
    assert artifacts.content_hash(a) == hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest()[:16]
    assert len(artifacts.content_hash(a, length=8)) == 8
    assert artifacts.content_hash({"p": Path("/x")}) == artifacts.content_hash({"p": "/x"})


# --- largest-remainder rounding -----------------------------------------------------------------


def _old_split_count(total: int, widths: list[int]) -> list[int]:
    """solvers.split_count before it used largest_remainder (kept to pin the results)."""
    size = sum(widths)
    if size == 0:
        return [0] * len(widths)
    exact = [total * w / size for w in widths]
    counts = [int(e) for e in exact]
    order = sorted(range(len(widths)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _old_integerize(shares: list[float], caps: list[int], total: int) -> list[int]:
    """allocation._integerize before it used largest_remainder (kept to pin the results)."""
    counts = [min(int(math.floor(s)), c) for s, c in zip(shares, caps)]
    left = total - sum(counts)
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    while left > 0:
        moved = False
        for i in order:
            if left == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                left -= 1
                moved = True
        if not moved:
            raise PlanError("budget exceeds the total capacity of the groups")
    while left < 0:
        for i in reversed(order):
            if left == 0:
                break
            if counts[i] > 0:
                counts[i] -= 1
                left += 1
    return counts


@st.composite
def apportion(draw):
    caps = draw(st.lists(st.integers(0, 1000), min_size=1, max_size=20))
    shares = [draw(st.floats(0.0, float(c))) for c in caps]
    total = draw(st.integers(0, sum(caps)))
    return shares, caps, total


@given(apportion())
@settings(max_examples=400, deadline=None)
def test_largest_remainder_is_exact_capped_and_as_before(case):
    shares, caps, total = case
    counts = largest_remainder(shares, caps, total)
    assert sum(counts) == total
    assert all(0 <= c <= cap for c, cap in zip(counts, caps))
    assert counts == largest_remainder(list(shares), list(caps), total)
    assert counts == _old_integerize(shares, caps, total)


@given(st.integers(0, 10**7), st.lists(st.integers(0, 4096), min_size=1, max_size=40))
@settings(max_examples=400, deadline=None)
def test_split_count_is_exact_and_as_before(total, widths):
    counts = split_count(total, widths)
    assert counts == _old_split_count(total, widths)
    assert sum(counts) == (total if sum(widths) else 0)


@given(st.integers(1, 30), st.integers(0, 30))
def test_largest_remainder_ties_go_to_lower_indices(n, extra):
    counts = largest_remainder([0.5] * n, None, n // 2 + min(extra, n - n // 2))
    assert counts == sorted(counts, reverse=True)
    assert max(counts) - min(counts) <= 1


def test_largest_remainder_refuses_what_cannot_fit():
    with pytest.raises(PlanError, match="capacity"):
        largest_remainder([1.0, 1.0], [1, 1], 3)
    with pytest.raises(PlanError, match="negative"):
        largest_remainder([0.0, 0.0], None, -1)
    assert largest_remainder([2.6, 2.6], [2, 2], 3) == [2, 1]  # floors over the total: take back


# --- stopping a forward pass --------------------------------------------------------------------


def test_stop_at_records_and_ends_the_pass():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    ran: list[str] = []
    model[2].register_forward_pre_hook(lambda *_: ran.append("last"))
    x = torch.randn(3, 4)
    outputs: list[torch.Tensor] = []
    with stop_at(model[0], outputs.append):
        model(x)
        ran.append("after the pass")
    assert torch.equal(outputs[0], model[0](x)) and ran == []
    inputs: list = []
    with stop_at(model[1], inputs.append, inputs=True):
        model(x)
    ((args, kwargs),) = inputs
    assert torch.equal(args[0], model[0](x)) and kwargs == {}
    assert not model[0]._forward_hooks and not model[1]._forward_pre_hooks
    assert model(x).shape == (3, 2) and ran == ["last"]  # hooks gone: a plain pass runs to the end
    assert issubclass(StopForward, Exception)


# --- memory -------------------------------------------------------------------------------------


def test_free_and_total_memory():
    free, total = free_memory("cpu"), total_memory("cpu")
    assert isinstance(free, int) and isinstance(total, int) and 0 < free <= total
    assert free_memory("meta") is None and total_memory(torch.device("meta")) is None
    if not torch.cuda.is_available():
        assert free_memory("cuda") is None and total_memory("cuda:0") is None
    with pytest.raises(ModelError, match="lower --batch"):
        memory_budget_check(total * 4, torch.device("cpu"), "holding it", "--batch")
    memory_budget_check(1, torch.device("cpu"), "holding it", "--batch")
    memory_budget_check(10**30, torch.device("meta"), "holding it", "--batch")  # unknown: no check


# --- public scoring names -----------------------------------------------------------------------


def test_scoring_helpers_are_public():
    for name in ("block_linears", "seeded_direction", "batch_loss", "replays"):
        assert callable(getattr(scoring, name))
    a = scoring.seeded_direction(torch.Size([3, 4]), (0, 1, 2, "w"), "rademacher")
    assert torch.equal(a, scoring.seeded_direction(torch.Size([3, 4]), (0, 1, 2, "w"), "rademacher"))
    assert set(a.unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(PlanError):
        scoring.seeded_direction(torch.Size([2]), (0,), "uniform")
