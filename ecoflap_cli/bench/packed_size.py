"""Size on disk and load time, dense against packed, of SmolLM2-135M pruned at 0.5 and 0.7.

    python -m ecoflap_cli.bench.packed_size [--out packed_size.json] [--repeats 3]

Prunes with magnitude (the packed size depends on the sparsity, not on which weights are kept)
through the CLI in fp16 and bf16, converts each checkpoint to packed with `ecoflap convert`, and
reports the bytes of the pruned tensors and of the whole weight files, and the median time to load
each checkpoint with the Python API's `ecoflap_cli.api.load_pruned`. ``--model``, ``--dtype`` and
``--sparsity`` replace SmolLM2 and the dtypes / sparsities measured (the smoke test runs a tiny model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ecoflap_cli.bench.smollm import smollm2_checkpoint


def _weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def prune_and_convert(model: str | Path, dtype: str, sparsity: float, dense: Path, packed: Path) -> None:
    """``ecoflap prune`` (uniform magnitude) into ``dense``, then ``ecoflap convert --to packed`` into ``packed``."""
    cli = [sys.executable, "-m", "ecoflap_cli"]
    subprocess.run(
        [
            *cli,
            "prune",
            "-m",
            str(model),
            "--sparsity",
            str(sparsity),
            "--allocator",
            "uniform",
            "--solver",
            "magnitude",
            "--dtype",
            dtype,
            "-o",
            str(dense),
            "--overwrite",
        ],
        check=True,
    )
    subprocess.run([*cli, "convert", str(dense), "-o", str(packed), "--to", "packed", "--overwrite"], check=True)


def measure(dense: Path, packed: Path, dtype: str, sparsity: float, repeats: int) -> dict[str, Any]:
    """Sizes on disk and median load times (``ecoflap_cli.api.load_pruned``) of one dense / packed pair."""
    from ecoflap_cli.api import load_pruned

    times: dict[str, list[float]] = {"dense": [], "packed": []}
    for _ in range(repeats):
        for name, path in (("dense", dense), ("packed", packed)):
            start = time.perf_counter()
            load_pruned(path)
            times[name].append(time.perf_counter() - start)
    plan = json.loads((dense / "plan.json").read_text())
    pruned_params = sum(g["params"] for g in plan["groups"])
    itemsize = 2
    dense_bytes, packed_bytes = _weights_bytes(dense), _weights_bytes(packed)
    pruned_dense = pruned_params * itemsize
    row = {
        "dtype": dtype,
        "sparsity": sparsity,
        "dense_file_bytes": dense_bytes,
        "packed_file_bytes": packed_bytes,
        "pruned_tensors_dense_bytes": pruned_dense,
        "pruned_tensors_packed_bytes": packed_bytes - (dense_bytes - pruned_dense),
        "load_s_median": {k: statistics.median(v) for k, v in times.items()},
        "repeats": repeats,
    }
    row["pruned_tensors_ratio"] = row["pruned_tensors_packed_bytes"] / pruned_dense
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("packed_size.json"))
    parser.add_argument("--work", type=Path, default=Path("packed_size_runs"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="Safetensors model directory (default: SmolLM2, saved once as fp32).")
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"], choices=("float16", "bfloat16"))
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    args = parser.parse_args(argv)
    model = args.model or smollm2_checkpoint()
    rows = []
    for dtype in args.dtype:
        for sparsity in args.sparsity:
            dense = args.work / f"dense-{dtype}-{sparsity}"
            packed = args.work / f"packed-{dtype}-{sparsity}"
            prune_and_convert(model, dtype, sparsity, dense, packed)
            row = measure(dense, packed, dtype, sparsity, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
