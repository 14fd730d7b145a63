"""Benchmark of the coarse stage's cost and quality on SmolLM2-135M (issue: fast scoring).

    python -m ecoflap_cli.bench.scoring_cost [--out results.json] [--repeats 3]

Measured side by side in one process, modes interleaved per repeat:
- time of each scoring mode, in seconds and in units of one plain no-grad forward pass over the
  same calibration samples (median over repeats);
- peak memory above the loaded model while the mode runs (RSS sampled every 5 ms);
- rank correlation of block scores with the exact per-block gradient norm, and across seeds;
- perplexity on the validation split after ECoFLaP + Wanda at 0.6 with each mode's scores.

The reference mode (one tensor at a time, full forward for L+ and L-) is timed on a subset of
blocks and extrapolated linearly in the number of tensors (its cost per tensor does not depend on
depth, since every pass is a full forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli.bench.smollm import smollm2_batches
from ecoflap_cli.data.assets import wikipedia_splits
from ecoflap_cli.data.text import read_text, to_batches, tokenize_documents
from ecoflap_cli.engine.pruning import PruneSettings, prune_model
from ecoflap_cli.engine.scoring import ZerothOrderSettings, first_order_scores, zeroth_order_scores
from ecoflap_cli.evaluation.measure import perplexity, windows_for_eval
from ecoflap_cli.io import artifacts
from ecoflap_cli.models.base import Adapter
from ecoflap_cli.stages.driver import allocate, model_info


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def measure(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``fn``; return its result, wall seconds, and peak RSS above the RSS before it."""
    start_rss = rss_bytes()
    peak = [start_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        thread.join()
    return result, elapsed, max(peak[0], rss_bytes()) - start_rss


class SubsetAdapter(Adapter):
    """An adapter restricted to some blocks (only valid without activation replay)."""

    def __init__(self, inner: Adapter, names: set[str]) -> None:
        super().__init__(inner.model)
        self.inner, self.names = inner, names
        self.family = inner.family

    def tower_paths(self) -> dict[str, str]:
        return self.inner.tower_paths()

    def blocks(self, tower: str | None = None):  # type: ignore[override]
        return [b for b in self.inner.blocks(tower) if b.name in self.names]

    def loss(self, batch):  # type: ignore[override]
        return self.inner.loss(batch)


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def plain_forward(adapter: Adapter, batches: list) -> None:
    with torch.no_grad():
        for batch in batches:
            adapter.loss(batch)


MODES: dict[str, Callable[[Adapter, list, int], dict[str, float]]] = {
    "zeroth block+reuse central (default)": lambda a, b, s: zeroth_order_scores(a, b, ZerothOrderSettings(seed=s)),
    "zeroth block+reuse forward-diff": lambda a, b, s: zeroth_order_scores(
        a, b, ZerothOrderSettings(seed=s, difference="forward")
    ),
    "first-order taylor, checkpointed": lambda a, b, s: first_order_scores(a, b, "taylor", True),
    "first-order gradnorm, checkpointed": lambda a, b, s: first_order_scores(a, b, "gradnorm", True),
    "first-order taylor, plain backprop": lambda a, b, s: first_order_scores(a, b, "taylor", False),
}


def run(out: Path, repeats: int, samples: int, seqlen: int, ref_blocks: int, zeroth_repeats: int = 1) -> dict[str, Any]:
    torch.manual_seed(0)
    _, adapter, batches = smollm2_batches("calib", samples, seqlen)
    results: dict[str, Any] = {
        "setup": {
            "samples": samples,
            "seqlen": seqlen,
            "batch_size": 8,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "blocks": len(adapter.blocks()),
        }
    }
    timings: dict[str, list[float]] = {"plain forward": []}
    memory: dict[str, list[int]] = {"plain forward": []}
    scores: dict[str, dict[str, float]] = {}
    first = 0
    if out.is_file():  # resume: keep the runs already measured
        done = json.loads(out.read_text())
        timings = {k: list(done.get("time_lists", {}).get(k, [v])) for k, v in done["time_s"].items()}
        memory = {k: [v * 2**20] for k, v in done["peak_mib_above_model"].items()}
        scores = done["scores"]
        first = min(len(v) for k, v in timings.items() if not k.startswith(("zeroth", "reference")))
    for r in range(first, repeats):
        _, t, m = measure(lambda: plain_forward(adapter, batches))
        timings["plain forward"].append(t)
        memory["plain forward"].append(m)
        for name, fn in MODES.items():
            if r >= zeroth_repeats and name.startswith("zeroth"):
                continue  # the expensive modes run fewer times; cheap ones give the unit's median
            result, t, m = measure(partial(fn, adapter, batches, 0))
            timings.setdefault(name, []).append(t)
            memory.setdefault(name, []).append(m)
            scores[name] = result
            print(f"repeat {r}: {name}: {t:.1f}s, +{m / 2**20:.0f} MiB", flush=True)
            _save(out, results, timings, memory, scores)
    # reference mode: per tensor, full forward each time, on a subset, extrapolated
    names = [b.name for b in adapter.blocks()]
    subset = set(names[:: max(1, len(names) // ref_blocks)][:ref_blocks])
    sub = SubsetAdapter(adapter, subset)
    tensors_sub = sum(len(b.linears) for b in sub.blocks())
    tensors_all = sum(len(b.linears) for b in adapter.blocks())
    ref_times = []
    for _ in range(zeroth_repeats):
        _, t, m = measure(
            lambda: zeroth_order_scores(
                sub, batches, ZerothOrderSettings(granularity="tensor", reuse_activations=False, head="exact")
            )
        )
        ref_times.append(t * tensors_all / tensors_sub)
        memory.setdefault("reference (per tensor, no reuse)", []).append(m)
    timings["reference (per tensor, no reuse), extrapolated"] = ref_times
    block_times = []
    for _ in range(zeroth_repeats):
        _, t, m = measure(lambda: zeroth_order_scores(sub, batches, ZerothOrderSettings(reuse_activations=False)))
        block_times.append(t * len(names) / len(subset))
        memory.setdefault("zeroth block, no reuse", []).append(m)
    timings["zeroth block, no reuse, extrapolated"] = block_times
    results["reference_subset"] = {"blocks": sorted(subset), "tensors": tensors_sub, "of": tensors_all}
    # another seed: how stable is the ranking of a four-batch estimate?
    if "zeroth block+reuse central seed 1" not in scores:
        scores["zeroth block+reuse central seed 1"] = zeroth_order_scores(adapter, batches, ZerothOrderSettings(seed=1))
    _save(out, results, timings, memory, scores)
    return json.loads(out.read_text())


def side_by_side(
    out: Path, repeats: int, samples: int, seqlen: int, ref_blocks: int, corr_samples: int | None = None
) -> dict[str, Any]:
    """Reference vs default zeroth-order, interleaved in one process, repeated; plus score agreement.

    Each repeat times, back to back: one plain no-grad forward over the samples (the unit), the
    default mode over every block, and the reference mode over ``ref_blocks`` evenly spread blocks
    (extrapolated linearly in the number of tensors: every reference pass is a full forward, so its
    cost per tensor does not depend on depth). The ratio is taken within each repeat, so machine
    load that drifts between repeats hits both sides of a ratio alike; the medians are reported.

    Then the reference mode's *scores* for every block, computed with the earlier blocks replayed
    (the estimates equal the full-forward ones to floating-point tolerance, a tested property; only
    the cost differs), are compared by rank correlation with the default's scores for three seeds,
    with each other, and with the exact per-block gradient norm on the same batches.
    """
    torch.manual_seed(0)
    _, adapter, batches = smollm2_batches("calib", samples, seqlen)
    names = [b.name for b in adapter.blocks()]
    subset = set(names[:: max(1, len(names) // ref_blocks)][:ref_blocks])
    sub = SubsetAdapter(adapter, subset)
    tensors_sub = sum(len(b.linears) for b in sub.blocks())
    tensors_all = sum(len(b.linears) for b in adapter.blocks())
    res: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    res["setup"] = {
        "samples": samples,
        "seqlen": seqlen,
        "batch_size": 8,
        "threads": torch.get_num_threads(),
        "reference_blocks": sorted(subset),
        "reference_tensors": tensors_sub,
        "tensors": tensors_all,
    }
    runs: list[dict[str, float]] = res.setdefault("repeats", [])
    for r in range(len(runs), repeats):
        _, unit, _ = measure(lambda: plain_forward(adapter, batches))
        default, t_default, _ = measure(lambda: zeroth_order_scores(adapter, batches, ZerothOrderSettings(seed=0)))
        _, t_ref, _ = measure(
            lambda: zeroth_order_scores(
                sub, batches, ZerothOrderSettings(granularity="tensor", reuse_activations=False, head="exact")
            )
        )
        t_ref_all = t_ref * tensors_all / tensors_sub
        runs.append(
            {
                "plain_forward_s": unit,
                "default_s": t_default,
                "reference_extrapolated_s": t_ref_all,
                "ratio": t_ref_all / t_default,
            }
        )
        res.setdefault("scores", {})["default seed 0"] = default
        print(
            f"repeat {r}: forward {unit:.2f}s, default {t_default:.1f}s, reference (extrapolated) "
            f"{t_ref_all:.1f}s, ratio {t_ref_all / t_default:.2f}",
            flush=True,
        )
        _summarise(res)
        artifacts.write_atomic(out, (json.dumps(res, indent=2) + "\n").encode())
    scores = res.setdefault("scores", {})
    if corr_samples and corr_samples != samples:
        # the agreement study on fewer samples (the reference's scores for every block are costly)
        batches = batches[: max(1, corr_samples // 8)]
        scores = res.setdefault(f"scores_{corr_samples}_samples", {})
    jobs = {
        "default seed 0": lambda: zeroth_order_scores(adapter, batches, ZerothOrderSettings(seed=0)),
        "default seed 1": lambda: zeroth_order_scores(adapter, batches, ZerothOrderSettings(seed=1)),
        "exact gradient norm": lambda: first_order_scores(adapter, batches, "gradnorm", True),
        "reference seed 0": lambda: zeroth_order_scores(
            adapter, batches, ZerothOrderSettings(granularity="tensor", head="exact")
        ),
        "reference seed 1": lambda: zeroth_order_scores(
            adapter, batches, ZerothOrderSettings(granularity="tensor", head="exact", seed=1)
        ),
    }
    for key, job in jobs.items():
        if key not in scores:
            scores[key], seconds, _ = measure(job)
            print(f"{key}: {seconds:.1f}s", flush=True)
            _summarise(res)
            artifacts.write_atomic(out, (json.dumps(res, indent=2) + "\n").encode())
    return res


def batch_sizes(out: Path, repeats: int, samples: int, seqlen: int, sizes: list[int]) -> dict[str, Any]:
    """Default zeroth-order time on the same samples in batches of each size, interleaved.

    A larger batch means fewer, larger passes (better matmul efficiency) but also fewer directions
    per block (one per batch), so it buys speed with variance; this measures the speed side.
    """
    _, adapter, batches = smollm2_batches("calib", samples, seqlen)
    windows = torch.cat([b["input_ids"] for b in batches])
    runs: dict[str, list[float]] = {}
    for r in range(repeats):
        for size in sizes:
            batches = to_batches(windows, size)
            _, t, _ = measure(partial(zeroth_order_scores, adapter, batches, ZerothOrderSettings(seed=0)))
            runs.setdefault(str(size), []).append(t)
            print(f"repeat {r}: batch {size}: {t:.1f}s", flush=True)
    base = str(sizes[0])
    res = {
        "setup": {"samples": samples, "seqlen": seqlen, "threads": torch.get_num_threads()},
        "seconds": runs,
        "median_s": {k: statistics.median(v) for k, v in runs.items()},
        "ratio_to_first_size": {k: statistics.median(a / b for a, b in zip(v, runs[base])) for k, v in runs.items()},
    }
    artifacts.write_atomic(out, (json.dumps(res, indent=2) + "\n").encode())
    return res


def _summarise(res: dict[str, Any]) -> None:
    runs = res.get("repeats", [])
    if runs:
        unit = statistics.median(r["plain_forward_s"] for r in runs)
        res["median"] = {
            "plain_forward_s": unit,
            "default_s": statistics.median(r["default_s"] for r in runs),
            "reference_extrapolated_s": statistics.median(r["reference_extrapolated_s"] for r in runs),
            "ratio_reference_over_default": statistics.median(r["ratio"] for r in runs),
            "default_in_forwards": statistics.median(r["default_s"] / r["plain_forward_s"] for r in runs),
            "reference_in_forwards": statistics.median(
                r["reference_extrapolated_s"] / r["plain_forward_s"] for r in runs
            ),
        }
    for field in [k for k in res if k.startswith("scores")]:
        scores = res[field]
        keys = sorted(scores)
        if len(keys) > 1:
            names = list(scores[keys[0]])
            res["spearman" + field[len("scores") :]] = {
                f"{a} ~ {b}": spearman([scores[a][n] for n in names], [scores[b][n] for n in names])
                for i, a in enumerate(keys)
                for b in keys[i + 1 :]
            }


def _save(out: Path, results: dict, timings: dict, memory: dict, scores: dict) -> None:
    unit = statistics.median(timings["plain forward"])
    results["time_s"] = {k: statistics.median(v) for k, v in timings.items()}
    results["time_runs"] = {k: len(v) for k, v in timings.items()}
    results["time_lists"] = timings
    results["time_in_forwards"] = {k: statistics.median(v) / unit for k, v in timings.items()}
    results["peak_mib_above_model"] = {k: statistics.median(v) / 2**20 for k, v in memory.items()}
    results["scores"] = scores
    exact = scores.get("first-order gradnorm, checkpointed")
    if exact:
        names = list(exact)
        results["spearman_vs_exact_gradnorm"] = {
            k: spearman([exact[n] for n in names], [v[n] for n in names]) for k, v in scores.items()
        }
    artifacts.write_atomic(out, (json.dumps(results, indent=2) + "\n").encode())


def quality(out: Path, modes: list[str], sparsity: float, calib_samples: int, eval_windows: int) -> None:
    """Perplexity on the validation split after ECoFLaP + Wanda with each mode's scores."""
    results = json.loads(out.read_text())
    splits = wikipedia_splits()
    loaded, adapter, batches = smollm2_batches("calib", calib_samples, 512, seed=1)
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    valid = windows_for_eval(tokenize_documents(loaded.tokenizer, read_text(splits["valid"])), 512, eval_windows)
    info = model_info(loaded, adapter)
    ppl = results.setdefault("valid_ppl_ecoflap_wanda", {})
    for mode in ["uniform", *modes]:
        if mode in ppl:
            continue
        scores = None if mode == "uniform" else results["scores"][mode]
        doc = artifacts.scores_document(info, adapter.blocks(), scores, {"name": mode}, None)
        plan = allocate(doc, sparsity, "uniform" if mode == "uniform" else "ecoflap")
        loaded.model.load_state_dict(dense)
        prune_model(adapter, artifacts.prune_counts(plan), batches, PruneSettings("wanda"))
        ppl[mode] = perplexity(loaded.model, valid, batch_size=4)
        print(f"{mode}: valid ppl {ppl[mode]:.2f}", flush=True)
        results["valid_setup"] = {
            "sparsity": sparsity,
            "calib": f"{calib_samples} x 512",
            "valid_windows": f"{int(valid.shape[0])} x 512",
        }
        artifacts.write_atomic(out, (json.dumps(results, indent=2) + "\n").encode())


def memory_child(mode: str, seqlen: int) -> None:
    """In a fresh process: load, run one mode on one batch of 8 x seqlen, print peak RSS growth."""
    _, adapter, batches = smollm2_batches("valid", 8, seqlen)
    fns: dict[str, Callable[[], Any]] = {
        "plain forward": lambda: plain_forward(adapter, batches),
        **{k: partial(fn, adapter, batches, 0) for k, fn in MODES.items()},
    }
    fns["reference (per tensor, no reuse)"] = lambda: zeroth_order_scores(
        SubsetAdapter(adapter, {adapter.blocks()[0].name}),
        batches,
        ZerothOrderSettings(granularity="tensor", reuse_activations=False, head="exact"),
    )
    _, _, peak = measure(fns[mode])
    print(json.dumps({"mode": mode, "peak_bytes": peak}))


def memory(out: Path, seqlen: int) -> None:
    """Peak RSS growth of each mode, each in its own process (RSS never shrinks inside one)."""
    import subprocess
    import sys

    results = json.loads(out.read_text())
    peaks = results.setdefault("peak_mib_isolated", {})
    for mode in ["plain forward", *MODES, "reference (per tensor, no reuse)"]:
        proc = subprocess.run(
            [sys.executable, "-m", "ecoflap_cli.bench.scoring_cost", "--memory-child", mode, "--seqlen", str(seqlen)],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
        print(f"memory {mode}: +{peaks[mode]:.1f} MiB", flush=True)
    base = peaks["plain forward"]
    results["peak_vs_plain_forward"] = {k: v / base for k, v in peaks.items()}
    results["memory_setup"] = f"one batch of 8 x {seqlen} tokens, each mode in a fresh process"
    artifacts.write_atomic(out, (json.dumps(results, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("scoring_cost.json"))
    parser.add_argument("--repeats", type=int, default=3, help="runs of the plain forward and first-order modes")
    parser.add_argument("--zeroth-repeats", type=int, default=1, help="runs of each zeroth-order mode")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--ref-blocks", type=int, default=2)
    parser.add_argument("--skip-cost", action="store_true", help="reuse the cost results in --out")
    parser.add_argument("--quality-windows", type=int, default=20)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="only the interleaved reference-vs-default timing and score agreement",
    )
    parser.add_argument(
        "--corr-samples",
        type=int,
        default=None,
        help="samples for the score-agreement part of --side-by-side (default: --samples)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="only time the default mode on the same samples in batches of these sizes",
    )
    args = parser.parse_args(argv)
    if args.batch_sizes:
        batch_sizes(args.out, args.repeats, args.samples, args.seqlen, args.batch_sizes)
        return
    if args.side_by_side:
        side_by_side(args.out, args.repeats, args.samples, args.seqlen, args.ref_blocks, args.corr_samples)
        return
    if args.memory_child:
        memory_child(args.memory_child, args.seqlen)
        return
    if not args.skip_cost:
        run(args.out, args.repeats, args.samples, args.seqlen, args.ref_blocks, args.zeroth_repeats)
    memory(args.out, args.seqlen)
    if args.skip_quality:
        return
    quality(
        args.out,
        [
            "zeroth block+reuse central (default)",
            "first-order gradnorm, checkpointed",
            "first-order taylor, checkpointed",
            "zeroth block+reuse forward-diff",
        ],
        0.6,
        16,
        args.quality_windows,
    )


if __name__ == "__main__":
    main()
