from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_text, save_tiny_model  # noqa: E402

# Tiny models run fastest on one thread, and it keeps the suite steady on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("opt") / "model", "opt")


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(make_text(400, seed=2))
    return path


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text(make_text(200, seed=3))
    return path
