"""The benchmark models beside SmolLM2, set up like it (one place for it).

``model_config(name, ...)`` is :func:`ecoflap_cli.bench.smollm.smollm2_config` for any of
``MODELS``: the same calibration windows and data sizes (``smollm.SETTINGS``), with the model's
own GGUF and its own cache folder; ``text`` picks the evaluation text: a Wikipedia split
(``test``, ``valid``; tune on ``valid`` only) or ``shakespeare`` (other-domain text, never used to
choose anything). Extra texts are evaluated beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoflap_cli.bench.smollm import smollm2_config
from ecoflap_cli.data import assets

if TYPE_CHECKING:
    from ecoflap_cli.stages.sweep import SweepConfig

#: benchmark name -> (title, the asset function that fetches its GGUF)
MODELS: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2": ("SmolLM2-135M", lambda: assets.smollm2()),
    "qwen": ("Qwen2.5-Coder-0.5B", lambda: assets.qwen25_coder()),
}
#: evaluation texts: Wikipedia splits, the other-domain texts (Shakespeare's tragedies; Python code,
#: the standard library's test split) and their validation splits (other plays; other stdlib files)
TEXTS = ("test", "valid", "shakespeare", "code", "shakespeare_valid", "code_valid")
#: per model: pruning calibration samples (x 512 tokens), evaluation windows (x 512 tokens) per
#: text on the validation and on the test texts, and the test sparsities (Qwen's sizes are smaller:
#: it costs about four times as much per token on the same CPU); every two-model benchmark uses them
SIZES: dict[str, dict[str, Any]] = {
    "smollm2": {"samples": 16, "valid_windows": 10, "test_windows": 10, "sparsities": [0.5, 0.6, 0.7]},
    "qwen": {"samples": 8, "valid_windows": 4, "test_windows": 4, "sparsities": [0.5, 0.6, 0.7]},
}
#: the default allocation (``auto`` resolves to it), spelled out so every benchmark names it alike
#: and shares its cached runs
DEFAULT_WANDA = "ecoflap-first:wanda@metric=gradnorm"
DEFAULT_SPARSEGPT = "ecoflap-first:sparsegpt@metric=gradnorm"


def text_path(text: str) -> str:
    """The file of an evaluation text named in ``TEXTS``."""
    if text in ("shakespeare", "shakespeare_valid"):
        return str(assets.shakespeare_splits()["valid" if text == "shakespeare_valid" else "test"])
    if text in ("test", "valid"):
        return str(assets.wikipedia_splits()[text])
    if text in ("code", "code_valid"):
        return str(assets.python_code()["valid" if text == "code_valid" else "test"])
    raise ValueError(f"text is one of {', '.join(TEXTS)}, got {text!r}")


def model_config(
    name: str,
    methods: list[str],
    sparsities: list[float],
    text: str = "test",
    extra_texts: list[str] | None = None,
    output: str | None = None,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> SweepConfig:
    """A SweepConfig for benchmark model ``name`` on evaluation ``text`` (see the module docstring);
    ``overrides`` set data sizes or other ``SweepConfig`` fields (``model``: another model file)."""
    if name not in MODELS:
        raise ValueError(f"model is one of {', '.join(MODELS)}, got {name!r}")
    title, fetch = MODELS[name]
    path = overrides.pop("model", None) or str(fetch())  # another file for the same role (smoke tests)
    cfg = smollm2_config(
        output or str(assets.cache_dir() / "bench" / f"{name}-{text}"),
        "valid" if text == "valid" else "test",
        methods,
        sparsities,
        peer=False,
        log=log,
        model=path,
        text=text_path(text),
        title=f"{title}, {'Shakespeare' if text == 'shakespeare' else f'Wikipedia {text} split'}",
        **overrides,
    )
    cfg.extra_texts = [text_path(t) for t in extra_texts or []] or None
    return cfg
