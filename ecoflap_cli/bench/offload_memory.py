"""Peak memory of `ecoflap prune` whole against sequential mode with disk offload (SmolLM2-135M).

    python -m ecoflap_cli.bench.offload_memory [--out offload_memory.json] [--repeats 1]

Each prune runs as its own process, where a thread samples anonymous memory (tensors the process
owns) and file-backed pages (memory-mapped checkpoint files, which the kernel may drop) every 10 ms. Both prune the same model (SmolLM2 saved once as an fp32 safetensors
checkpoint) with uniform Wanda at 0.5 on the same calibration windows; the pruned weights of the
two runs are compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ecoflap_cli.data.assets import cache_dir, smollm2, wikipedia_splits


def smollm2_checkpoint() -> Path:
    """SmolLM2 as a plain safetensors directory (GGUF files cannot be offloaded), made once."""
    target = cache_dir() / "SmolLM2-135M-Instruct-fp32"
    if (target / "config.json").is_file():
        return target
    from ecoflap_cli.io.loading import load_model

    loaded = load_model(str(smollm2()))
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child_main(cli_args: list[str], report: Path) -> None:
    """Run the CLI in this process while a thread samples anonymous and file-backed RSS.

    Peak RSS alone mixes memory the process owns (anonymous: tensors, activations) with pages of
    memory-mapped checkpoint files, which the kernel can drop at will; both are reported.
    """
    import threading

    peaks = {"anon_kib": 0, "file_kib": 0, "total_kib": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon, file = _status_kib("RssAnon"), _status_kib("RssFile")
            peaks["anon_kib"] = max(peaks["anon_kib"], anon)
            peaks["file_kib"] = max(peaks["file_kib"], file)
            peaks["total_kib"] = max(peaks["total_kib"], anon + file)
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    from ecoflap_cli.cli.app import app

    code = 0
    try:
        app(cli_args, prog_name="ecoflap", standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    done.set()
    thread.join()
    report.write_text(json.dumps({**peaks, "exit": code}))


def run_child(args: list[str], report: Path) -> tuple[float, dict[str, int], int]:
    """Run the CLI in a child process; return (wall seconds, peak memory, exit code)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ecoflap_cli.bench.offload_memory", "--child", str(report), "--", *args]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return elapsed, {}, proc.returncode
    return elapsed, json.loads(report.read_text()), 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("offload_memory.json"))
    parser.add_argument("--work", type=Path, default=Path("offload_memory_runs"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("cli_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.cli_args, args.child)
        return
    model = smollm2_checkpoint()
    calib = wikipedia_splits()["calib"]
    args.work.mkdir(parents=True, exist_ok=True)
    base = ["prune", "-m", str(model), "--sparsity", "0.5",
            "--allocator", "uniform", "--calib", str(calib), "--samples", str(args.samples),
            "--seqlen", str(args.seqlen), "--overwrite"]
    modes = {
        "whole model in memory": base + ["-o", str(args.work / "whole")],
        "sequential, blocks offloaded to disk": base + [
            "--offload", "disk", "--offload-folder", str(args.work / "offload"), "-o", str(args.work / "seq")],
    }
    results: dict[str, dict[str, list[float]]] = {
        name: {"peak_anon_mib": [], "peak_file_mib": [], "peak_total_mib": [], "wall_s": []} for name in modes}
    for _ in range(args.repeats):
        for name, cmd in modes.items():
            shutil.rmtree(args.work / "offload", ignore_errors=True)
            wall, peak, code = run_child(cmd, args.work / "peak.json")
            if code != 0:
                raise SystemExit(f"{name} failed with exit code {code}")
            for key in ("anon", "file", "total"):
                results[name][f"peak_{key}_mib"].append(peak[f"{key}_kib"] / 1024)
            results[name]["wall_s"].append(wall)
            print(f"{name}: peak anon {peak['anon_kib'] / 1024:.0f} MiB, file {peak['file_kib'] / 1024:.0f} MiB, "
                  f"{wall:.0f} s", flush=True)
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
