"""Local reconstruction after masking, measured: quality and prune time beside uniform SparseGPT.

    python -m ecoflap_cli.bench.reconstruction --model smollm2 --sparsities 0.5 0.6 0.7 --split test
    python -m ecoflap_cli.bench.reconstruction --model qwen --split test --split shakespeare --repeats 3

For each sparsity it runs uniform Wanda, uniform SparseGPT, the default allocation (``ecoflap``,
the paper's rule on exact gradient norms: what ``auto`` resolves to) with Wanda and with
SparseGPT, and each of the four again with reconstruction (``+sublayer`` with the registry's
default settings, written out in full in the method name so a cached run never stands for other
settings). Perplexity is measured on the first ``--split`` text (``test``, ``valid`` or
``shakespeare``) and on every other one given. Each method's prune stage is timed in every run
(sparsity outer loop, methods inner, so methods interleave in time) and ``--repeats`` times per
run; each median is divided by uniform SparseGPT's at the same sparsity, and a last table gives
the median over all runs of a method (the prune time hardly depends on the sparsity).

Everything runs through ``ecoflap_cli.stages.sweep.SweepRunner`` (the dense weights, calibration
batches and scores are computed once) with the model's data sizes from
``ecoflap_cli.bench.models.SIZES`` (the allocation study's), in the allocation study's cache
``CACHE/bench/MODEL-TEXT``: the four runs without reconstruction are the same runs as that
study's, computed once for both, and an interrupted benchmark resumes. The tables go to
``results-reconstruction.md`` there (and stdout).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ecoflap_cli.bench.models import DEFAULT_SPARSEGPT, DEFAULT_WANDA, MODELS, SIZES, TEXTS, model_config
from ecoflap_cli.bench.smollm import add_size_options, size_overrides

#: the four compared methods, without reconstruction
BASES = ["uniform:wanda", "uniform:sparsegpt", DEFAULT_WANDA, DEFAULT_SPARSEGPT]
REFERENCE = "uniform:sparsegpt"


def with_reconstruction(base: str, reconstruction: str, settings: dict[str, Any]) -> str:
    """``base`` (``ALLOC:SOLVER[@k=v,..]``) with ``+reconstruction`` and every setting spelled out."""
    from ecoflap_cli.core.methods import RECONSTRUCTION

    checked = RECONSTRUCTION.get(reconstruction).settings(settings)
    head, _, given = base.partition("@")
    tail = ",".join(filter(None, [given, *(f"{k}={v}" for k, v in sorted(checked.items()))]))
    return f"{head}+{reconstruction}@{tail}"


def methods(reconstruction: str, settings: dict[str, Any], bases: list[str] | None = None) -> list[str]:
    """The bases and each with reconstruction."""
    chosen = bases or BASES
    return [*chosen, *(with_reconstruction(m, reconstruction, settings) for m in chosen)]


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
                what = "error" if record else "-"
                lines.append(f"| {sparsity:g} | {name} | " + " | ".join(what for _ in texts) + " | - | - |")
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
    lines += ["", "Prune time over all sparsities (median of every timing of the method; ratio of medians):", ""]
    lines += ["| method | prune s (median, n) | vs SparseGPT |", "|---|---:|---:|"]
    pooled = {}
    for name in dict.fromkeys([REFERENCE, *names]):
        times = []
        for sparsity in cfg.sparsities:
            record = runner.load_record(_name(name), sparsity) or {}
            times += (record.get("times") or {}).get("prune_s") or []
        pooled[name] = times
    ref = _median(pooled[REFERENCE])
    for name, times in pooled.items():
        median = _median(times)
        if median is not None:
            ratio = f"{median / ref:.2f}" if ref else "-"
            lines.append(f"| {name} | {median:.1f} ({len(times)}) | {ratio} |")
    lines += target(cfg, runner, names, pooled)
    return "\n".join(lines) + "\n"


def target(cfg: Any, runner: Any, names: list[str], pooled: dict[str, list[float]]) -> list[str]:
    """The issue's bar: default + Wanda + reconstruction below uniform SparseGPT and default +
    SparseGPT at 0.6 and 0.7 on every text, at a prune time no more than uniform SparseGPT's."""
    mine = next((n for n in names if n.startswith(DEFAULT_WANDA.partition("@")[0] + "+")), None)
    if mine is None:
        return []
    texts = [Path(cfg.text).stem, *cfg.extra_names()]
    rivals = {"uniform SparseGPT": REFERENCE, "default + SparseGPT": DEFAULT_SPARSEGPT}
    lines = ["", "The target (default + Wanda + reconstruction against the two SparseGPT runs):", ""]
    lines += ["| sparsity | text | default + Wanda + recon | " + " | ".join(rivals) + " | below both? |"]
    lines += ["|---:|---|---:|" + "---:|" * len(rivals) + "---|"]

    def ppl(name: str, sparsity: float, index: int) -> float | None:
        record = runner.load_record(_name(name), sparsity) or {}
        value = record.get("ppl") if index == 0 else (record.get("ppl_extra") or {}).get(texts[index])
        return value if isinstance(value, float) else None

    for sparsity in [p for p in cfg.sparsities if p >= 0.6]:
        for index, text in enumerate(texts):
            values = [ppl(mine, sparsity, index), *(ppl(r, sparsity, index) for r in rivals.values())]
            known = [v for v in values if v is not None]
            if len(known) < len(values):
                verdict = "not run"
            else:
                worse = [k for k, v in zip(rivals, known[1:]) if known[0] >= v]
                verdict = "**yes**" if not worse else "no: " + ", ".join(worse) + " lower"
            lines.append(f"| {sparsity:g} | {text} | " + " | ".join(_fmt(v) for v in values) + f" | {verdict} |")
    ours, ref = _median(pooled.get(mine)), _median(pooled.get(REFERENCE))
    if ours and ref:
        lines += ["", f"Prune time, default + Wanda + reconstruction / uniform SparseGPT (pooled medians): "
                      f"{ours / ref:.2f} ({'within' if ours <= ref else 'over'} the bar)"]  # fmt: skip
    return lines


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
    by ``SOLVER[+RECONSTRUCTION][@k=v,..]`` (e.g. ``wanda+sublayer@lr=0.03``) to ``sparsity``;
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
        with torch.no_grad():  # the block dense again: later blocks see the dense model's activations
            for name, param in block.module.named_parameters():
                param.copy_(dense_state[name])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=list(MODELS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument(
        "--split", action="append", choices=TEXTS, help="Evaluation text (repeat; the first is the main one)."
    )
    parser.add_argument("--repeats", type=int, default=1, help="Prune-stage timings per run (medians).")
    parser.add_argument("--reconstruction", default="sublayer", help="Reconstruction (a registry name).")
    parser.add_argument(
        "--recon-param", action="append", default=[], help="A reconstruction setting NAME=VALUE (repeat)."
    )
    parser.add_argument(
        "--method", action="append", help="Only these of the four bases (repeat), each with and without."
    )
    parser.add_argument("--report-only", action="store_true", help="Only the tables, from the cached runs.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own).")
    parser.add_argument(
        "--eval-windows", type=int, default=None, help="512-token windows per text (default: the model's SIZES)."
    )
    parser.add_argument("-o", "--output", help="Output directory (default: CACHE/bench/MODEL-SPLIT, shared).")
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

    from ecoflap_cli.bench.sweep_report import runner as sweep_runner
    from ecoflap_cli.core.registry import parse_assignments
    from ecoflap_cli.stages.sweep import parse_method

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    texts = args.split or ["test"]
    settings = parse_assignments(args.recon_param, "--recon-param")
    if args.method:
        unknown = [m for m in args.method if m not in BASES]
        if unknown:
            parser.error(f"unknown method {unknown[0]!r}: choose from {', '.join(BASES)}")
    chosen = methods(args.reconstruction, settings, [m for m in BASES if not args.method or m in args.method])
    run_methods = chosen if REFERENCE in chosen else [REFERENCE, *chosen]
    size = SIZES[args.model]
    sizes = {
        "samples": size["samples"],
        "eval_windows": size["valid_windows" if texts[0] == "valid" else "test_windows"],
        **{k: v for k, v in size_overrides(args).items() if v is not None},
        **({"eval_windows": args.eval_windows} if args.eval_windows else {}),
    }
    cfg = model_config(
        args.model,
        run_methods,
        args.sparsities,
        text=texts[0],
        extra_texts=texts[1:],
        output=args.output,
        log=log,
        threads=args.threads,
        **sizes,
        **({"model": args.model_path} if args.model_path else {}),
    )
    output = cfg.output
    cfg.timing_methods = None  # every method is re-timed: the ratios compare them all
    runner = sweep_runner(cfg, log)
    specs = [parse_method(m) for m in run_methods]
    for repeat in range(0 if args.report_only else max(args.repeats, 1)):
        runner.run_pass(specs, repeat)
    text = table(cfg, runner, run_methods)
    path = Path(output) / "results-reconstruction.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(path)
    records = [runner.load_record(s.name, sp) for sp in cfg.sparsities for s in specs]
    return 0 if all(r and "error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
