"""Peak memory of `ecoflap prune` whole against sequential mode with disk offload (SmolLM2-135M).

    python -m ecoflap_cli.bench.offload_memory [--out offload_memory.json] [--repeats 1]

Each prune runs as its own process; its peak resident memory is the kernel's ``ru_maxrss`` for
that child (os.wait4). Both prune the same model (SmolLM2 saved once as an fp32 safetensors
checkpoint) with uniform Wanda at 0.5 on the same calibration windows; the pruned weights of the
two runs are compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..assets import cache_dir, smollm2, wikipedia_splits


def smollm2_checkpoint() -> Path:
    """SmolLM2 as a plain safetensors directory (GGUF files cannot be offloaded), made once."""
    target = cache_dir() / "SmolLM2-135M-Instruct-fp32"
    if (target / "config.json").is_file():
        return target
    from ..loading import load_model

    loaded = load_model(str(smollm2()))
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def run_child(args: list[str]) -> tuple[float, int, int]:
    """Run a command; return (wall seconds, peak RSS bytes, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if proc.stderr is not None:
        err = proc.stderr.read().decode(errors="replace")
        if os.waitstatus_to_exitcode(status) != 0:
            print(err[-2000:], file=sys.stderr)
    return elapsed, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("offload_memory.json"))
    parser.add_argument("--work", type=Path, default=Path("offload_memory_runs"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    model = smollm2_checkpoint()
    calib = wikipedia_splits()["calib"]
    args.work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "ecoflap_cli", "prune", "-m", str(model), "--sparsity", "0.5",
            "--allocator", "uniform", "--calib", str(calib), "--samples", str(args.samples),
            "--seqlen", str(args.seqlen), "--overwrite"]
    modes = {
        "whole model in memory": base + ["-o", str(args.work / "whole")],
        "sequential, blocks offloaded to disk": base + [
            "--offload", "disk", "--offload-folder", str(args.work / "offload"), "-o", str(args.work / "seq")],
    }
    results: dict[str, dict[str, list[float]]] = {name: {"peak_mib": [], "wall_s": []} for name in modes}
    for _ in range(args.repeats):
        for name, cmd in modes.items():
            shutil.rmtree(args.work / "offload", ignore_errors=True)
            wall, peak, code = run_child(cmd)
            if code != 0:
                raise SystemExit(f"{name} failed with exit code {code}")
            results[name]["peak_mib"].append(peak / 2**20)
            results[name]["wall_s"].append(wall)
            print(f"{name}: peak {peak / 2**20:.0f} MiB, {wall:.0f} s", flush=True)
    from safetensors.torch import load_file

    whole = load_file(args.work / "whole" / "model.safetensors")
    seq = load_file(args.work / "seq" / "model.safetensors")
    identical = whole.keys() == seq.keys() and all(bool((whole[k] == seq[k]).all()) for k in whole)
    summary = {"setup": {"model": str(model), "samples": args.samples, "seqlen": args.seqlen,
                         "repeats": args.repeats, "solver": "wanda", "sparsity": 0.5},
               "runs": results, "pruned_weights_bit_identical": identical,
               "weights_mib_fp32": sum(v.numel() * v.element_size() for v in whole.values()) / 2**20}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
