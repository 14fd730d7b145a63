"""The `ecoflap` command line: parses options, calls the library, renders to stderr.

Artifacts go to files, or to stdout with ``-o -``; ``-`` as an input path reads stdin. Every
user error ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ecoflap_cli import __version__
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.artifacts import allocator_settings
from ecoflap_cli.errors import EcoflapError
from ecoflap_cli.io.loading import LoadedModel, LoadOptions, load_model
from ecoflap_cli.stages.driver import (
    CalibrationOptions,
    ScoreOptions,
    calibration_batches,
    check_activation_memory,
    load_adapter,
    run_prune,
    run_score,
    structure_document,
)
from ecoflap_cli.engine.pruning import PruneSettings
from ecoflap_cli.cli.render import render_plan, render_sparsity
from ecoflap_cli.engine.scoring import ZerothOrderSettings

console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: wide enough that tables are not truncated
    console = Console(stderr=True, width=140)
app = typer.Typer(
    name="ecoflap",
    help="Prune language and vision-language models with ECoFLaP (coarse-to-fine layer-wise pruning).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn library errors into one line on stderr and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EcoflapError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except MemoryError:
            console.print("[bold red]error:[/] out of memory: lower --samples, --seqlen or --batch-size")
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[str], None]]:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)

        def step(message: str) -> None:
            bar.update(task, advance=1, description=message)

        yield step


# --- shared options ---------------------------------------------------------------------------

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local model directory or .gguf file.")]
DtypeOpt = Annotated[str, typer.Option(help="Weights dtype: auto, float32, float16, bfloat16.")]
DeviceOpt = Annotated[str, typer.Option(help="Compute device: auto (CUDA, MPS, else CPU), cpu, cuda, cuda:1.")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(help="accelerate device map: auto, balanced, sequential or JSON.")]
MaxMemOpt = Annotated[Optional[list[str]], typer.Option(help="Per-device budget, e.g. 0=20GiB or cpu=64GiB (repeat).")]
OffloadOpt = Annotated[Optional[Path], typer.Option(help="Folder for weights that fit on no device.")]
SequentialOpt = Annotated[Optional[str], typer.Option(
    "--offload", help="Sequential mode: keep every block on cpu or disk (needs --offload-folder) and move "
    "it to the compute device only while it runs.")]
CalibOpt = Annotated[Optional[str], typer.Option(help="Calibration data: .txt/.jsonl text, image-text .jsonl, or hub:NAME.")]
SeqlenOpt = Annotated[Optional[int], typer.Option(help="Tokens per calibration sample (default: context length, at most 2048).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling calibration windows and perturbations.")]
TextFieldOpt = Annotated[str, typer.Option(help="Field holding the text in .jsonl records.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
DEFAULT_ALLOCATOR = "auto"
AllocatorOpt = Annotated[str, typer.Option(help=(
    "auto (mix for one-tower language models, ecoflap for multi-tower models), ecoflap (the paper's "
    "capped proportional rule), rank (sparsity linear in score rank), mix (depth schedule + score rank), "
    "depth, owl (needs --method owl scores) or uniform."))]
MaxSparsityOpt = Annotated[Optional[float], typer.Option(help="ecoflap: cap on any block's sparsity (default target + 0.1).")]
TemperatureOpt = Annotated[float, typer.Option(help="ecoflap: allocate by score^(1/T); 1 is the paper's rule.")]
DepthStepOpt = Annotated[float, typer.Option(help="depth: sparsity added per block of depth.")]
LamOpt = Annotated[Optional[float], typer.Option(help="owl/rank/mix: half-range of block sparsities around the target (defaults 0.08 / 0.1 / 0.15).")]
AlphaOpt = Annotated[float, typer.Option(help="mix: weight of depth against score rank, in [0, 1].")]


def _load(model: str, dtype: str, device: str, trust_remote_code: bool, device_map: str | None,
          max_memory: list[str] | None, offload_folder: Path | None, offload: str | None = None) -> LoadedModel:
    memory: dict[str, str] = {}
    for item in max_memory or []:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise EcoflapError(f"--max-memory takes DEVICE=SIZE (e.g. 0=20GiB), got {item!r}")
        memory[key.strip()] = value.strip()
    opts = LoadOptions(dtype, device, trust_remote_code, device_map, memory,
                       str(offload_folder) if offload_folder else None, offload)
    with console.status(f"loading {model}"):
        return load_model(model, opts)


def _check_output(output: str, overwrite: bool) -> None:
    if output != "-" and Path(output).exists() and not overwrite:
        raise EcoflapError(f"{output} exists (pass --overwrite to replace it)")


def _parse_nm(nm: str | None) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(x) for x in nm.split(":"))
    except ValueError:
        raise EcoflapError(f"--nm takes N:M such as 2:4, got {nm!r}") from None
    if not 0 < n < m:
        raise EcoflapError(f"--nm needs 0 < N < M, got {nm!r}")
    return n, m


def _parse_groups(items: list[str] | None) -> dict[str, str]:
    groups = {}
    for item in items or []:
        tower, sep, group = item.partition("=")
        if not sep or group not in ("row", "matrix"):
            raise EcoflapError(f"--compare-group takes TOWER=row|matrix, got {item!r}")
        groups[tower] = group
    return groups


def _check_sparsity(value: float, name: str = "--sparsity") -> None:
    if not 0.0 <= value < 1.0:
        raise EcoflapError(f"{name} must be in [0, 1), got {value}")


# --- commands ---------------------------------------------------------------------------------


@app.command()
@user_errors
def score(
    model: ModelOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Scores JSON path, or - for stdout.")] = "scores.json",
    method: Annotated[str, typer.Option(help="auto (exact first-order gradient norms when backprop fits in memory, else zeroth), zeroth (forward only, the paper's), first (backprop) or owl (outlier ratios).")] = "auto",
    calib: CalibOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration samples.")] = 32,
    seqlen: SeqlenOpt = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 8,
    seed: SeedOpt = 0,
    eps: Annotated[float, typer.Option(help="Zeroth-order perturbation size.")] = 1e-3,
    granularity: Annotated[str, typer.Option(help="Perturb a whole block at once (block) or each tensor (tensor).")] = "block",
    reuse_activations: Annotated[bool, typer.Option(help="Replay the blocks before the perturbed one from stored activations.")] = True,
    perturbations: Annotated[int, typer.Option(help="Random directions per block and batch.")] = 1,
    direction: Annotated[str, typer.Option(help="Direction distribution: gaussian or rademacher.")] = "gaussian",
    difference: Annotated[str, typer.Option(help="central (L+ - L-)/2eps, or forward (L+ - L0)/eps: half the passes.")] = "central",
    head: Annotated[str, typer.Option(help="auto, linearized (stop each pass at the last block; dL/dh there computed once) or exact (loss every pass: the reference).")] = "auto",
    first_metric: Annotated[str, typer.Option(help="First-order score: taylor (|w*g|) or gradnorm.")] = "taylor",
    include_qformer: Annotated[bool, typer.Option(help="Prune (and score) the BLIP-2 Q-Former too.")] = False,
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto", device: DeviceOpt = "auto", trust_remote_code: RemoteOpt = False,
    device_map: DeviceMapOpt = None, max_memory: MaxMemOpt = None, offload_folder: OffloadOpt = None,
    offload: SequentialOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Coarse stage: one global importance score per block, written as scores JSON."""
    _check_output(output, overwrite)
    loaded = _load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder, offload)
    adapter = load_adapter(loaded, include_qformer)
    batches, prov = calibration_batches(loaded, adapter, CalibrationOptions(calib, samples, seqlen, batch_size, seed, text_field))
    opts = ScoreOptions(method, ZerothOrderSettings(eps, seed, granularity, reuse_activations, perturbations, direction, difference, head), first_metric)
    with progress_bar(len(adapter.blocks()), "scoring") as step:
        doc = run_score(loaded, adapter, batches, prov, opts, step)
    artifacts.emit_json(doc, output, overwrite)
    console.print(f"scored {len(doc['groups'])} blocks with {method} in {doc['timings']['score_s']:.1f}s"
                  + ("" if output == "-" else f" -> {output}"))


@app.command()
@user_errors
def allocate(
    scores: Annotated[str, typer.Argument(help="Scores JSON from `ecoflap score`, or - for stdin.")],
    sparsity: Annotated[float, typer.Option("--sparsity", "-s", help="Target global sparsity in [0, 1).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Plan JSON path, or - for stdout.")] = "plan.json",
    allocator: AllocatorOpt = DEFAULT_ALLOCATOR,
    max_sparsity: MaxSparsityOpt = None,
    temperature: TemperatureOpt = 1.0,
    depth_step: DepthStepOpt = 0.01,
    lam: LamOpt = None,
    alpha: AlphaOpt = 0.5,
    per_tower: Annotated[bool, typer.Option(help="Hold each tower at the target instead of one joint budget.")] = False,
    show: Annotated[bool, typer.Option(help="Print the plan table on stderr.")] = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Scores -> per-block sparsity plan (exact global budget). Shows the plan before any pruning."""
    _check_sparsity(sparsity)
    doc = artifacts.validate_scores(artifacts.read_json(scores), "stdin" if scores == "-" else scores)
    settings = allocator_settings(allocator, max_sparsity, temperature, depth_step, lam, alpha)
    plan = artifacts.build_plan(doc, allocator, sparsity, settings, per_tower)
    _check_output(output, overwrite)
    if show:
        render_plan(console, plan)
    artifacts.emit_json(plan, output, overwrite)


@app.command()
@user_errors
def prune(
    model: ModelOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the pruned checkpoint.")] = "pruned",
    plan: Annotated[Optional[str], typer.Option(help="Plan JSON from `ecoflap allocate` (or - for stdin).")] = None,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", "-s", help="One-shot: score and allocate to this target.")] = None,
    allocator: AllocatorOpt = DEFAULT_ALLOCATOR,
    score_method: Annotated[str, typer.Option(help="One-shot scoring: auto (first-order when it fits, else zeroth), zeroth, first or owl.")] = "auto",
    score_samples: Annotated[int, typer.Option(help="One-shot: calibration samples for scoring.")] = 32,
    score_seqlen: Annotated[Optional[int], typer.Option(help="One-shot: tokens per scoring sample (default: --seqlen).")] = None,
    max_sparsity: MaxSparsityOpt = None,
    temperature: TemperatureOpt = 1.0,
    depth_step: DepthStepOpt = 0.01,
    lam: LamOpt = None,
    alpha: AlphaOpt = 0.5,
    solver: Annotated[str, typer.Option(help="Layer-wise solver: wanda, sparsegpt or magnitude.")] = "wanda",
    nm: Annotated[Optional[str], typer.Option(help="N:M structured sparsity, e.g. 2:4 (uniform plans only).")] = None,
    compare_group: Annotated[Optional[list[str]], typer.Option(help="Wanda comparison group per tower: TOWER=row|matrix.")] = None,
    calib: CalibOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration samples for the layer-wise solver.")] = 128,
    seqlen: SeqlenOpt = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 8,
    seed: SeedOpt = 0,
    include_qformer: Annotated[bool, typer.Option(help="Prune the BLIP-2 Q-Former too.")] = False,
    packed: Annotated[bool, typer.Option("--packed", help="Write packed sparse safetensors (smaller; needs ecoflap to load).")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest weight file, e.g. 5GB or 500MB.")] = "5GB",
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto", device: DeviceOpt = "auto", trust_remote_code: RemoteOpt = False,
    device_map: DeviceMapOpt = None, max_memory: MaxMemOpt = None, offload_folder: OffloadOpt = None,
    offload: SequentialOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine stage: layer-wise pruning to a plan; writes a Hugging Face checkpoint directory."""
    from ecoflap_cli.io.checkpoint import check_output_dir, parse_size, save_checkpoint

    if (plan is None) == (sparsity is None):
        raise EcoflapError("give exactly one of --plan PLAN.json or --sparsity P")
    if sparsity is not None:
        _check_sparsity(sparsity)
    nm_pair = _parse_nm(nm)
    settings = PruneSettings(solver, nm_pair, _parse_groups(compare_group),
                             store_device="cpu" if (offload or device_map) else None)
    check_output_dir(output, overwrite)
    parse_size(max_shard_size)
    plan_doc = artifacts.validate_plan(artifacts.read_json(plan), plan) if plan else None
    if plan_doc is not None and nm_pair is not None:
        artifacts.check_nm_plan(plan_doc, nm_pair)
    if sparsity is not None and nm_pair is not None and allocator != "uniform":
        raise EcoflapError(f"--nm needs a uniform plan: add --allocator uniform (got {allocator})")
    loaded = _load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder, offload)
    adapter = load_adapter(loaded, include_qformer)
    calib_opts = CalibrationOptions(calib, samples, seqlen, batch_size, seed, text_field)
    documents: dict[str, dict[str, Any]] = {}
    check_activation_memory(loaded.model, calib_opts, settings.store_device)
    batches, prov = calibration_batches(loaded, adapter, calib_opts) if solver != "magnitude" else ([], None)
    if plan_doc is None:
        assert sparsity is not None
        alloc_settings = allocator_settings(allocator, max_sparsity, temperature, depth_step, lam, alpha)
        plan_doc, scores_doc = _one_shot_plan(loaded, adapter, calib_opts, sparsity, allocator,
                                              score_method, score_samples, score_seqlen, alloc_settings)
        documents["scores.json"] = scores_doc
        render_plan(console, plan_doc)
    documents["plan.json"] = plan_doc
    with progress_bar(len(adapter.blocks()), f"pruning ({solver})") as step:
        report = run_prune(loaded, adapter, plan_doc, batches, prov, settings, step)
    documents["ecoflap_report.json"] = report
    with console.status(f"writing {output}"):
        save_checkpoint(loaded, output, documents, overwrite, packed=packed,
                        max_shard_size=max_shard_size, n_m=nm_pair)
    console.print(f"pruned to {report['achieved_sparsity']:.4f} sparsity (target {report['target_sparsity']}) "
                  f"in {report['timings']['prune_s']:.1f}s -> {output}")


def _one_shot_plan(loaded: LoadedModel, adapter: Any, calib_opts: CalibrationOptions, sparsity: float,
                   allocator: str, score_method: str, score_samples: int, score_seqlen: int | None,
                   settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    if allocator in ("uniform", "depth"):
        scores_doc = structure_document(loaded, adapter)
    else:
        method = "owl" if allocator == "owl" else score_method
        opts = CalibrationOptions(calib_opts.calib, score_samples, score_seqlen or calib_opts.seqlen,
                                  calib_opts.batch_size, calib_opts.seed, calib_opts.text_field)
        batches, prov = calibration_batches(loaded, adapter, opts)
        with progress_bar(len(adapter.blocks()), f"scoring ({method})") as step:
            scores_doc = run_score(loaded, adapter, batches, prov,
                                   ScoreOptions(method, ZerothOrderSettings(seed=calib_opts.seed)), step)
    return artifacts.build_plan(scores_doc, allocator, sparsity, settings), scores_doc


@app.command("eval")
@user_errors
def evaluate(
    checkpoint: Annotated[str, typer.Argument(help="Pruned checkpoint directory (or any model id / .gguf).")],
    text: Annotated[Optional[Path], typer.Option(help="Text file (.txt/.jsonl) for perplexity (BLIP-2: of its language model, text only).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="CLIP zero-shot classification: a folder with one subfolder of images per class.")] = None,
    template: Annotated[Optional[list[str]], typer.Option(help="Zero-shot prompt template, {} is the class name (repeat; default 'a photo of a {}.').")] = None,
    template_file: Annotated[Optional[Path], typer.Option(help="Zero-shot prompt templates, one per line.")] = None,
    retrieval: Annotated[Optional[Path], typer.Option(help="CLIP image-text retrieval R@1/5/10: JSONL of {image, caption}.")] = None,
    vqa: Annotated[Optional[Path], typer.Option(help="BLIP-2/InstructBLIP VQA soft accuracy: JSONL of {image, question, answers}.")] = None,
    captions: Annotated[Optional[Path], typer.Option(help="BLIP-2/InstructBLIP captioning CIDEr-D: JSONL of {image, caption}.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Captioning prompt the model continues (default 'a photo of'; '' for none).")] = None,
    question_template: Annotated[Optional[str], typer.Option(help="VQA prompt with {question} (default 'Question: {question} Answer:').")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens to generate (default 10 for VQA, 20 for captions).")] = None,
    compare: Annotated[Optional[str], typer.Option(help="Dense model to evaluate side by side.")] = None,
    plan: Annotated[Optional[str], typer.Option(help="Plan to check achieved sparsity against (default: the checkpoint's plan.json).")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows (or images) per forward pass.")] = 4,
    per_tensor: Annotated[bool, typer.Option(help="Show every tensor, not one row per block.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write results JSON here (- for stdout).")] = None,
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto", device: DeviceOpt = "auto", trust_remote_code: RemoteOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Achieved sparsity against the plan; perplexity and vision-language tasks, optionally vs the dense model."""
    from ecoflap_cli.evaluation.tasks import MultimodalTasks, run_eval
    from ecoflap_cli.cli.render import render_tasks

    if output is not None:
        _check_output(output, overwrite)
    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise EcoflapError("--batch-size and --max-new-tokens must be at least 1")
    templates = list(template or [])
    if template_file is not None:
        if not template_file.is_file():
            raise EcoflapError(f"template file not found: {template_file}")
        lines = template_file.read_text(encoding="utf-8").splitlines()
        templates += [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    if templates and images is None:
        raise EcoflapError("--template/--template-file go with --images (zero-shot classification)")
    tasks = MultimodalTasks(images, templates, retrieval, vqa, captions, prompt, question_template, max_new_tokens)
    results = run_eval(
        checkpoint, text, compare, plan, seqlen, max_windows, batch_size, text_field,
        lambda m: _load(m, dtype, device, trust_remote_code, None, None, None),
        tasks=tasks, progress=lambda message: console.print(f"[dim]{message}[/]", highlight=False),
    )
    render_sparsity(console, results, per_tensor)
    render_tasks(console, results)
    if output is not None:
        artifacts.emit_json(results, output, overwrite)


@app.command("inspect")
@user_errors
def inspect_command(
    path: Annotated[str, typer.Argument(help="scores.json, plan.json, checkpoint directory, or - (stdin).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    chart: Annotated[Optional[Path], typer.Option(help="PNG of sparsity per block by tower (matplotlib).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """What an artifact is, and its sparsity per block and per tower (measured for checkpoints)."""
    from ecoflap_cli.io.inspect import inspect_artifact, write_chart
    from ecoflap_cli.cli.render import render_inspect

    if chart is not None:
        _check_output(str(chart), overwrite)
    with console.status(f"reading {path}"):
        summary = inspect_artifact(path)
    render_inspect(console, summary)
    if chart is not None:
        write_chart(summary, chart)
        console.print(f"chart -> {chart}")
    if json_output:
        artifacts.emit_json(summary, "-")


@app.command()
@user_errors
def convert(
    source: Annotated[str, typer.Argument(help="Checkpoint directory to convert.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the converted checkpoint.")],
    to: Annotated[str, typer.Option("--to", help="Weight layout to write: packed or dense.")],
    max_shard_size: Annotated[str, typer.Option(help="Largest weight file, e.g. 5GB or 500MB.")] = "5GB",
    overwrite: OverwriteOpt = False,
) -> None:
    """Rewrite a checkpoint's weights packed <-> dense, losslessly; other files are copied."""
    from ecoflap_cli.io.checkpoint import convert_checkpoint

    with console.status(f"converting {source} to {to}"):
        done = convert_checkpoint(source, output, to, overwrite, max_shard_size)
    console.print(f"{done['source']} ({done['from']}, {done['bytes_before']:,} bytes of weights) -> "
                  f"{done['output']} ({done['to']}, {done['bytes_after']:,} bytes)", highlight=False)


@app.command()
@user_errors
def sweep(
    method: Annotated[Optional[list[str]], typer.Option("--method", help="ALLOCATOR[-SCORING]:SOLVER[@k=v,..], e.g. uniform:wanda, ecoflap-zeroth:sparsegpt, owl:wanda@m=5,lam=0.08, llmc:wanda (repeat).")] = None,
    sparsity: Annotated[Optional[list[float]], typer.Option("--sparsity", "-s", help="Target sparsity (repeat).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, local model directory or .gguf file.")] = None,
    calib: Annotated[Optional[str], typer.Option(help="Calibration text (.txt/.jsonl).")] = None,
    text: Annotated[Optional[str], typer.Option(help="Text (.txt/.jsonl) to measure perplexity on.")] = None,
    extra_text: Annotated[Optional[list[str]], typer.Option(help="Another text every pruned model is also evaluated on (repeat; e.g. another domain).")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for sweep.md, sweep.json, sweep.png and the run cache.")] = "sweep",
    preset: Annotated[Optional[str], typer.Option(help="smollm2: the SmolLM2 + Wikipedia benchmark (assets fetched and cached).")] = None,
    split: Annotated[str, typer.Option(help="With --preset: evaluate on the test or valid split.")] = "test",
    samples: Annotated[Optional[int], typer.Option(help="Pruning calibration samples (default 128; preset 16).")] = None,
    seqlen: SeqlenOpt = None,
    score_samples: Annotated[Optional[int], typer.Option(help="Scoring calibration samples (default 32).")] = None,
    score_seqlen: Annotated[Optional[int], typer.Option(help="Tokens per scoring sample (default: --seqlen; preset 128).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per forward pass (default 8).")] = None,
    seed: SeedOpt = 0,
    eval_seqlen: Annotated[Optional[int], typer.Option(help="Tokens per perplexity window (default 512).")] = None,
    eval_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows (preset 20).")] = None,
    repeats: Annotated[int, typer.Option(help="Time the prune stage this many times per run (interleaved passes; medians).")] = 1,
    isolate: Annotated[bool, typer.Option("--isolate", help="Run each method in its own subprocess (per-method peak memory).")] = False,
    llmc_python: Annotated[Optional[str], typer.Option(help="Python of a venv with llmcompressor, for llmc:* methods.")] = None,
    llmc_venv: Annotated[bool, typer.Option("--llmc-venv", help="Create (once) llm-compressor's venv under the cache dir and use it.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's choice).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore cached runs and scores in the output directory.")] = False,
    plot: Annotated[bool, typer.Option(help="Write sweep.png (needs matplotlib).")] = True,
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto", device: DeviceOpt = "auto",
) -> None:
    """Prune and evaluate many methods x sparsities; writes a markdown/JSON table and a plot."""
    from ecoflap_cli.stages.sweep import SweepConfig, run_sweep

    sizes = {"samples": samples, "seqlen": seqlen, "score_samples": score_samples, "score_seqlen": score_seqlen,
             "batch_size": batch_size, "eval_seqlen": eval_seqlen, "eval_windows": eval_windows}
    log = lambda message: console.print(f"[dim]{message}[/]", highlight=False)  # noqa: E731
    if llmc_venv and llmc_python is None:
        from ecoflap_cli.data.assets import cache_dir
        from ecoflap_cli.bench.llmc_env import ensure_llmc_venv

        llmc_python = str(ensure_llmc_venv(cache_dir() / "llmc-venv", log))
    if preset is not None:
        if preset != "smollm2":
            raise EcoflapError(f"unknown preset {preset!r} (smollm2)")
        if split not in ("test", "valid"):
            raise EcoflapError(f"--split is test or valid, got {split!r}")
        from ecoflap_cli.bench.quality import smollm2_config

        cfg = smollm2_config(output if output != "sweep" else None, split, method, sparsity,
                             peer=True, llmc_python=llmc_python, log=log, seed=seed, **sizes)
        for name, value in (("model", model), ("calib", calib), ("text", text)):
            if value is not None:
                setattr(cfg, name, value)
    else:
        if model is None or calib is None or text is None or not method or not sparsity:
            raise EcoflapError("give --model, --calib, --text, --method and --sparsity (or --preset smollm2)")
        defaults = {"samples": 128, "score_samples": 32, "batch_size": 8, "eval_seqlen": 512}
        values = {k: (v if v is not None else defaults.get(k)) for k, v in sizes.items()}
        cfg = SweepConfig(model=model, calib=calib, text=text, methods=list(method), sparsities=list(sparsity),
                          output=output, llmc_python=llmc_python, seed=seed, **values)
    cfg.repeats, cfg.isolate, cfg.threads, cfg.resume, cfg.plot = repeats, isolate, threads, not fresh, plot
    if extra_text:
        cfg.extra_texts = list(extra_text)
    cfg.text_field, cfg.dtype, cfg.device = text_field, dtype, device
    summary = run_sweep(cfg, log)
    failed = [f"{r['method']}@{r['sparsity']:g}" for r in summary["runs"] if "error" in r]
    console.print(f"{len(summary['runs']) - len(failed)} runs -> {cfg.output}/sweep.md"
                  + (f"; failed: {', '.join(failed)}" if failed else ""), highlight=False)
    if failed:
        raise typer.Exit(1)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ecoflap {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Prune language and vision-language models with ECoFLaP."""


def main() -> None:
    app(prog_name="ecoflap")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
