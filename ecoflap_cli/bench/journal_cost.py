"""What the resume journal costs a prune: the same prune with the resume state on and off.

    python -m ecoflap_cli.bench.journal_cost [--repeats 5] [--samples 16] [--seqlen 512] [--interval 300]

Loads SmolLM2-135M once, then runs ``stages.orchestrator.prune`` (uniform Wanda at 0.5, a given
plan, writing the checkpoint) ``repeats`` times in each of three modes, interleaved so that the
machine's load falls on all of them alike:

- ``off``: no resume state (``ResumeState.enabled`` forced off: no fingerprint, no checkpoints);
- ``default``: the state as a user gets it (``--resume-interval``, default 300 s);
- ``every-block``: a checkpoint after every block (``--resume-interval 0``, the old behaviour).

Between runs the dense weights are put back, so every run prunes the same model. Prints the
median wall time of each mode and the journal's share, ``(mode - off) / mode``, as markdown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli.data import assets


def _run(loaded: Any, dense: dict[str, torch.Tensor], plan: dict[str, Any], out: Path, mode: str, args: Any) -> float:
    from ecoflap_cli.io import resume
    from ecoflap_cli.stages import orchestrator
    from ecoflap_cli.stages.requests import PruneRequest

    loaded.model.load_state_dict(dense)
    interval = 0.0 if mode == "every-block" else args.interval
    request = PruneRequest.create(
        model="smollm2", plan="<in memory>", calib=args.calib, samples=args.samples,
        seqlen=args.seqlen, output=str(out), overwrite=True, resume_interval=interval, device="auto",
    )  # fmt: skip
    enabled = resume.ResumeState.__init__

    def disabled(self: Any, *a: Any, **k: Any) -> None:
        enabled(self, *a, **k)
        self.enabled = False

    if mode == "off":
        resume.ResumeState.__init__ = disabled  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        orchestrator.prune(request, orchestrator.Hooks(model=loaded), plan)
        return time.perf_counter() - start
    finally:
        resume.ResumeState.__init__ = enabled  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--interval", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default=None, help="Another model (default: SmolLM2-135M from the assets).")
    parser.add_argument("--calib", default=None, help="Calibration text (default: the Wikipedia calibration split).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ecoflap_cli import api
    from ecoflap_cli.stages import driver

    args.calib = args.calib or str(assets.wikipedia_splits()["calib"])
    loaded = api.load(args.model or str(assets.smollm2()), dtype="float32")
    adapter = driver.load_adapter(loaded)
    plan = driver.allocate(driver.structure_document(loaded, adapter), 0.5, "uniform", {})
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    modes = ("off", "default", "every-block")
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        _run(loaded, dense, plan, Path(tmp) / "out", "off", args)  # warm-up: first-touch costs, not timed
        for repeat in range(args.repeats):
            for mode in modes if repeat % 2 == 0 else reversed(modes):
                times[mode].append(_run(loaded, dense, plan, Path(tmp) / "out", mode, args))
                print(f"{mode}: {times[mode][-1]:.2f} s", flush=True)
    medians = {m: statistics.median(t) for m, t in times.items()}
    name = args.model or "SmolLM2-135M"
    print(f"\n{name}, uniform Wanda 0.5, {args.samples} x {args.seqlen} tokens, {args.repeats} repeats")
    print("| resume state | median s | runs (s) | journal share |\n|---|---:|---|---:|")
    for mode in modes:
        share = (medians[mode] - medians["off"]) / medians[mode]
        runs = ", ".join(f"{t:.1f}" for t in times[mode])
        print(f"| {mode} | {medians[mode]:.2f} | {runs} | {'-' if mode == 'off' else f'{share:+.1%}'} |")


if __name__ == "__main__":
    main()
