"""What a candidate default costs beside uniform SparseGPT, measured side by side (issue 24).

    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.stage_cost --model smollm2 --repeats 3
    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.stage_cost --model qwen --repeats 2 -s 0.6
    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.stage_cost --model smollm2 --samples 64 --seqlen 1024
    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.stage_cost --model smollm2 --samples 128 --seqlen 2048 \
        --score-seqlen 2048

``bench.travel``'s cost column is one run per cell, and a run whose process reused cached scores is
charged its folder's data-building time, so single timings move by tens of percent. This bench
times the work a one-shot ``ecoflap prune`` does after loading the model, for each method, in one
process: the block scores (nothing cached: the search's scoring is the search), the allocation and
the prune, on the same calibration data (built once, Wikipedia, the benchmark sizes of
``bench.travel``). Methods are interleaved within each repeat so that machine noise falls on all of
them alike; each repeat's seconds are divided by uniform SparseGPT's in the same repeat, and the
report gives the median of those ratios beside the median seconds.

``--samples`` / ``--seqlen`` replace the pruning calibration's size (the scores keep theirs: 32 x
128 tokens), for the cost at ``prune``'s size, where the prune grows with the tokens and the
scoring does not; ``--score-seqlen`` replaces the scoring samples' 128 tokens (``prune``'s own
default is ``--seqlen``'s: 2,048 tokens for both models). Results go to
``CACHE/bench/MODEL-stage-cost.json`` (``MODEL-stage-cost-SxL[-scoreT].json`` at another size; one
entry per repeat, method and sparsity).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from ecoflap_cli.bench.models import DEFAULT_WANDA, MODELS, SIZES
from ecoflap_cli.bench.travel import config, folder
from ecoflap_cli.files import write_atomic
from ecoflap_cli.stages import driver
from ecoflap_cli.stages.sweep import SweepRunner, parse_method

REFERENCE = "uniform:sparsegpt"
#: the candidates: today's default and the search refining its plan (issue 24, item 5)
METHODS = [
    REFERENCE,
    DEFAULT_WANDA,
    "search:wanda@start=ecoflap,gens=8,offspring=4,quick=1,full=2",  # the search's defaults, spelled out
]


def time_method(runner: SweepRunner, method: str, sparsity: float) -> dict[str, float]:
    """Seconds of scoring (none for a uniform allocation), allocation and prune for one method."""
    spec = parse_method(method)
    runner.restore()
    score_s = 0.0
    if spec.score_key() is None:
        scores = driver.structure_document(runner.loaded, runner.adapter)
    else:
        batches, prov = runner.score_data()
        start = time.perf_counter()
        assert spec.scoring is not None
        settings = spec.scoring_settings_at(sparsity)
        scores = driver.score(runner.loaded, runner.adapter, batches, prov, spec.scoring, settings, seed=0)
        score_s = time.perf_counter() - start
    start = time.perf_counter()
    plan = runner.plan(spec, sparsity, scores)
    allocate_s = time.perf_counter() - start
    prune_s = runner._prune(spec, plan)
    return {"score_s": score_s, "allocate_s": allocate_s, "prune_s": prune_s, "total_s": score_s + allocate_s + prune_s}


def summary(entries: list[dict[str, Any]]) -> str:
    """Markdown: per method and sparsity, median seconds and the median per-repeat ratio."""
    head = "| sparsity | method | repeats | score s | prune s | total s | total / uniform SparseGPT, per repeat |"
    lines = [f"{head} median ratio |", "|---:|---|---:|---:|---:|---:|---|---:|"]
    order = {m: i for i, m in enumerate(METHODS)}
    keys = sorted({(e["sparsity"], e["method"]) for e in entries}, key=lambda k: (k[0], order.get(k[1], 99), k[1]))
    for sparsity, method in keys:
        mine = [e for e in entries if (e["sparsity"], e["method"]) == (sparsity, method)]
        ref = {e["repeat"]: e["total_s"] for e in entries if (e["sparsity"], e["method"]) == (sparsity, REFERENCE)}
        ratios = [e["total_s"] / ref[e["repeat"]] for e in mine if e["repeat"] in ref]
        score, prune, total = (statistics.median(e[k] for e in mine) for k in ("score_s", "prune_s", "total_s"))
        lines.append(
            f"| {sparsity:g} | {method} | {len(mine)} | {score:.1f} | {prune:.1f} | {total:.1f} | "
            f"{', '.join(f'{r:.2f}' for r in ratios)} | {statistics.median(ratios) if ratios else float('nan'):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--method", action="append", help=f"repeat (default: {', '.join(METHODS)})")
    parser.add_argument("-s", "--sparsity", type=float, action="append", help="repeat (default 0.6)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, help="pruning calibration windows (default: the benchmark size)")
    parser.add_argument("--seqlen", type=int, help="their length in tokens (default 512)")
    parser.add_argument("--score-seqlen", type=int, help="tokens per scoring sample (default 128)")
    parser.add_argument("--report", action="store_true", help="print the saved entries and stop")
    args = parser.parse_args(argv)
    resized = args.samples or args.seqlen
    size = f"-{args.samples or SIZES[args.model]['samples']}x{args.seqlen or 512}" if resized else ""
    size += f"-score{args.score_seqlen}" if args.score_seqlen else ""
    out = folder(args.model, "wiki").parent / f"{args.model}-stage-cost{size}.json"
    entries: list[dict[str, Any]] = json.loads(out.read_text()) if out.is_file() else []
    if args.report:
        print(summary(entries))
        return 0
    methods = args.method or METHODS
    if REFERENCE not in methods:
        methods = [REFERENCE, *methods]
    sparsities = args.sparsity or [0.6]

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    runner = SweepRunner(
        config(
            args.model,
            "wiki",
            methods,
            sparsities,
            log,
            samples=args.samples,
            seqlen=args.seqlen,
            score_seqlen=args.score_seqlen,
        )
    )
    runner.prune_data()
    runner.score_data()
    start = max((e["repeat"] for e in entries if e["model"] == args.model), default=-1) + 1
    for repeat in range(start, start + args.repeats):
        for sparsity in sparsities:
            for method in methods:
                seconds = time_method(runner, method, sparsity)
                entry = {"model": args.model, "repeat": repeat, "sparsity": sparsity, "method": method}
                entries.append({**entry, **seconds})
                write_atomic(out, json.dumps(entries, indent=1).encode())
                log(f"repeat {repeat} {method} at {sparsity:g}: {seconds['total_s']:.1f} s")
    print(summary(entries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
