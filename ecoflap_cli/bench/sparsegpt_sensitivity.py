"""Why SparseGPT's result on Qwen2.5-Coder moves with round-off (issue 24), in two steps:

    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.sparsegpt_sensitivity capture --model qwen --sparsity 0.6 --out DIR
    OMP_NUM_THREADS=1 python -m ecoflap_cli.bench.sparsegpt_sensitivity analyse DIR [--llmc-python PY]

``capture`` prunes the model with ecoflap's uniform SparseGPT on the benchmark's calibration
windows (``bench.models.SIZES``: 8 x 512 tokens for Qwen, seed 0; ``--samples N --seqlen T`` for
another size) and saves, for every linear
of the last block, its dense weight, its Hessian (as the sequential pass accumulated it) and its
planned count to ``DIR/<linear>.pt``. ``analyse`` reads them and prints, per linear: the damped
Hessian's condition number, the update's size (||W' - W|| / ||W||), how far the updated weights
move when the inverse-Hessian factor is computed in float32 instead of float64, and how far they
move (factor in float64) when the Hessian is perturbed by a relative 1e-7 (the size of float32
summation-order differences); with ``--llmc-python`` also the relative calibration error of
llm-compressor's own ``sparsify_weight`` on the same tensors beside ecoflap's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

_LLMC = """
import json, sys, torch
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
d = torch.load(sys.argv[1]); W, H = d["W"], d["H"]
lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False); lin.weight.data = W.clone()
_, new = sparsify_weight(lin, {lin: H.clone()}, float(sys.argv[2]), 0, 0, 128, 0.01, False)
torch.save(new, sys.argv[3])
"""


def relative_error(dense: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T), in float64: the calibration error of an update."""
    d, h, w = (dense - new).double(), hessian.double(), dense.double()
    return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w, h, w))


def capture(model_name: str, sparsity: float, out: Path, samples: int | None = None, seqlen: int = 512) -> None:
    from ecoflap_cli.bench.models import MODELS, SIZES
    from ecoflap_cli.core import solvers
    from ecoflap_cli.data import assets
    from ecoflap_cli.data.text import calibration_windows, to_batches
    from ecoflap_cli.engine.pruning import PruneSettings, prune_model
    from ecoflap_cli.io.loading import load_model
    from ecoflap_cli.models import get_adapter

    loaded = load_model(str(MODELS[model_name][1]()))
    adapter = get_adapter(loaded.model.float().eval())
    calib = str(assets.wikipedia_splits()["calib"])
    windows, _ = calibration_windows(loaded.tokenizer, calib, samples or SIZES[model_name]["samples"], seqlen, 0)
    blocks = [b for t in adapter.towers() for b in adapter.blocks(t)]
    names = [p for b in blocks for p in b.linears]
    last = set(blocks[-1].linears)
    counts = {f"{p}.weight": round(b.linears[p].weight.numel() * sparsity) for b in blocks for p in b.linears}
    queue = list(names)
    original = solvers.sparsegpt_prune
    out.mkdir(parents=True, exist_ok=True)

    def keep(weight, hessian, prune_count, **kwargs):  # type: ignore[no-untyped-def]
        name = queue.pop(0)
        if name in last:
            torch.save({"W": weight.detach().float().clone(), "H": hessian.clone(), "count": prune_count,
                        "sparsity": sparsity}, out / f"{name}.pt")  # fmt: skip
        original(weight, hessian, prune_count, **kwargs)

    solvers.sparsegpt_prune = keep
    try:
        prune_model(adapter, counts, to_batches(windows, 8), PruneSettings(solver="sparsegpt"))
    finally:
        solvers.sparsegpt_prune = original


def analyse(directory: Path, llmc_python: str | None) -> list[dict]:
    from ecoflap_cli.core import solvers

    rows = []
    for file in sorted(directory.glob("*.pt")):
        d = torch.load(file)
        weight, hessian, count = d["W"], d["H"], d["count"]
        eig = torch.linalg.eigvalsh(hessian.double())
        damp = 0.01 * hessian.diag().double().mean()
        ours, _ = solvers.sparsegpt(weight, hessian, count)
        original = solvers.FACTOR_PRECISION
        try:
            solvers.FACTOR_PRECISION = torch.float32
            factor32, _ = solvers.sparsegpt(weight, hessian, count)
        finally:
            solvers.FACTOR_PRECISION = original
        noise = torch.randn(hessian.shape, generator=torch.Generator().manual_seed(0))
        perturbed = hessian + hessian.abs() * (noise + noise.t()) / 2 * 1e-7
        moved, _ = solvers.sparsegpt(weight, perturbed, count)
        row = {
            "linear": file.stem,
            "cond": float((eig[-1] + damp) / (eig[0] + damp)),
            "update": float((ours - weight).norm() / weight.norm()),
            "float32_factor_moves": float((factor32 - ours).norm() / ours.norm()),
            "hessian_1e-7_moves": float((moved - ours).norm() / ours.norm()),
            "error_ecoflap": relative_error(weight, ours, hessian),
        }
        if llmc_python:
            target = file.with_suffix(".llmc")
            subprocess.run([llmc_python, "-c", _LLMC, str(file), str(d["sparsity"]), str(target)], check=True)
            row["error_llmc"] = relative_error(weight, torch.load(target), hessian)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    cap = sub.add_parser("capture")
    cap.add_argument("--model", default="qwen")
    cap.add_argument("--sparsity", type=float, default=0.6)
    cap.add_argument("--out", type=Path, required=True)
    cap.add_argument("--samples", type=int, default=None, help="calibration windows (default: bench.models.SIZES)")
    cap.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    ana = sub.add_parser("analyse")
    ana.add_argument("directory", type=Path)
    ana.add_argument("--llmc-python", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.step == "capture":
        capture(args.model, args.sparsity, args.out, args.samples, args.seqlen)
    else:
        analyse(args.directory, args.llmc_python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
