"""Peak memory of `ecoflap prune` whole against sequential mode with disk offload (SmolLM2-135M).

    python -m ecoflap_cli.bench.offload_memory [--out offload_memory.json] [--repeats 1]

Each prune runs the ``ecoflap`` command line as its own process (``python -m ecoflap_cli prune
...``), whose anonymous memory (tensors the process owns) and file-backed pages (memory-mapped
checkpoint files, which the kernel may drop) this process samples from ``/proc/PID/status`` every
10 ms; the child's own high-water mark (``VmHWM``) is kept too. Both prune the same model (SmolLM2
saved once as an fp32 safetensors checkpoint) with uniform Wanda at 0.5 on the same calibration
windows; the pruned weights of the two runs are compared bit for bit. ``--model`` / ``--calib``
replace SmolLM2 and the Wikipedia calib split (the smoke test runs a tiny model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from ecoflap_cli.bench.smollm import smollm2_checkpoint

FIELDS = ("RssAnon", "RssFile", "VmHWM")


def status_kib(pid: int | str, fields: tuple[str, ...] = FIELDS) -> dict[str, int]:
    """Fields of ``/proc/PID/status`` in KiB (missing fields and a finished process: nothing)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in fields:
                    out[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def run_child(args: list[str], interval: float = 0.01) -> tuple[float, dict[str, int], int, str]:
    """Run ``ecoflap ARGS`` in a child process while sampling its memory.

    Returns (wall seconds, peaks in KiB: ``anon_kib``, ``file_kib``, ``total_kib`` (largest sampled
    anon + file) and ``hwm_kib`` (the child's last seen ``VmHWM``), exit code, stderr tail).
    """
    peaks = {"anon_kib": 0, "file_kib": 0, "total_kib": 0, "hwm_kib": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ecoflap_cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            got = status_kib(proc.pid)
            anon, file = got.get("RssAnon", 0), got.get("RssFile", 0)
            peaks["anon_kib"] = max(peaks["anon_kib"], anon)
            peaks["file_kib"] = max(peaks["file_kib"], file)
            peaks["total_kib"] = max(peaks["total_kib"], anon + file)
            peaks["hwm_kib"] = max(peaks["hwm_kib"], got.get("VmHWM", 0))
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        _, stderr = proc.communicate()
    finally:
        done.set()
        thread.join()
    return time.perf_counter() - start, peaks, proc.returncode, (stderr or "")[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("offload_memory.json"))
    parser.add_argument("--work", type=Path, default=Path("offload_memory_runs"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", help="Safetensors model directory (default: SmolLM2, saved once as fp32).")
    parser.add_argument("--calib", help="Calibration text (default: the Wikipedia calib split).")
    args = parser.parse_args(argv)
    model = args.model or str(smollm2_checkpoint())
    if args.calib:
        calib = args.calib
    else:
        from ecoflap_cli.data.assets import wikipedia_splits

        calib = str(wikipedia_splits()["calib"])
    args.work.mkdir(parents=True, exist_ok=True)
    base = [
        "prune",
        "-m",
        model,
        "--sparsity",
        "0.5",
        "--allocator",
        "uniform",
        "--calib",
        calib,
        "--samples",
        str(args.samples),
        "--seqlen",
        str(args.seqlen),
        "--overwrite",
    ]
    modes = {
        "whole model in memory": base + ["-o", str(args.work / "whole")],
        "sequential, blocks offloaded to disk": base
        + ["--offload", "disk", "--offload-folder", str(args.work / "offload"), "-o", str(args.work / "seq")],
    }
    results: dict[str, dict[str, list[float]]] = {
        name: {"peak_anon_mib": [], "peak_file_mib": [], "peak_total_mib": [], "peak_hwm_mib": [], "wall_s": []}
        for name in modes
    }
    for _ in range(args.repeats):
        for name, cmd in modes.items():
            shutil.rmtree(args.work / "offload", ignore_errors=True)
            wall, peak, code, stderr = run_child(cmd)
            if code != 0:
                print(stderr, file=sys.stderr)
                raise SystemExit(f"{name} failed with exit code {code}")
            for key in ("anon", "file", "total", "hwm"):
                results[name][f"peak_{key}_mib"].append(peak[f"{key}_kib"] / 1024)
            results[name]["wall_s"].append(wall)
            print(
                f"{name}: peak anon {peak['anon_kib'] / 1024:.0f} MiB, file {peak['file_kib'] / 1024:.0f} MiB, "
                f"VmHWM {peak['hwm_kib'] / 1024:.0f} MiB, {wall:.0f} s",
                flush=True,
            )
    from safetensors.torch import load_file

    whole = load_file(args.work / "whole" / "model.safetensors")
    seq = load_file(args.work / "seq" / "model.safetensors")
    identical = whole.keys() == seq.keys() and all(bool((whole[k] == seq[k]).all()) for k in whole)
    summary = {
        "setup": {
            "model": model,
            "samples": args.samples,
            "seqlen": args.seqlen,
            "repeats": args.repeats,
            "solver": "wanda",
            "sparsity": 0.5,
        },
        "runs": results,
        "pruned_weights_bit_identical": identical,
        "weights_mib_fp32": sum(v.numel() * v.element_size() for v in whole.values()) / 2**20,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
