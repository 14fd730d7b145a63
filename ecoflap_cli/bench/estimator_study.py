"""How good is a forward-only estimate of a block's gradient norm? (issue: allocation)

    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.estimator_study [--directions 16] [--out FILE]

On SmolLM2-135M and one calibration batch (8 x 128 Wikipedia tokens, seed 0), for every block:

- the exact gradient g of the loss with respect to the block's weights (backprop), its norm, and
  for each seeded direction z the exact directional derivative g . z;
- for ``--directions`` Gaussian and as many Rademacher directions, the losses L+ = L(W + eps z),
  L- = L(W - eps z) and the unperturbed L0 (shared), computed the way ``ecoflap score`` does
  (block perturbed through output hooks, earlier blocks replayed from stored activations), with
  the exact loss in every pass (``--head exact``; the linearized head agrees to 2e-3).

From these, without further passes: the finite-difference error of the central and the forward
difference against the exact g . z; the spread of single-direction estimates of ||g|| (the paper's
|d| and the root-mean-square of d, which is unbiased for ||g||^2); the rank correlation of k-direction
estimates with the exact norms for k = 1, 2, 4, ... (all disjoint subsets of the directions,
averaged); and the cost of each estimator in passes.

Antithetic pairs need no separate test: the central difference *is* the antithetic pair (z, -z),
and |d| is the same for z and -z. Common random numbers (one z for every batch) correlate the
batches' errors instead of averaging them out, so ``ecoflap score`` draws a new z per batch.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli.bench.scoring_cost import spearman
from ecoflap_cli.bench.smollm import smollm2_batches
from ecoflap_cli.core.solvers import PRECISION
from ecoflap_cli.engine.blockwise import capture_outputs
from ecoflap_cli.engine.scoring import batch_loss, block_linears, perturbed, replays, seeded_direction
from ecoflap_cli.io import artifacts

KINDS = ("gaussian", "rademacher")


def exact_gradients(adapter, batch) -> dict[str, dict[str, torch.Tensor]]:
    """Block name -> {tensor name -> dL/dW} (fp32, on the CPU) for one batch."""
    model = adapter.model
    blocks = adapter.blocks()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {b.name: block_linears(b) for b in blocks}
    for lin_map in weights.values():
        for lin in lin_map.values():
            lin.weight.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    adapter.loss(batch).backward()
    grads = {name: {t: _weight_grad(lin) for t, lin in m.items()} for name, m in weights.items()}
    for m in weights.values():
        for lin in m.values():
            lin.weight.grad = None
            lin.weight.requires_grad_(False)
    return grads


def _weight_grad(lin: torch.nn.Linear) -> torch.Tensor:
    grad = lin.weight.grad
    assert grad is not None, "every block linear takes part in the loss"
    return grad.detach().to(PRECISION).cpu().clone()


def study(adapter, batch, directions: int, eps: float) -> dict[str, Any]:
    """Exact gradients and perturbed losses of every block on one batch (the raw study, no summary)."""
    blocks = adapter.blocks()
    grads = exact_gradients(adapter, batch)
    start = time.perf_counter()
    base = batch_loss(adapter, batch)
    forward_s = time.perf_counter() - start
    rows: dict[str, Any] = {}
    previous = None
    timings = {"plus_minus_s": 0.0, "passes": 0}
    for block in blocks:
        linears = block_linears(block)
        g = grads[block.name]
        row: dict[str, Any] = {"exact_norm": math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))}
        skipped = [b.module for b in blocks[: block.index]]
        with replays([], skipped, previous) as select:
            select(0)
            for kind in KINDS:
                records = []
                for k in range(directions):
                    z = {n: seeded_direction(lin.weight.shape, (0, k, 0, n), kind) for n, lin in linears.items()}
                    exact = sum(float((g[n] * z[n]).sum()) for n in z)
                    t0 = time.perf_counter()
                    with perturbed(linears, {n: eps * v for n, v in z.items()}):
                        plus = batch_loss(adapter, batch)
                    with perturbed(linears, {n: -eps * v for n, v in z.items()}):
                        minus = batch_loss(adapter, batch)
                    timings["plus_minus_s"] += time.perf_counter() - t0
                    timings["passes"] += 2
                    records.append({"exact": exact, "plus": plus, "minus": minus})
                row[kind] = records
            previous = capture_outputs(adapter, block, [batch], before_each=select)
        rows[block.name] = row
        print(f"{block.name}: |g| {row['exact_norm']:.4f}", flush=True)
    seqlen = int(batch["input_ids"].shape[1])
    rows_in_batch = int(batch["input_ids"].shape[0])
    return {
        "setup": {
            "batch": f"{rows_in_batch} x {seqlen}",
            "directions": directions,
            "eps": eps,
            "threads": torch.get_num_threads(),
            "base_loss": base,
        },
        "forward_s": forward_s,
        "timings": timings,
        "blocks": rows,
    }


def run(out: Path, directions: int, eps: float, seqlen: int) -> dict[str, Any]:
    """The study on SmolLM2 and one calibration batch of 8 x ``seqlen`` tokens; writes ``out``."""
    torch.manual_seed(0)
    _, adapter, (batch,) = smollm2_batches("calib", 8, seqlen)
    result = study(adapter, batch, directions, eps)
    result["summary"] = summarise(result)
    artifacts.write_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _estimates(row: dict[str, Any], kind: str, eps: float, base: float) -> dict[str, list[float]]:
    recs = row[kind]
    return {
        "central": [(r["plus"] - r["minus"]) / (2 * eps) for r in recs],
        "forward": [(r["plus"] - base) / eps for r in recs],
        "exact": [r["exact"] for r in recs],
    }


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    eps, base = result["setup"]["eps"], result["setup"]["base_loss"]
    directions = result["setup"]["directions"]
    rows = result["blocks"]
    names = list(rows)
    exact_norms = [rows[n]["exact_norm"] for n in names]
    summary: dict[str, Any] = {}
    for kind in KINDS:
        per = {n: _estimates(rows[n], kind, eps, base) for n in names}
        # finite-difference error against the exact directional derivative, relative to |g|
        fd = {}
        for diff in ("central", "forward"):
            errs = [abs(a - e) / rows[n]["exact_norm"] for n in names for a, e in zip(per[n][diff], per[n]["exact"])]
            fd[diff] = {"median_rel_error": statistics.median(errs), "max_rel_error": max(errs)}
        # spread of one-direction estimates of |g| (exact directional derivatives: direction noise only)
        abs_scale = math.sqrt(2 / math.pi) if kind == "gaussian" else None
        cv_abs = statistics.median(
            statistics.pstdev([abs(d) for d in per[n]["exact"]]) / statistics.fmean([abs(d) for d in per[n]["exact"]])
            for n in names
        )
        cv_sq = statistics.median(
            statistics.pstdev([d * d for d in per[n]["exact"]]) / rows[n]["exact_norm"] ** 2 for n in names
        )
        bias_sq = statistics.median(
            statistics.fmean([d * d for d in per[n]["exact"]]) / rows[n]["exact_norm"] ** 2 for n in names
        )
        # rank correlation with the exact norms for k directions (disjoint subsets, averaged)
        ranks: dict[str, dict[str, float]] = {}
        k = 1
        while k <= directions:
            for est in ("central", "forward", "exact"):
                for stat in ("abs", "rms"):
                    values = []
                    for start in range(0, directions - k + 1, k):
                        if stat == "abs":
                            s = [statistics.fmean(abs(d) for d in per[n][est][start : start + k]) for n in names]
                        else:
                            s = [
                                math.sqrt(statistics.fmean(d * d for d in per[n][est][start : start + k]))
                                for n in names
                            ]
                        values.append(spearman(s, exact_norms))
                    ranks.setdefault(f"{est}/{stat}", {})[str(k)] = statistics.fmean(values)
            k *= 2
        summary[kind] = {
            "finite_difference": fd,
            "one_direction_cv_of_abs_d": cv_abs,
            "one_direction_cv_of_d_squared": cv_sq,
            "mean_d_squared_over_norm_squared": bias_sq,
            "abs_d_scale": abs_scale,
            "spearman_vs_exact_norm": ranks,
        }
    t = result["timings"]
    summary["cost"] = {
        "seconds_per_pass": t["plus_minus_s"] / t["passes"],
        "forward_s": result["forward_s"],
        "central_passes_per_direction_per_block": 2,
        "forward_diff_passes_per_direction_per_block": 1,
    }
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("estimator_study.json"))
    parser.add_argument("--directions", type=int, default=16)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--summary-only", action="store_true", help="recompute the summary of --out")
    args = parser.parse_args(argv)
    if args.summary_only:
        result = json.loads(args.out.read_text())
        result["summary"] = summarise(result)
        artifacts.write_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    else:
        result = run(args.out, args.directions, args.eps, args.seqlen)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
