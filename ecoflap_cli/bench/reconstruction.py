"""Local reconstruction after masking, measured: quality and prune time beside uniform SparseGPT.

    python -m ecoflap_cli.bench.reconstruction --model smollm2 --sparsities 0.5 0.6 0.7 --split test
    python -m ecoflap_cli.bench.reconstruction --model qwen --split test --split shakespeare --repeats 3

For each sparsity it runs uniform Wanda, uniform SparseGPT, the default allocation (``ecoflap``,
the paper's rule, scored by ``auto``) with Wanda and with SparseGPT, and each of the
four again with reconstruction (``+sublayer`` with the registry's default settings, written out
in full in the method name so a cached run never stands for other settings). Perplexity is
measured on the first ``--split`` text (``test``, ``valid`` or ``shakespeare``) and on every other
one given; the prune stage is timed ``--repeats`` times per run, interleaved with the other
methods (sparsity outer loop, methods inner), and each method's median is divided by uniform
SparseGPT's median at the same sparsity.

Everything runs through ``ecoflap_cli.stages.sweep.SweepRunner`` (the dense weights, calibration
batches and scores are computed once) with the SmolLM2 benchmark's data sizes
(``ecoflap_cli.bench.smollm.SETTINGS``: 16 x 512 calibration tokens). Runs are cached under
``CACHE/bench/reconstruction/MODEL-SPLIT``: an interrupted benchmark resumes. The tables go to
``results.md`` there (and stdout).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ecoflap_cli.bench.models import MODELS, TEXTS, model_config
from ecoflap_cli.bench.smollm import add_size_options, size_overrides
from ecoflap_cli.data import assets

#: the four compared methods, without reconstruction
BASES = ["uniform:wanda", "uniform:sparsegpt", "ecoflap:wanda", "ecoflap:sparsegpt"]
REFERENCE = "uniform:sparsegpt"


def methods(reconstruction: str, settings: dict[str, Any]) -> list[str]:
    """The bases and each with reconstruction, every setting spelled out."""
    from ecoflap_cli.core.methods import RECONSTRUCTION

    checked = RECONSTRUCTION.get(reconstruction).settings(settings)
    tail = ",".join(f"{k}={v}" for k, v in sorted(checked.items()))
    return [*BASES, *(f"{m}+{reconstruction}@{tail}" for m in BASES)]


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def table(cfg: Any, runner: Any, names: list[str]) -> str:
    """Markdown: perplexity per text and prune time (median, ratio to uniform SparseGPT)."""
    texts = [Path(cfg.text).stem, *cfg.extra_names()]
    dense = runner.load_record("dense", 0.0) or {}
    lines = [f"## {cfg.title or cfg.model}", ""]
    head = "| sparsity | method | " + " | ".join(f"ppl {t}" for t in texts) + " | prune s (median, n) | vs SparseGPT |"
    lines += [head, "|" + "---|" * (len(texts) + 4)]
    dense_ppl = [dense.get("ppl"), *((dense.get("ppl_extra") or {}).get(t) for t in texts[1:])]
    lines.append("| 0 | dense | " + " | ".join(_fmt(p) for p in dense_ppl) + " | - | - |")
    for sparsity in cfg.sparsities:
        reference = runner.load_record(_name(REFERENCE), sparsity) or {}
        ref_time = _median((reference.get("times") or {}).get("prune_s"))
        for name in names:
            record = runner.load_record(_name(name), sparsity) or {}
            if "error" in record or not record:
                lines.append(f"| {sparsity:g} | {name} | " + " | ".join("error" for _ in texts) + " | - | - |")
                continue
            ppls = [record.get("ppl"), *((record.get("ppl_extra") or {}).get(t) for t in texts[1:])]
            times = (record.get("times") or {}).get("prune_s") or []
            median = _median(times)
            ratio = f"{median / ref_time:.2f}" if median and ref_time else "-"
            lines.append(
                f"| {sparsity:g} | {name} | "
                + " | ".join(_fmt(p) for p in ppls)
                + f" | {median:.1f} ({len(times)}) | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def _name(method: str) -> str:
    from ecoflap_cli.stages.sweep import parse_method

    return parse_method(method).name


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _update_error(block: Any, inputs: list, dense: list) -> float:
    """sum |out - dense|^2 / sum |dense - in|^2 over the inputs: the error of the block's update."""
    import torch

    from ecoflap_cli.engine.blockwise import run_block
    from ecoflap_cli.models.base import hidden_of

    num, den = 0.0, 0.0
    with torch.no_grad():
        for item, target in zip(inputs, dense):
            num += float((hidden_of(run_block(block, item)) - target).square().sum())
            den += float((target - hidden_of(item[0])).square().sum())
    return num / den


def block_study(
    blocks: list[int],
    settings: list[str],
    sparsity: float,
    model: str | None = None,
    samples: int | None = None,
    seqlen: int | None = None,
) -> list[str]:
    """The per-block proxy of docs/reconstruction.md: each listed block of the dense model pruned
    by ``SOLVER[+RECONSTRUCTION][@k=v,..]`` (e.g. ``wanda+sublayer@lr=0.003``) to ``sparsity``;
    the relative error of its update (output - input) against the dense block's on the
    calibration windows and on 4 held-out validation windows, and the time of the block's prune."""
    import torch

    from ecoflap_cli.bench.smollm import SETTINGS, smollm2_batches
    from ecoflap_cli.engine.blockwise import capture_inputs, run_block
    from ecoflap_cli.engine.pruning import PruneSettings, prune_block
    from ecoflap_cli.models.base import hidden_of
    from ecoflap_cli.stages.sweep import parse_method

    seqlen = seqlen or SETTINGS["seqlen"]
    _, adapter, batches = smollm2_batches(
        "calib", samples or SETTINGS["samples"], seqlen, SETTINGS["batch_size"], model=model
    )
    _, _, held = smollm2_batches("valid", 4, seqlen, 4, seed=1, model=model)
    lines = []
    for index in blocks:
        block = adapter.blocks()[index]
        data = [capture_inputs(adapter, block, b) for b in (batches, held)]
        dense_state = {n: p.detach().clone() for n, p in block.module.named_parameters()}
        with torch.no_grad():
            dense = [[hidden_of(run_block(block, item)).clone() for item in part] for part in data]
        counts = {t: round(block.module.get_parameter(t[len(block.name) + 1 :]).numel() * sparsity)
                  for t in block.tensor_names()}  # fmt: skip

        for text in settings:
            spec = parse_method(f"uniform:{text}")
            with torch.no_grad():
                for name, param in block.module.named_parameters():
                    param.copy_(dense_state[name])
            prune = PruneSettings(spec.solver, solver_settings=spec.solver_settings(), reconstruct=spec.reconstruct,
                                  reconstruct_settings=spec.reconstruct_settings())  # fmt: skip
            start = time.perf_counter()
            prune_block(adapter, block, data[0], counts, prune)
            elapsed = time.perf_counter() - start
            errors = [_update_error(block, part, targets) for part, targets in zip(data, dense)]
            lines.append(f"| {index} | {text} | {errors[0]:.4f} | {errors[1]:.4f} | {elapsed:.1f} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=list(MODELS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument(
        "--split", action="append", choices=TEXTS, help="Evaluation text (repeat; the first is the main one)."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Prune-stage timings per run (medians).")
    parser.add_argument("--reconstruction", default="sublayer", help="Reconstruction (a registry name).")
    parser.add_argument(
        "--recon-param", action="append", default=[], help="A reconstruction setting NAME=VALUE (repeat)."
    )
    parser.add_argument("--method", action="append", help="Only these of the eight methods (repeat).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own).")
    parser.add_argument("--eval-windows", type=int, default=None, help="512-token windows per text (default 20).")
    parser.add_argument("-o", "--output", help="Output directory (default: CACHE/bench/reconstruction/MODEL-SPLIT).")
    swap = parser.add_argument_group("other model or data (the smoke test)")
    swap.add_argument("--model-path", help="A model directory or .gguf instead of the named model.")
    add_size_options(swap)
    parser.add_argument(
        "--block-study",
        type=int,
        nargs="+",
        metavar="BLOCK",
        help="Instead: the per-block proxy on these blocks of SmolLM2 (settings: --setting, sparsity: the first).",
    )
    parser.add_argument(
        "--setting",
        action="append",
        help="Block study: SOLVER[+RECONSTRUCTION][@k=v,..] (repeat), e.g. wanda+sublayer@lr=0.003,steps=8.",
    )
    args = parser.parse_args(argv)
    if args.block_study:
        header = "| block | setting | calib error | held-out error | prune_block s |\n|---|---|---:|---:|---:|"
        print(header)
        block_study(args.block_study, args.setting or ["wanda", "sparsegpt", "wanda+sublayer"], args.sparsities[0],
                    args.model_path, args.samples, args.seqlen)  # fmt: skip
        return 0

    from ecoflap_cli.core.registry import parse_assignments
    from ecoflap_cli.stages.sweep import SweepRunner, parse_method

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    texts = args.split or ["test"]
    chosen = methods(args.reconstruction, parse_assignments(args.recon_param, "--recon-param"))
    if args.method:
        unknown = [m for m in args.method if m not in chosen and m not in BASES]
        if unknown:
            parser.error(f"unknown method {unknown[0]!r}: choose from {', '.join(chosen)}")
        picked = {parse_method(m).name for m in args.method}
        chosen = [m for m in chosen if parse_method(m).name in picked or parse_method(m.split("+")[0]).name in picked]
    run_methods = chosen if REFERENCE in chosen else [REFERENCE, *chosen]
    output = args.output or str(assets.cache_dir() / "bench" / "reconstruction" / f"{args.model}-{texts[0]}")
    cfg = model_config(
        args.model,
        run_methods,
        args.sparsities,
        text=texts[0],
        extra_texts=texts[1:],
        output=output,
        log=log,
        threads=args.threads,
        eval_windows=args.eval_windows,
        **size_overrides(args),
        **({"model": args.model_path} if args.model_path else {}),
    )
    cfg.timing_methods = None  # every method is re-timed: the ratios compare them all
    runner = SweepRunner(cfg, log)
    specs = [parse_method(m) for m in run_methods]
    for repeat in range(max(args.repeats, 1)):
        runner.run_pass(specs, repeat)
    text = table(cfg, runner, run_methods)
    path = Path(output) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(path)
    records = [runner.load_record(s.name, sp) for sp in cfg.sparsities for s in specs]
    return 0 if all(r and "error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
