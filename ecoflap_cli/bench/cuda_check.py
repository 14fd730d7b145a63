"""Device check: the same pipeline on CPU and on CUDA, outputs compared (prepared for a GPU machine).

    python -m ecoflap_cli.bench.cuda_check --out cuda_check.json

Builds a tiny LLaMA from a config (no hub needed), then on CPU and on CUDA: zeroth-order scores
(whole model, and sequential mode with blocks offloaded to CPU), the ECoFLaP plan, and Wanda and
SparseGPT prunes to the CPU's plan. It checks that scores agree to float tolerance, the two plans
agree to within a few weights per block, each CUDA prune meets the plan exactly, Wanda masks agree
with the CPU's on at least 99.9% of weights, and perplexities agree within 1%. Runs in well under
five minutes on one GPU. Exit code 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli.data.text import sample_windows, to_batches, tokenize_documents
from ecoflap_cli.engine.pruning import PruneSettings, prune_model
from ecoflap_cli.engine.scoring import ZerothOrderSettings, zeroth_order_scores
from ecoflap_cli.evaluation.measure import perplexity, windows_for_eval
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.loading import LoadOptions, load_model
from ecoflap_cli.models import get_adapter
from ecoflap_cli.stages.driver import allocate, model_info
from ecoflap_cli.testing import make_text, save_tiny_model


def _run(model_dir: Path, device: str, offload: str | None, plan: dict[str, Any] | None) -> dict[str, Any]:
    loaded = load_model(str(model_dir), LoadOptions(device=device, offload=offload))
    adapter = get_adapter(loaded.model)
    tokens = tokenize_documents(loaded.tokenizer, [make_text(2000, seed=5)])
    batches = to_batches(sample_windows(tokens, 16, 64, seed=0), 8)
    dev = torch.device(device)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    start = time.perf_counter()
    scores = zeroth_order_scores(adapter, batches, ZerothOrderSettings(seed=0))
    out: dict[str, Any] = {"score_s": time.perf_counter() - start, "scores": scores}
    doc = artifacts.scores_document(model_info(loaded, adapter), adapter.blocks(), scores, {"name": "zeroth"}, None)
    out["plan"] = allocate(doc, 0.6, "ecoflap")
    target = plan or out["plan"]
    eval_windows = windows_for_eval(tokenize_documents(loaded.tokenizer, [make_text(400, seed=9)]), 64, 16)
    for solver in ("wanda", "sparsegpt"):
        loaded = load_model(str(model_dir), LoadOptions(device=device, offload=offload))  # fresh dense weights
        adapter = get_adapter(loaded.model)
        start = time.perf_counter()
        results = prune_model(
            adapter,
            artifacts.prune_counts(target),
            batches,
            PruneSettings(solver, store_device="cpu" if offload else None),
        )
        out[f"{solver}_s"] = time.perf_counter() - start
        out[f"{solver}_exact"] = all(r.zeros == r.planned_zeros for r in results)
        out[f"{solver}_masks"] = {
            f"{path}.weight": (w.detach() == 0).cpu()
            for b in adapter.blocks()
            for path, lin in b.linears.items()
            for w in [_materialised(lin)]
        }
        out[f"{solver}_ppl"] = perplexity(loaded.model, eval_windows.to(dev), batch_size=8)
    return out


def _materialised(linear: torch.nn.Module) -> torch.Tensor:
    from ecoflap_cli.engine.offload import editable_weight

    with editable_weight(linear) as weight:  # type: ignore[arg-type]
        return weight.detach().clone()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("cuda_check.json"))
    parser.add_argument("--device", default="cuda", help="cpu runs the same comparison without a GPU (a dry run)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU machine (or --device cpu for a dry run)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(Path(tmp) / "model", "llama")
        cpu = _run(model_dir, "cpu", None, None)
        runs = {
            args.device: _run(model_dir, args.device, None, cpu["plan"]),
            f"{args.device}-sequential": _run(model_dir, args.device, "cpu", cpu["plan"]),
        }
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    report: dict[str, Any] = {"device": name, "checks": {}}
    for name, run in runs.items():
        rel = max(abs(run["scores"][k] - cpu["scores"][k]) / max(cpu["scores"][k], 1e-12) for k in cpu["scores"])
        plan_gap = max(abs(a["zeros"] - b["zeros"]) for a, b in zip(run["plan"]["groups"], cpu["plan"]["groups"]))
        agree = min(float((run["wanda_masks"][n] == cpu["wanda_masks"][n]).float().mean()) for n in cpu["wanda_masks"])
        checks = {
            "scores_rel_diff": rel,
            "scores_ok": rel < 1e-3,
            "plan_max_zero_gap": plan_gap,
            "plan_ok": plan_gap <= 16,
            "wanda_exact": run["wanda_exact"],
            "sparsegpt_exact": run["sparsegpt_exact"],
            "wanda_mask_agreement": agree,
            "wanda_masks_ok": agree >= 0.999,
            "ppl": {s: (cpu[f"{s}_ppl"], run[f"{s}_ppl"]) for s in ("wanda", "sparsegpt")},
            "ppl_ok": all(abs(run[f"{s}_ppl"] / cpu[f"{s}_ppl"] - 1) < 0.01 for s in ("wanda", "sparsegpt")),
            "times_s": {k: run[k] for k in ("score_s", "wanda_s", "sparsegpt_s")},
        }
        report["checks"][name] = checks
    report["cpu_times_s"] = {k: cpu[k] for k in ("score_s", "wanda_s", "sparsegpt_s")}
    passed = all(c[k] for c in report["checks"].values() for k in c if k.endswith(("_ok", "_exact")))
    report["passed"] = passed
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
