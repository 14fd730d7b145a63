"""Calibration size (issue 24): the key cells at the benchmarks' small size and near ``prune``'s.

    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.calib_size --model qwen --size large \
        --method uniform:sparsegpt --method llmc:sparsegpt -s 0.6
    python -m ecoflap_cli.bench.calib_size --model qwen --tables

The benchmarks calibrate on ``bench.models.SIZES`` (16 x 512 tokens for SmolLM2, 8 x 512 for
Qwen2.5-Coder) so that the whole matrix fits two CPU cores; ``prune``'s defaults are 128 windows
of up to 2,048 tokens. ``--size large`` runs the same cells on 64 x 1,024 tokens (SmolLM2) or
32 x 1,024 (Qwen), the issue's floor; ``--size small`` on the benchmark size. Both evaluate on the
Wikipedia test split (the models' benchmark windows) and on the two other-domain texts: six
Shakespeare tragedies and Python code (the standard library's test split,
``data.assets.python_code``). Nothing here chooses a setting: these are test texts.

Each size has its own cache folder (``CACHE/bench/MODEL-calib-SAMPLESxSEQLEN``), so two processes
(one per core) can run different ``--method`` / ``-s`` at once and ``--tables`` reads them all.
``llmc:*`` methods run llm-compressor on the same windows (its venv is created once).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ecoflap_cli.bench.models import DEFAULT_SPARSEGPT, DEFAULT_WANDA, MODELS, SIZES, model_config
from ecoflap_cli.bench.smollm import add_size_options, size_overrides

#: the cells the issue names: today's default beside uniform Wanda and uniform SparseGPT
METHODS = ["uniform:wanda", "uniform:sparsegpt", DEFAULT_WANDA, DEFAULT_SPARSEGPT]
#: the issue's floor for the large size: (samples, seqlen) per model
LARGE = {"smollm2": (64, 1024), "qwen": (32, 1024)}
EXTRA_TEXTS = ["shakespeare", "code"]


def size_of(model: str, size: str) -> tuple[int, int]:
    return LARGE[model] if size == "large" else (int(SIZES[model]["samples"]), 512)


def folder(model: str, samples: int, seqlen: int) -> Path:
    """The cache folder of one model and calibration size."""
    from ecoflap_cli.data import assets

    return assets.cache_dir() / "bench" / f"{model}-calib-{samples}x{seqlen}"


def config(
    model: str,
    size: str,
    methods: list[str],
    sparsities: list[float],
    overrides: dict[str, Any] | None = None,
    log: Any = None,
) -> Any:
    """The sweep configuration of one size; ``overrides`` (``--samples`` ...) replace its sizes.
    With ``llmc*`` methods llm-compressor's venv is created once (``smollm2_config``)."""
    sizes = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset_samples, preset_seqlen = size_of(model, size)
    samples, seqlen = sizes.pop("samples", preset_samples), sizes.pop("seqlen", preset_seqlen)
    return model_config(
        model,
        methods,
        sparsities,
        "test",
        extra_texts=EXTRA_TEXTS,
        output=str(folder(model, samples, seqlen)),
        eval_windows=SIZES[model]["test_windows"],
        samples=samples,
        seqlen=seqlen,
        threads=1,
        log=log,
        **sizes,
    )


def _records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))] if folder.is_dir() else []


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) and math.isfinite(value) else "-"


def tables(model: str, sizes: list[tuple[int, int]] | None = None) -> str:
    """One markdown table per model: every cached cell at both sizes, perplexity on the three
    texts and the prune time (median) as a ratio to uniform SparseGPT at the same size."""
    lines = [
        "| size | method | sparsity | Wikipedia test | Shakespeare | code | prune s | / uniform SparseGPT |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for samples, seqlen in sizes or [size_of(model, "small"), size_of(model, "large")]:
        records = _records(folder(model, samples, seqlen))
        by = {(r["method"], r["sparsity"]): r for r in records if "error" not in r}
        for (method, sparsity), record in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            extra = list((record.get("ppl_extra") or {}).values())
            prune = statistics.median((record.get("times") or {}).get("prune_s") or [math.nan])
            base = by.get(("uniform:sparsegpt", sparsity), {}).get("times", {}).get("prune_s")
            ratio = prune / statistics.median(base) if base and method != "dense" else math.nan
            cells = [record.get("ppl"), *(extra + [None, None])[:2], prune if method != "dense" else None, ratio]
            lines.append(f"| {samples} x {seqlen} | {method} | {sparsity:g} | " + " | ".join(map(_fmt, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    parser.add_argument("--size", choices=("small", "large"), default="large")
    parser.add_argument("--method", action="append", help="a sweep method (repeat; default: the issue's cells)")
    parser.add_argument("-s", "--sparsity", type=float, action="append", help="repeat (default 0.6 and 0.7)")
    parser.add_argument("--tables", action="store_true", help="print the cached cells and stop")
    add_size_options(parser.add_argument_group("data sizes (default: the --size preset)"))
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(args.model))
        return 0

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    methods = args.method or METHODS
    cfg = config(args.model, args.size, methods, args.sparsity or [0.6, 0.7], size_overrides(args), log)
    from ecoflap_cli.bench.sweep_report import runner

    runner(cfg, log).run_pass(cfg.specs(), 0)
    own = (cfg.samples, cfg.seqlen)
    sizes = None if own in (size_of(args.model, "small"), size_of(args.model, "large")) else [own]
    print(tables(args.model, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
