"""llm-compressor's own virtual environment, created once under the cache directory.

llm-compressor 0.14.0.1 pins ``transformers<=5.17`` while ecoflap runs on 5.24, so the peer runs in
a separate venv: ``python -m venv CACHE/llmc-venv`` then
``pip install torch==2.13.0 llmcompressor==0.14.0.1`` (torch first so pip takes the CPU wheel).
Measured on the 2-core benchmark machine: about 70 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from ecoflap_cli.errors import EcoflapError

LLMC_REQUIREMENTS = ("torch==2.13.0", "llmcompressor==0.14.0.1")


def venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def ensure_llmc_venv(root: Path, log=None) -> Path:
    """Python of a venv with llm-compressor installed; creates it the first time (marker file)."""
    log = log or (lambda message: None)
    marker = root / "ecoflap-llmc.json"
    python = venv_python(root)
    if marker.is_file() and python.is_file():
        return python
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
    check = subprocess.run([str(python), "-c", "import llmcompressor, transformers; print(transformers.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise EcoflapError(f"llm-compressor does not import in {root}: {check.stderr.strip()[-300:]}")
    seconds = round(time.perf_counter() - start, 1)
    marker.write_text(json.dumps({"requirements": LLMC_REQUIREMENTS, "install_s": seconds,
                                  "transformers": (check.stdout.strip().splitlines() or ["?"])[-1]}))
    log(f"llm-compressor venv ready in {seconds} s")
    return python
