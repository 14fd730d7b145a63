"""Calibration sources side by side (issue 24): Wikipedia vs self-generated vs a mix.

    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.calib_sources [--model smollm2|qwen] \
        [--sparsity 0.6] [--solver wanda] [--calib SPEC ...]

One model load; for each ``--calib`` spec (default: the Wikipedia calib split, ``self`` and
``WIKI:0.5,self:0.5``) the dense weights are restored, the model is pruned uniformly with the
solver at the sparsity from that calibration (the model's benchmark sizes, ``bench.models.SIZES``,
512-token windows, seed 0), and perplexity is measured on the Wikipedia *validation* split, on
Shakespeare and on the code text's validation split (the models' benchmark windows). Prints one
markdown table; the calibration provenance (recipe included) and the timings go to a JSON file
beside the bench cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    from ecoflap_cli.bench.models import MODELS, SIZES, text_path
    from ecoflap_cli.data import assets
    from ecoflap_cli.data.text import calibration_windows, read_text, to_batches, tokenize_documents
    from ecoflap_cli.engine.pruning import PruneSettings, prune_model
    from ecoflap_cli.evaluation.measure import perplexity, windows_for_eval
    from ecoflap_cli.io.loading import load_model
    from ecoflap_cli.models import get_adapter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--solver", default="wanda")
    parser.add_argument("--calib", action="append", help="a --calib spec (repeat); WIKI stands for the calib split")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wiki = str(assets.wikipedia_splits()["calib"])
    specs = [s.replace("WIKI", wiki) for s in (args.calib or ["WIKI", "self", "WIKI:0.5,self:0.5"])]
    size = SIZES[args.model]

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    loaded = load_model(str(MODELS[args.model][1]()))
    model = loaded.model.float().eval()
    adapter = get_adapter(model)
    evals = {
        name: windows_for_eval(
            tokenize_documents(loaded.tokenizer, read_text(text_path(name))), 512, size["valid_windows"]
        )
        for name in ("valid", "shakespeare", "code_valid")
    }
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    counts = {
        f"{path}.weight": round(linear.weight.numel() * args.sparsity)
        for tower in adapter.towers()
        for block in adapter.blocks(tower)
        for path, linear in block.linears.items()
    }
    #: (calibration, provenance, perplexity per text, seconds); the dense row has neither
    rows: list[tuple[str, dict[str, Any] | None, dict[str, float], dict[str, float] | None]] = [
        ("dense", None, {k: perplexity(model, w) for k, w in evals.items()}, None)
    ]
    log(f"dense: {rows[0][2]}")
    for spec in specs:
        model.load_state_dict(dense)
        start = time.perf_counter()
        windows, prov = calibration_windows(loaded.tokenizer, spec, size["samples"], 512, 0, model=model)
        calib_s = time.perf_counter() - start
        start = time.perf_counter()
        prune_model(adapter, counts, to_batches(windows, 8), PruneSettings(solver=args.solver))
        prune_s = time.perf_counter() - start
        ppl = {k: perplexity(model, w) for k, w in evals.items()}
        rows.append((spec.replace(wiki, "wiki"), prov.to_dict(), ppl, {"calib_s": calib_s, "prune_s": prune_s}))
        log(f"{spec}: {ppl} (calibration {calib_s:.0f} s, prune {prune_s:.0f} s)")
    out = assets.cache_dir() / "bench" / f"calib-sources-{args.model}-{args.solver}-{args.sparsity:g}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([dict(zip(("calib", "provenance", "ppl", "times"), r)) for r in rows], indent=2))
    print(
        f"| calibration ({MODELS[args.model][0]}, uniform {args.solver} {args.sparsity:g}) | Wikipedia valid | "
        "Shakespeare | code (valid) | calibration s | prune s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, _prov, ppl, times in rows:
        t = times or {}
        cells = [f"{ppl['valid']:.2f}", f"{ppl['shakespeare']:.2f}", f"{ppl['code_valid']:.2f}"]
        cells += [f"{t['calib_s']:.0f}" if t else "-", f"{t['prune_s']:.0f}" if t else "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    log(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
