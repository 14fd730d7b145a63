"""The paper's CLIP experiment on the CLIP trained here (``ecoflap_cli.bench.tiny_clip``).

    python -m ecoflap_cli.bench.clip_study                 # select on valid, then the test table
    python -m ecoflap_cli.bench.clip_study --report-only   # rewrite the tables from the cached runs

Rows: uniform Wanda, uniform SparseGPT, ECoFLaP + Wanda with one joint budget across the two
towers and with per-tower budgets (``allocate --per-tower``), each from first-order and from
zeroth-order scores, ECoFLaP (first-order, joint and per tower) + SparseGPT, OWL + Wanda and the
depth schedule + Wanda. Measures, on the test split:
zero-shot top-1 (class-balanced images, ``ecoflap eval --images``), image->text and text->image
retrieval R@1/R@5 on the captioned images (``--retrieval``), the sparsity each tower received,
and the prune stage's time (the checkpoint report's ``timings.prune_s``).

Every step calls the library as a user would, through ``ecoflap_cli.api`` in this process
(``--cli``: the ``ecoflap`` command in a subprocess per step): ``score`` (once per scoring
method and calibration seed), ``allocate``, ``prune`` to the plan, ``evaluate`` (the pruned
model in memory; ``--cli`` writes and evaluates the checkpoint). Calibration:
``data/calib.jsonl`` (training pairs only; 128 for the solver, 32 for scoring, both seeded).

Settings are chosen on the valid split at one sparsity (``--select-at``, default 0.7): the
ECoFLaP cap headroom, OWL's lambda, the depth step; the selection metric is zero-shot top-1 plus
the mean of the two R@5 (the captioned valid set is small). Then every row runs on the test
split at each sparsity with calibration seed 0, and the rows named in ``--seeds-rows`` again
with further seeds at the highest sparsities: the tables give the binomial standard error of each
number (over the test images) and, where several seeds ran, the mean and standard error over seeds.

Runs are cached under ``CACHE/bench/clip-study`` (one ``eval.json`` per run): an interrupted
study resumes. The tables go to ``study.md`` and ``study.json`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecoflap_cli.bench import tiny_clip
from ecoflap_cli.bench.tiny_clip import Log, ecoflap, stderr_log
from ecoflap_cli.data.assets import cache_dir

SPARSITIES = (0.5, 0.6, 0.7, 0.8)
#: allocators that read scores (uniform and depth ignore the scores file they are given)
SCORED = frozenset({"ecoflap", "owl"})


@dataclass(frozen=True)
class Row:
    name: str
    allocator: str
    scoring: str = "zeroth"  # the scores file the allocator reads (uniform/depth ignore it)
    solver: str = "wanda"
    per_tower: bool = False
    #: valid-split choices: allocator parameter -> candidate values (the first is the default)
    grid: tuple[tuple[str, tuple[float, ...]], ...] = ()
    params: dict[str, float] = field(default_factory=dict, hash=False, compare=False)


def rows() -> list[Row]:
    headroom = (("headroom", (0.1, 0.05, 0.2)),)
    return [
        Row("uniform Wanda", "uniform"),
        Row("uniform SparseGPT", "uniform", solver="sparsegpt"),
        Row("ECoFLaP 1st-order, joint", "ecoflap", "first", grid=headroom),
        Row("ECoFLaP 1st-order, per tower", "ecoflap", "first", per_tower=True, grid=headroom),
        Row("ECoFLaP 0th-order, joint", "ecoflap", "zeroth", grid=headroom),
        Row("ECoFLaP 0th-order, per tower", "ecoflap", "zeroth", per_tower=True, grid=headroom),
        Row("ECoFLaP 1st-order, joint + SparseGPT", "ecoflap", "first", solver="sparsegpt", grid=headroom),
        Row(
            "ECoFLaP 1st-order, per tower + SparseGPT",
            "ecoflap",
            "first",
            solver="sparsegpt",
            per_tower=True,
            grid=headroom,
        ),  # fmt: skip
        Row("OWL", "owl", "owl", grid=(("lam", (0.08, 0.04, 0.16)),)),
        Row("depth", "depth", grid=(("step", (0.01, 0.02, 0.04)),)),
    ]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


class Study:
    def __init__(
        self, root: Path, out: Path, log: Log = stderr_log, cached_only: bool = False, cli: bool = False
    ) -> None:
        self.root, self.out, self.log, self.cached_only, self.cli = root, out, log, cached_only, cli
        self._pixels: dict[str, Any] = {}
        self.model = root / "model"
        self.data = root / "data"
        self.calib = self.data / "calib.jsonl"
        out.mkdir(parents=True, exist_ok=True)

    def scores(self, method: str, seed: int) -> Path:
        path = self.out / "scores" / f"{method}-seed{seed}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            if self.cli:
                ecoflap("score", "-m", str(self.model), "--calib", str(self.calib), "--method", method,
                        "--seed", str(seed), "--device", "cpu", "-o", str(path), "--overwrite")  # fmt: skip
            else:
                from ecoflap_cli import api

                api.score(str(self.model), calib=str(self.calib), method=method, seed=seed, device="cpu",
                          output=str(path), overwrite=True)  # fmt: skip
            seconds = time.perf_counter() - started
            path.with_suffix(".seconds").write_text(f"{seconds:.2f}\n")
            self.log(f"scores {method} seed {seed}: {seconds:.1f}s")
        return path

    def correct(self, model: Any, processor: Any, split: str, top1: float) -> list[int]:
        """Per test image, 1 if the zero-shot prediction is right (for paired standard errors);
        checked against the top-1 that ``evaluate`` reported."""
        import torch

        from ecoflap_cli.data.multimodal import read_class_folders

        if split not in self._pixels:
            names, records = read_class_folders(self.data / split)
            pixels = tiny_clip.pixel_tensor(processor, [r["image"] for r in records])
            self._pixels[split] = (names, pixels, torch.tensor([r["label"] for r in records]))
        names, pixels, labels = self._pixels[split]
        with torch.no_grad():
            enc = processor.tokenizer([tiny_clip.TEMPLATE.format(n) for n in names], padding=True, return_tensors="pt")
            text = torch.nn.functional.normalize(tiny_clip._features(model.get_text_features(**enc)), dim=-1)
            image = model.get_image_features(pixel_values=pixels)
            image = torch.nn.functional.normalize(tiny_clip._features(image), dim=-1)
            right = ((image @ text.T).argmax(-1) == labels).int().tolist()
        if abs(100 * sum(right) / len(right) - top1) > 0.3:
            raise RuntimeError(f"per-image zero-shot outcomes disagree with evaluate: {sum(right)} vs {top1}")
        return right

    def score_seconds(self, method: str, seed: int) -> float | None:
        """Wall time of the ``ecoflap score`` command (model load and process start included)."""
        path = self.out / "scores" / f"{method}-seed{seed}.seconds"
        return float(path.read_text()) if path.is_file() else None

    def run(self, row: Row, sparsity: float, split: str, seed: int, params: dict[str, float]) -> dict[str, Any] | None:
        """allocate -> prune -> eval for one cell; cached by its settings (None: not cached and
        ``cached_only``)."""
        tag = "-".join([slug(row.name), f"s{sparsity:g}", split, f"seed{seed}",
                        *(f"{k}{v:g}" for k, v in sorted(params.items()))])  # fmt: skip
        folder = self.out / "runs" / tag
        result_path = folder / "result.json"
        if result_path.is_file():
            cached = json.loads(result_path.read_text())
            if "correct" in cached or self.cli or self.cached_only or split != "test":
                return cached
            # an older run without per-image outcomes: prune again to the kept plan, predict only
            from ecoflap_cli import api

            pruned = api.prune(str(self.model), plan=str(folder / "plan.json"), calib=str(self.calib),
                               solver=row.solver, seed=seed, device="cpu")  # fmt: skip
            cached["correct"] = self.correct(pruned.model, pruned.processor, split, cached["metrics"]["top1"])
            result_path.write_text(json.dumps(cached, indent=1) + "\n")
            return cached
        if self.cached_only:
            return None
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        plan, ckpt = folder / "plan.json", folder / "ckpt"
        scores = self.scores(row.scoring, seed)
        if self.cli:
            allocate = ["allocate", str(scores), "-s", str(sparsity), "--allocator", row.allocator, "--no-show",
                        "-o", str(plan)]  # fmt: skip
            for key, value in sorted(params.items()):
                allocate += ["-p", f"{key}={value}"]
            if row.per_tower:
                allocate.append("--per-tower")
            ecoflap(*allocate)
            ecoflap("prune", "-m", str(self.model), "--plan", str(plan), "--calib", str(self.calib), "--solver",
                    row.solver, "--seed", str(seed), "--device", "cpu", "-o", str(ckpt))  # fmt: skip
            report = json.loads((ckpt / "ecoflap_report.json").read_text())
            evaluated = tiny_clip.eval_split(ckpt, self.data, split)
        else:  # the same stages through the Python API, in this process (no process start per step)
            from ecoflap_cli import api

            api.allocate(str(scores), sparsity, allocator=row.allocator, settings=dict(params),
                         per_tower=row.per_tower, show=False, output=str(plan), overwrite=True)  # fmt: skip
            pruned = api.prune(str(self.model), plan=str(plan), calib=str(self.calib), solver=row.solver, seed=seed,
                               device="cpu")  # fmt: skip
            report = pruned.report
            data = self.data
            results = api.evaluate(pruned.model, processor=pruned.processor, images=str(data / split),
                                   retrieval=str(data / f"{split}_captions.jsonl"))  # fmt: skip
            evaluated = {"tasks": results["tasks"], "blocks": results.get("blocks")}
            top1 = results["tasks"]["zero_shot"]["pruned"]["top1"]
            evaluated["correct"] = self.correct(pruned.model, pruned.processor, split, top1)
        result = {"row": row.name, "sparsity": sparsity, "split": split, "seed": seed, "params": params,
                  "prune_s": report.get("timings", {}).get("prune_s"),
                  "score_s": self.score_seconds(row.scoring, seed) if row.allocator in SCORED else None,
                  "achieved": report.get("achieved_sparsity"), "towers": tower_sparsity(evaluated["blocks"]),
                  "metrics": metrics_of(evaluated["tasks"])}  # fmt: skip
        if "correct" in evaluated:
            result["correct"] = evaluated["correct"]
        shutil.rmtree(ckpt, ignore_errors=True)  # the weights are not needed again: keep the numbers
        result_path.write_text(json.dumps(result, indent=1) + "\n")
        m = result["metrics"]
        self.log(f"{row.name} @ {sparsity} ({split}, seed {seed}, {params}): top1 {m['top1']:.1f} "
                 f"i2t R@1 {m['i2t_r1']:.1f} t2i R@1 {m['t2i_r1']:.1f} towers {result['towers']}")  # fmt: skip
        return result


def metrics_of(tasks: dict[str, Any]) -> dict[str, float]:
    zero_shot = tasks["zero_shot"]["pruned"]
    retrieval = tasks["retrieval"]["pruned"]
    return {"top1": zero_shot["top1"], "n_images": zero_shot["n_images"],
            **{k: retrieval[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")},
            "n_captioned": retrieval["n_images"]}  # fmt: skip


def tower_sparsity(blocks: Sequence[dict[str, Any]] | None) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for block in blocks or []:
        t = totals.setdefault(block["tower"], [0, 0])
        t[0] += block["zeros"]
        t[1] += block["params"]
    return {tower: round(z / n, 4) for tower, (z, n) in totals.items() if n}


def selection_score(metrics: dict[str, float]) -> float:
    return metrics["top1"] + (metrics["i2t_r5"] + metrics["t2i_r5"]) / 2


def binomial_se(percent: float, n: int) -> float:
    p = percent / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def select(study: Study, at: float) -> dict[str, dict[str, float]]:
    """Per row, the grid point with the best valid selection score (ties: the default)."""
    chosen: dict[str, dict[str, float]] = {}
    for row in rows():
        if not row.grid:
            chosen[row.name] = {}
            continue
        (key, values), = row.grid  # fmt: skip
        best = None
        for value in values:
            result = study.run(row, at, "valid", 0, {key: value})
            if result is None:
                continue
            score = selection_score(result["metrics"])
            if best is None or score > best[0]:
                best = (score, value)
        chosen[row.name] = {key: best[1]} if best else {}
    return chosen


def fmt(mean: float, se: float) -> str:
    return f"{mean:.1f} ± {se:.1f}"


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds; the SE is over seeds when there are several, else binomial over images."""
    keys = ("top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
    out: dict[str, Any] = {"seeds": len(results)}
    for key in keys:
        values = [r["metrics"][key] for r in results]
        mean = statistics.fmean(values)
        n = results[0]["metrics"]["n_images" if key == "top1" else "n_captioned"]
        se_images = binomial_se(mean, n)
        se_seeds = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        out[key] = {"mean": mean, "se_images": se_images, "se_seeds": se_seeds, "values": values}
    out["towers"] = results[0]["towers"]
    if all("correct" in r for r in results):
        out["correct"] = [r["correct"] for r in results]
    out["prune_s"] = statistics.median(r["prune_s"] for r in results if r["prune_s"] is not None)
    scored = [r["score_s"] for r in results if r.get("score_s") is not None]
    out["score_s"] = statistics.median(scored) if scored else None
    return out


#: (row, baseline) pairs compared seed by seed (the same calibration sample for both)
PAIRS = (
    ("ECoFLaP 1st-order, joint", "ECoFLaP 1st-order, per tower"),
    ("ECoFLaP 0th-order, joint", "ECoFLaP 0th-order, per tower"),
    ("ECoFLaP 1st-order, joint", "uniform Wanda"),
    ("ECoFLaP 0th-order, joint", "uniform Wanda"),
    ("ECoFLaP 1st-order, per tower", "uniform Wanda"),
    ("ECoFLaP 1st-order, joint + SparseGPT", "ECoFLaP 1st-order, per tower + SparseGPT"),
    ("ECoFLaP 1st-order, joint + SparseGPT", "uniform SparseGPT"),
    ("OWL", "uniform Wanda"),
    ("depth", "uniform Wanda"),
)


def paired(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[float, float | None, int]:
    """Mean and standard error over seeds of a - b (seed by seed)."""
    return _paired_values(a[key], b[key])


def paired_differences(table: dict[str, Any]) -> list[str]:
    lines = ["## Paired differences (row minus baseline, same calibration seeds)", "",
             "Zero-shot top-1 and mean R@5 (the mean of i2t and t2i R@5), in points; mean ± standard error over "
             "seeds.", "",
             "The top-1 difference's second standard error is over the test images (each image's outcome "
             "averaged over the seeds, then paired): it includes the test set's sampling noise, which the "
             "seed-to-seed one does not.", "",
             "| row | baseline | sparsity | top-1 (± over seeds) | top-1 SE over images | mean R@5 | seeds |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row, base in PAIRS:
        for sparsity, cells in table.items():
            if row not in cells or base not in cells:
                continue
            a, b = cells[row], cells[base]
            r5 = {name: {"values": [(x + y) / 2 for x, y in zip(c["i2t_r5"]["values"], c["t2i_r5"]["values"])]}
                  for name, c in ((row, a), (base, b))}  # fmt: skip
            top, top_se, n = paired(a, b, "top1")
            image_se = paired_image_se(a, b)
            rec, rec_se, _ = _paired_values(r5[row], r5[base])
            show = lambda m, se: f"{m:+.1f}" + ("" if se is None else f" ± {se:.1f}")  # noqa: E731
            over_images = "-" if image_se is None else f"{image_se:.1f}"
            lines.append(f"| {row} | {base} | {sparsity} | {show(top, top_se)} | {over_images} | {show(rec, rec_se)} | "
                         f"{n} |")  # fmt: skip
    lines.append("")
    return lines


def paired_image_se(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Standard error, over test images, of the top-1 difference (outcomes averaged over seeds)."""
    if "correct" not in a or "correct" not in b:
        return None
    n = len(a["correct"][0])
    mean_a = [statistics.fmean(c[i] for c in a["correct"]) for i in range(n)]
    mean_b = [statistics.fmean(c[i] for c in b["correct"]) for i in range(n)]
    diffs = [x - y for x, y in zip(mean_a, mean_b)]
    return 100 * statistics.stdev(diffs) / math.sqrt(n)


def _paired_values(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float | None, int]:
    diffs = [x - y for x, y in zip(a["values"], b["values"])]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se, len(diffs)


def write_report(study: Study, dense: dict[str, Any], chosen: dict[str, Any], table: dict[str, Any]) -> Path:
    lines = ["# CLIP study (generated by `python -m ecoflap_cli.bench.clip_study`)", ""]
    d = metrics_of(dense["test"])
    lines += [f"Dense (test): zero-shot top-1 {fmt(d['top1'], binomial_se(d['top1'], int(d['n_images'])))} "
              f"({d['n_images']} images, 10 classes, chance 10.0); i2t R@1 {d['i2t_r1']:.1f}, R@5 {d['i2t_r5']:.1f}; "
              f"t2i R@1 {d['t2i_r1']:.1f}, R@5 {d['t2i_r5']:.1f} ({d['n_captioned']} captioned images, "
              f"chance R@1 {100 / d['n_captioned']:.1f}, R@5 {min(100, 500 / d['n_captioned']):.1f}).", "",
              "± is a standard error: over the calibration seeds where seeds > 1, else binomial over the test "
              "images (rows share the test images, so differences between rows are less noisy than that). "
              "prune s: the prune stage (checkpoint report); score s: the `ecoflap score` command's wall "
              "time, process start and model load included.", ""]  # fmt: skip
    lines += ["Settings chosen on valid: " + "; ".join(f"{k}: {v}" for k, v in chosen.items() if v), ""]
    for key in sorted(table, key=float):
        sparsity, cells = float(key), table[key]
        lines += [f"## Sparsity {sparsity}", "",
                  "| method | zero-shot top-1 | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | vision | text | prune s "
                  "| score s | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, cell in cells.items():

            def show(key: str, c: dict[str, Any] = cell) -> str:
                v = c[key]
                return fmt(v["mean"], v["se_seeds"] if v["se_seeds"] is not None else v["se_images"])

            towers = cell["towers"]
            score_s = "-" if cell.get("score_s") is None else f"{cell['score_s']:.1f}"
            lines.append(f"| {name} | {show('top1')} | {show('i2t_r1')} | {show('i2t_r5')} | {show('t2i_r1')} | "
                         f"{show('t2i_r5')} | {towers.get('vision', 0):.3f} | {towers.get('text', 0):.3f} | "
                         f"{cell['prune_s']:.2f} | {score_s} | {cell['seeds']} |")  # fmt: skip
        lines.append("")
    lines += paired_differences(table)
    path = study.out / "study.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="The tiny CLIP build (default: build or reuse CACHE/tiny-clip).")
    parser.add_argument("--out", type=Path, help="Study directory (default: CACHE/bench/clip-study).")
    parser.add_argument("-s", "--sparsity", type=float, action="append", help="Sparsities (default 0.5-0.8).")
    parser.add_argument("--select-at", type=float, default=0.7, help="Sparsity for the valid-split choices.")
    parser.add_argument("--seeds", type=int, default=3, help="Calibration seeds for the --seeds-rows rows.")
    parser.add_argument("--seeds-at", type=float, action="append", help="Sparsities with extra seeds (0.7, 0.8).")
    parser.add_argument(
        "--seeds-rows",
        action="append",
        help="Rows with extra seeds (repeat; 'all': every row; default: ECoFLaP and uniform Wanda).",
    )
    parser.add_argument("--report-only", action="store_true", help="Only tabulate the cached runs.")
    parser.add_argument("--cli", action="store_true", help="Run each stage as an `ecoflap` subprocess (slower).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    args = parser.parse_args(argv)
    root = args.root or tiny_clip.build()
    import torch

    torch.set_num_threads(args.threads)
    study = Study(root, args.out or cache_dir() / "bench" / "clip-study", cached_only=args.report_only, cli=args.cli)
    manifest = json.loads((root / "manifest.json").read_text())
    dense = manifest.get("dense") or tiny_clip.dense_numbers(root)
    chosen = select(study, args.select_at)
    (study.out / "chosen.json").write_text(json.dumps(chosen, indent=1) + "\n")
    sparsities = args.sparsity or list(SPARSITIES)
    seeds_at = args.seeds_at or [0.7, 0.8]
    if args.seeds_rows == ["all"]:
        args.seeds_rows = [row.name for row in rows()]
    seeds_rows = args.seeds_rows or ["uniform Wanda", "ECoFLaP 1st-order, joint", "ECoFLaP 1st-order, per tower",
                                     "ECoFLaP 0th-order, joint", "ECoFLaP 0th-order, per tower"]  # fmt: skip

    def seeds_of(row: Row, sparsity: float) -> range:
        return range(args.seeds) if (row.name in seeds_rows and sparsity in seeds_at) else range(1)

    for seed in range(args.seeds):  # every cell with seed 0 first, then the extra seeds
        for sparsity in sparsities:
            for row in rows():
                if seed in seeds_of(row, sparsity):
                    study.run(row, sparsity, "test", seed, chosen[row.name])
    table: dict[str, dict[str, Any]] = {}
    for sparsity in sparsities:
        table[str(sparsity)] = {}
        for row in rows():
            results = [study.run(row, sparsity, "test", s, chosen[row.name]) for s in seeds_of(row, sparsity)]
            done = [r for r in results if r is not None]
            if done:
                table[str(sparsity)][row.name] = summarize(done)
    (study.out / "study.json").write_text(json.dumps({"dense": dense, "chosen": chosen, "table": table}, indent=1))
    print(write_report(study, dense, chosen, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
