"""llm-compressor's own virtual environment, created once under the cache directory.

    python -m ecoflap_cli.bench.llmc_env [--root DIR] [--no-create]
    ecoflap sweep ... --method llmc:wanda --llmc-python "$(python -m ecoflap_cli.bench.llmc_env)"

Prints the venv's Python on stdout (progress goes to stderr), creating the venv the first time.
llm-compressor 0.14.0.1 pins ``transformers<=5.17`` while ecoflap runs on 5.24, so the peer runs in
a separate venv: ``python -m venv CACHE/llmc-venv`` then
``pip install torch==2.13.0 llmcompressor==0.14.0.1`` (torch first so pip takes the CPU wheel).
Measured on the 2-core benchmark machine: about 70 s. A marker file (``ecoflap-llmc.json``) records
a finished install; without it the venv is (re)built.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ecoflap_cli.data.assets import cache_dir
from ecoflap_cli.errors import EcoflapError

LLMC_REQUIREMENTS = ("torch==2.13.0", "llmcompressor==0.14.0.1")
MARKER = "ecoflap-llmc.json"


def default_root() -> Path:
    """Where the benchmark keeps llm-compressor's venv: ``CACHE/llmc-venv``."""
    return cache_dir() / "llmc-venv"


def venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def find_llmc_venv(root: Path) -> Path | None:
    """The venv's Python when a finished install is there (marker file and interpreter), else None."""
    python = venv_python(root)
    return python if (root / MARKER).is_file() and python.is_file() else None


def ensure_llmc_venv(root: Path, log=None) -> Path:
    """Python of a venv with llm-compressor installed; creates it the first time (marker file)."""
    log = log or (lambda message: None)
    found = find_llmc_venv(root)
    if found is not None:
        return found
    python = venv_python(root)
    log(f"creating llm-compressor venv at {root} ({' '.join(LLMC_REQUIREMENTS)})")
    start = time.perf_counter()
    steps = [
        [sys.executable, "-m", "venv", str(root)],
        [str(python), "-m", "pip", "install", "--quiet", *LLMC_REQUIREMENTS],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EcoflapError(f"could not set up llm-compressor's venv ({' '.join(cmd[:4])}...): {tail[0][:300]}")
    check = subprocess.run(
        [str(python), "-c", "import llmcompressor, transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise EcoflapError(f"llm-compressor does not import in {root}: {check.stderr.strip()[-300:]}")
    seconds = round(time.perf_counter() - start, 1)
    (root / MARKER).write_text(
        json.dumps(
            {
                "requirements": LLMC_REQUIREMENTS,
                "install_s": seconds,
                "transformers": (check.stdout.strip().splitlines() or ["?"])[-1],
            }
        )
    )
    log(f"llm-compressor venv ready in {seconds} s")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="The venv's directory (default: CACHE/llmc-venv).")
    parser.add_argument(
        "--no-create", action="store_true", help="Only locate: exit 1 when no finished venv is there (creates nothing)."
    )
    args = parser.parse_args(argv)
    root = args.root or default_root()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.no_create:
        python = find_llmc_venv(root)
        if python is None:
            log(f"no llm-compressor venv at {root} (run without --no-create to create it)")
            return 1
    else:
        try:
            python = ensure_llmc_venv(root, log)
        except EcoflapError as exc:
            log(f"error: {exc}")
            return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
