"""`ecoflap sweep`: several allocators x solvers x sparsities, each pruned and evaluated, in one run.

A method is written ``ALLOCATOR[-SCORING]:SOLVER[+RECONSTRUCTION][@key=value,...]``:

    uniform:magnitude  uniform:wanda  uniform:sparsegpt     the baselines
    owl:wanda@m=5,lam=0.08                                  OWL outlier ratios -> OWL allocator
    ecoflap-zeroth:wanda  ecoflap-first:sparsegpt@max=0.1   ECoFLaP scores -> ECoFLaP allocator
    depth:wanda@step=0.005                                  depth schedule
    ecoflap-first:wanda@metric=gradnorm,temp=2              ECoFLaP rule on score^(1/temp)
    ecoflap-zeroth:wanda@zseed=1                            zeroth-order directions from seed 1
    rank-first:wanda@metric=gradnorm,lam=0.15               sparsity linear in the score's rank
    mix-first:wanda@metric=gradnorm,lam=0.15,alpha=0.5      depth schedule blended with score rank
    llmc:wanda  llmc:sparsegpt  llmc-owl:wanda@m=5,lam=0.08 llm-compressor (the peer; --llmc-python)
    mix:wanda+sublayer@steps=32,lr=1e-4                     Wanda masks, then local reconstruction

Stages that do not change between runs are computed once and reused: the model is loaded once
and a CPU copy of its dense state dict is ``load_state_dict``-ed back before every run;
calibration batches (pruning and scoring) and evaluation windows are built once; scores are
computed once per scoring method (and cached on disk under ``OUT/scores/``), then shared by every
sparsity and solver that needs them. Every finished run is written to ``OUT/runs/`` at once, so
an interrupted sweep resumes where it stopped.

Peak memory is the *process's* resident-set high-water mark (``VmHWM`` on Linux, else
``ru_maxrss`` from ``resource.getrusage``). In one process it only grows, so a
run's value is the peak of everything so far; with ``isolate=True`` every method (all its
sparsities) runs in a fresh subprocess and its value is that method's own peak (model load
included).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli import __version__
from ecoflap_cli.core.methods import ALLOCATORS, RECONSTRUCTION, SCORING, SOLVERS, scoring_for, with_target
from ecoflap_cli.core.registry import Entry
from ecoflap_cli.data.text import SELF_SOURCE, parse_calib_spec, read_text, tokenize_documents
from ecoflap_cli.engine.memory import total_memory
from ecoflap_cli.errors import EcoflapError, PlanError
from ecoflap_cli.evaluation.measure import perplexity, sparsity_report, windows_for_eval
from ecoflap_cli.files import sha256_file
from ecoflap_cli.io import artifacts
from ecoflap_cli.io.loading import LoadedModel, LoadOptions, load_model
from ecoflap_cli.stages import driver
from ecoflap_cli.stages.driver import CalibrationOptions, PruneSettings, calibration_batches, load_adapter
from ecoflap_cli.stages.requests import SweepRequest

Log = Callable[[str], None]
#: llm-compressor's methods (the peer, run in its own venv): solvers and @keys with defaults
PEER_SOLVERS = ("wanda", "sparsegpt")
PEERS: dict[str, dict[str, Any]] = {"llmc": {}, "llmc-owl": {"m": 5, "lam": 0.08}}
ALIASES = {"magnitude": "uniform:magnitude", "wanda": "uniform:wanda", "sparsegpt": "uniform:sparsegpt"}


# --- method specs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    allocator: str  # a registered allocator, or llmc / llmc-owl
    scoring: str | None  # a registered scoring method, or None
    solver: str
    params: tuple[tuple[str, Any], ...] = ()
    reconstruct: str | None = None  # a RECONSTRUCTION entry, or None

    @property
    def peer(self) -> bool:
        return self.allocator in PEERS

    @property
    def param(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def name(self) -> str:
        head = self.allocator
        if self.scoring is not None and not self.peer and ALLOCATORS.get(self.allocator).needs == "scores":
            head = f"{head}-{self.scoring}"
        text = f"{head}:{self.solver}" + (f"+{self.reconstruct}" if self.reconstruct else "")
        if self.params:
            text += "@" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params)
        return text

    def owners(self) -> list[Entry]:
        """The registry entries whose settings the @keys may set: allocator, scoring, solver,
        reconstruction."""
        if self.peer:
            return []
        found = [ALLOCATORS.get(self.allocator)]
        if self.scoring is not None:
            found.append(SCORING.get(self.scoring))
        found.append(SOLVERS.get(self.solver))
        return found + ([RECONSTRUCTION.get(self.reconstruct)] if self.reconstruct else [])

    def settings_of(self, entry: Entry) -> dict[str, Any]:
        """The @key=value settings that belong to ``entry`` (keyed by the parameter's name)."""
        taken = {}
        for key, value in self.params:
            owner = next((e for e in self.owners() if e.param(key) is not None), None)
            if owner is entry:
                param = entry.param(key)
                assert param is not None
                taken[param.name] = value
        return taken

    def allocator_settings(self) -> dict[str, Any]:
        return self.settings_of(ALLOCATORS.get(self.allocator))

    def scoring_settings(self) -> dict[str, Any]:
        return self.settings_of(SCORING.get(self.scoring)) if self.scoring else {}

    def solver_settings(self) -> dict[str, Any]:
        return self.settings_of(SOLVERS.get(self.solver))

    def reconstruct_settings(self) -> dict[str, Any]:
        return self.settings_of(RECONSTRUCTION.get(self.reconstruct)) if self.reconstruct else {}

    def scoring_settings_at(self, sparsity: float) -> dict[str, Any]:
        """The scoring settings for one target: a method that scores for one sparsity (the search)
        gets ``target`` unless the spec gave one."""
        settings = self.scoring_settings()
        return with_target(self.scoring, settings, sparsity) if self.scoring is not None else settings

    def score_key(self) -> str | None:
        """What identifies this method's scores: methods with equal keys share one scores doc."""
        if self.scoring is None or self.peer:
            return None
        given = self.scoring_settings()
        entry = SCORING.get(self.scoring)
        shown = {k: v for k, v in given.items() if v != entry.defaults().get(k)}
        return self.scoring + (
            "@" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(shown.items()))
            if shown
            else ""
        )


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def _parse_params(text: str, tail: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in filter(None, tail.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise PlanError(f"method {text!r}: parameters are key=value, got {item!r}")
        params[key.strip()] = _value(value.strip())
    return params


def parse_method(text: str) -> MethodSpec:
    """Parse ``ALLOCATOR[-SCORING]:SOLVER[+RECONSTRUCTION][@k=v,...]`` (see the module docstring).

    Allocators, scoring methods, solvers and the @keys come from the registries; a scoring method
    left out is the allocator's default, the same one ``ecoflap prune`` uses.
    """
    raw = ALIASES.get(text.strip(), text.strip())
    head, _, tail = raw.partition("@")
    left, sep, right = head.partition(":")
    solver, plus, reconstruct = right.partition("+")
    if not sep or not left or not solver or (plus and not reconstruct):
        raise PlanError(
            f"method {text!r}: write ALLOCATOR[-SCORING]:SOLVER[+RECONSTRUCTION], e.g. uniform:wanda, "
            "ecoflap-zeroth:wanda or mix:wanda+sublayer"
        )
    params = _parse_params(text, tail)
    if left in PEERS:
        if plus:
            raise PlanError(f"method {text!r}: llm-compressor runs take no reconstruction")
        if solver not in PEER_SOLVERS:
            raise PlanError(f"method {text!r}: llm-compressor solvers are {', '.join(PEER_SOLVERS)}")
        unknown = set(params) - set(PEERS[left])
        if unknown:
            allowed = ", ".join(sorted(PEERS[left])) or "none"
            raise PlanError(f"method {text!r}: unknown parameter(s) {', '.join(sorted(unknown))} (allowed: {allowed})")
        return MethodSpec(left, None, solver, tuple(sorted({**PEERS[left], **params}.items())))
    allocator, _, scoring_text = left.partition("-")
    if allocator not in ALLOCATORS:
        raise PlanError(
            f"method {text!r}: unknown allocator {allocator!r} (choose from {', '.join([*ALLOCATORS.names(), *PEERS])})"
        )
    entry = ALLOCATORS.get(allocator)
    try:
        scoring = scoring_for(entry, scoring_text or None)
        SOLVERS.get(solver)
        if plus:
            RECONSTRUCTION.get(reconstruct)
    except PlanError as exc:
        raise PlanError(f"method {text!r}: {exc}") from None
    spec = MethodSpec(allocator, scoring, solver, reconstruct=reconstruct or None)
    _check_params(text, spec, params)
    if entry.extra.get("name_with_defaults"):
        named = [entry, *([SCORING.get(scoring)] if scoring else [])]
        params = {**{p.name: p.default for e in named for p in e.params}, **params}
    return MethodSpec(allocator, scoring, solver, tuple(sorted(params.items())), reconstruct or None)


def _check_params(text: str, spec: MethodSpec, params: dict[str, Any]) -> None:
    owners = spec.owners()
    unknown = [k for k in params if not any(e.param(k) is not None for e in owners)]
    if unknown:
        allowed = ", ".join(sorted({k for e in owners for p in e.params for k in p.keys()})) or "none"
        raise PlanError(f"method {text!r}: unknown parameter(s) {', '.join(sorted(unknown))} (allowed: {allowed})")
    for key, value in params.items():
        owner = next(e for e in owners if e.param(key) is not None)
        param = owner.param(key)
        assert param is not None
        try:
            param.check(value, owner.name)
        except PlanError as exc:
            raise PlanError(f"method {text!r}: {exc}") from None


# --- configuration --------------------------------------------------------------------------


@dataclass(kw_only=True)
class SweepConfig(SweepRequest):
    """A sweep's settings (declared once, in ``stages.requests.SweepRequest``) and what follows
    from them: the method specs, the checks, the cache fingerprints."""

    def specs(self) -> list[MethodSpec]:
        return [parse_method(m) for m in self.methods]

    def validate(self) -> None:
        """The sweep's own rules (``check()``, inherited from the request, checks every field's type
        and range first): methods and sparsities given, once each, the texts exist."""
        super().validate()
        if not self.methods:
            raise PlanError("give at least one --method")
        specs = self.specs()
        if len({s.name for s in specs}) != len(specs):
            raise PlanError("the same method is given twice")
        if not self.sparsities:
            raise PlanError("give at least one --sparsity")
        for p in self.sparsities:
            if not 0.0 <= p < 1.0:
                raise PlanError(f"--sparsity must be in [0, 1), got {p}")
        if self.repeats < 1:
            raise PlanError("--repeats must be at least 1")
        sources = [name for name, _ in parse_calib_spec(self.calib) if name != SELF_SOURCE]
        for path, what in (
            *((source, "--calib") for source in sources),
            (self.text, "--text"),
            *((t, "--extra-text") for t in self.extra_texts or []),
        ):
            if not Path(path).is_file():
                raise PlanError(f"{what} file not found: {path}")

    def fingerprint(self) -> dict[str, Any]:
        """What a cached run depends on (not: methods list, repeats, isolation, output)."""

        ident = content_id
        return {
            "model": ident(self.model),
            "calib": calib_id(self.calib),
            "text": ident(self.text),
            "samples": self.samples,
            "seqlen": self.seqlen,
            "score_samples": self.score_samples,
            "score_seqlen": self.score_seqlen,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "eval_seqlen": self.eval_seqlen,
            "eval_windows": self.eval_windows,
            "dtype": self.dtype,
            "llmc_batch_size": self.llmc_batch_size,
            "ecoflap": __version__,
            **({"extra_texts": [ident(t) for t in self.extra_texts]} if self.extra_texts else {}),
        }

    def extra_names(self) -> list[str]:
        return [Path(t).stem for t in self.extra_texts or []]

    def score_fingerprint(self) -> dict[str, Any]:
        """What scores depend on: the model and the scoring calibration (not the eval text)."""
        keys = ("model", "calib", "score_samples", "score_seqlen", "seqlen", "batch_size", "seed", "dtype", "ecoflap")
        return {k: v for k, v in self.fingerprint().items() if k in keys}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def content_id(path: str) -> str:
    """What a cached run depends on of an input: the sha256 of a file's bytes, of every file of a
    model directory, or a hub id as it is (replaced weights under the same path are new content)."""
    p = Path(path).expanduser()
    if p.is_file():
        return "sha256:" + _file_digest(*_stamp(p))
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return "dir:" + artifacts.content_hash({str(f.relative_to(p)): _file_digest(*_stamp(f)) for f in files})
    return str(path)


def calib_id(calib: str) -> Any:
    """What a cached run depends on of ``--calib``: one file's content id, or for a mix or ``self``
    each source's id (the model's own text: its recipe) with its weight."""
    spec = parse_calib_spec(calib)
    if len(spec) == 1 and spec[0][0] != SELF_SOURCE:
        return content_id(calib)
    from ecoflap_cli.data.self_calib import DEFAULT_RECIPE

    return [
        [DEFAULT_RECIPE.to_dict() if name == SELF_SOURCE else content_id(name), round(weight, 9)]
        for name, weight in spec
    ]


def _stamp(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, _size: int, _mtime_ns: int, _inode: int) -> str:
    """A file's sha256, computed once per version of the file (size, mtime and inode) in a process."""
    return sha256_file(path)


def run_key(cfg: SweepConfig, method: str, sparsity: float) -> str:
    return artifacts.content_hash({"cfg": cfg.fingerprint(), "method": method, "sparsity": round(sparsity, 6)})


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name)


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark in MiB.

    Linux: ``VmHWM`` from /proc/self/status, which starts afresh at exec. ``ru_maxrss`` does not:
    a child inherits its parent's high-water mark across fork and exec, so a subprocess would
    report at least its parent's peak. Elsewhere: ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


# --- the runner -----------------------------------------------------------------------------


class SweepRunner:
    """Runs (method, sparsity) pairs against one loaded model, reusing every stage it can."""

    def __init__(self, cfg: SweepConfig, log: Log | None = None, peer: Any = None) -> None:
        self.cfg = cfg
        #: runs the methods of another tool (``llmc:*``): an object with ``run(runner, spec,
        #: sparsity)`` and ``retime(runner, spec, sparsity, record)``; the benchmarks provide one
        #: (``bench.sweep_report.LlmcPeer``), the library none
        self.peer = peer
        self.log = log or (lambda message: None)
        self.out = Path(cfg.output)
        self.counters: Counter[str] = Counter()  # how often each reusable stage was computed
        self._loaded: LoadedModel | None = None
        self._adapter: Any = None
        self._dense: dict[str, torch.Tensor] | None = None
        self._dirty = False
        self._prune_data: tuple[list[Any], dict[str, Any]] | None = None
        #: seconds spent building the calibration data (once a process; self-generation's cost)
        self.data_s: dict[str, float] = {}
        self._score_data: tuple[list[Any], dict[str, Any]] | None = None
        self._windows: dict[str, torch.Tensor] = {}  # text path -> evaluation windows
        self._scores: dict[str, tuple[dict[str, Any], float]] = {}
        self._structure: dict[str, Any] | None = None
        self._last_cpu_s = 0.0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

    # -- reusable stages --
    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self.log(f"loading {self.cfg.model}")
            self._loaded = load_model(self.cfg.model, LoadOptions(dtype=self.cfg.dtype, device=self.cfg.device))
            self.counters["load"] += 1
            self._adapter = load_adapter(self._loaded)
            # the dense weights, once, on the CPU: restored by load_state_dict before every run
            self._dense = {k: v.detach().to("cpu", copy=True) for k, v in self._loaded.model.state_dict().items()}
        return self._loaded

    @property
    def adapter(self) -> Any:
        _ = self.loaded
        return self._adapter

    def restore(self) -> None:
        """Put the dense weights back (no reload from disk)."""
        if self._dirty:
            assert self._dense is not None
            self.loaded.model.load_state_dict(self._dense)
            self.counters["restore"] += 1
            self._dirty = False

    def mark_dirty(self) -> None:
        """The model's weights were changed: restore them before the next run."""
        self._dirty = True

    def prune_data(self) -> tuple[list[Any], dict[str, Any]]:
        if self._prune_data is None:
            self._prune_data = self._calibration(self.cfg.samples, self.cfg.seqlen, "calib_s")
            self.counters["calibration"] += 1
        return self._prune_data

    def score_data(self) -> tuple[list[Any], dict[str, Any]]:
        if self._score_data is None:
            seqlen = self.cfg.score_seqlen or self.cfg.seqlen
            self._score_data = self._calibration(self.cfg.score_samples, seqlen, "score_calib_s")
            self.counters["score_calibration"] += 1
        return self._score_data

    def _calibration(self, samples: int, seqlen: int | None, timing: str) -> tuple[list[Any], dict[str, Any]]:
        """Calibration batches from ``--calib`` (built once a process by the callers), timed into
        ``data_s[timing]``: self-generation's cost is charged to the runs that use the data."""
        cfg = self.cfg
        opts = CalibrationOptions(cfg.calib, samples, seqlen, cfg.batch_size, cfg.seed, cfg.text_field)
        start = time.perf_counter()
        data = calibration_batches(self.loaded, self.adapter, opts)
        self.data_s[timing] = round(time.perf_counter() - start, 3)
        return data

    def eval_windows(self, path: str | None = None) -> torch.Tensor:
        """Evaluation windows of a text (default: the main one), tokenised once per text."""
        path = path or self.cfg.text
        if path not in self._windows:
            tokens = tokenize_documents(self.loaded.tokenizer, read_text(path, self.cfg.text_field))
            self._windows[path] = windows_for_eval(tokens, self.cfg.eval_seqlen, self.cfg.eval_windows)
            self.counters["eval_windows"] += 1
        return self._windows[path]

    def extra_perplexities(self) -> dict[str, float]:
        """Perplexity of the current model on each extra text."""
        return {
            name: perplexity(self.loaded.model, self.eval_windows(path), self.cfg.eval_batch_size)
            for name, path in zip(self.cfg.extra_names(), self.cfg.extra_texts or [])
        }

    def scores(self, spec: MethodSpec, sparsity: float) -> tuple[dict[str, Any], float, bool]:
        """(scores doc, seconds it took to compute, reused?) for a method's scoring; once per key.

        The scores come from the driver's one-shot path (what ``ecoflap prune --sparsity`` runs),
        with this runner's cache in front of it. A scoring method that works for one target (the
        search) is run, and cached, per sparsity.
        """
        key = spec.score_key()
        settings = spec.scoring_settings_at(sparsity)
        if key is not None and settings != spec.scoring_settings():
            key = f"{key}{'@' if '@' not in key else ','}target={sparsity:g}"
        if key is None:
            if self._structure is None:
                self._structure = driver.structure_document(self.loaded, self.adapter)
            return self._structure, 0.0, True
        if key in self._scores:
            doc, seconds = self._scores[key]
            return doc, seconds, True
        path = self.out / "scores" / f"{safe_name(key)}-{artifacts.content_hash(self.cfg.score_fingerprint())}.json"
        if self.cfg.resume and path.is_file():
            cached = json.loads(path.read_text())
            self._scores[key] = (cached["doc"], cached["seconds"])
            self.log(f"scores {key}: reused from {path.name}")
            return cached["doc"], cached["seconds"], True
        self.restore()
        batches, prov = self.score_data()
        self.log(f"scoring: {key} ({len(batches)} batches)")
        start = time.perf_counter()
        assert spec.scoring is not None
        doc = driver.score(self.loaded, self.adapter, batches, prov, spec.scoring, settings, seed=self.cfg.seed)
        seconds = time.perf_counter() - start
        self.counters[f"score:{key}"] += 1
        self._scores[key] = (doc, seconds)
        artifacts.write_atomic(path, json.dumps({"key": key, "seconds": seconds, "doc": doc}).encode())
        return doc, seconds, False

    def plan(self, spec: MethodSpec, sparsity: float, scores_doc: dict[str, Any]) -> dict[str, Any]:
        return driver.allocate(scores_doc, sparsity, spec.allocator, spec.allocator_settings())

    # -- runs --
    def dense(self) -> dict[str, Any]:
        cached = self._cached("dense", 0.0)
        if cached is not None:
            return cached
        self.restore()
        windows = self.eval_windows()
        self.log(f"dense perplexity on {windows.shape[0]} x {windows.shape[1]} tokens")
        start = time.perf_counter()
        ppl = perplexity(self.loaded.model, windows, self.cfg.eval_batch_size)
        record = {
            "method": "dense",
            "sparsity": 0.0,
            "achieved_sparsity": 0.0,
            "ppl": ppl,
            "times": {"eval_s": round(time.perf_counter() - start, 3)},
        }
        if self.cfg.extra_texts:
            record["ppl_extra"] = self.extra_perplexities()
        return self.save("dense", 0.0, record)

    def run(self, spec: MethodSpec, sparsity: float) -> dict[str, Any]:
        """Score (once per scoring method), allocate, prune, evaluate one (method, sparsity)."""
        cached = self._cached(spec.name, sparsity)
        if cached is not None:
            return cached
        if spec.peer:
            if self.peer is None:
                raise PlanError(f"{spec.name} is another tool's method: run it from the benchmarks")
            return dict(self.peer.run(self, spec, sparsity))
        record: dict[str, Any] = self.record_of(spec, sparsity)
        try:
            scores_doc, score_s, reused = self.scores(spec, sparsity)
            start = time.perf_counter()
            plan = self.plan(spec, sparsity, scores_doc)
            allocate_s = time.perf_counter() - start
            prune_s = self._prune(spec, plan)
            windows = self.eval_windows()
            start = time.perf_counter()
            ppl = perplexity(self.loaded.model, windows, self.cfg.eval_batch_size)
            eval_s = time.perf_counter() - start
            if self.cfg.extra_texts:
                record["ppl_extra"] = self.extra_perplexities()
            rows = sparsity_report(self.adapter, plan)
            zeros, total = sum(r.zeros for r in rows), sum(r.numel for r in rows)
            record.update(
                ppl=ppl,
                achieved_sparsity=zeros / total,
                planned_sparsity=plan["achieved_sparsity"],
                plan_matches=all(r.matches_plan for r in rows),
                block_sparsity=[round(g["sparsity"], 5) for g in plan["groups"]],
                times={
                    "score_s": round(score_s, 3),
                    "score_reused": reused,
                    "allocate_s": round(allocate_s, 4),
                    "prune_s": [round(prune_s, 3)],
                    "prune_cpu_s": [self._last_cpu_s],
                    "eval_s": round(eval_s, 3),
                    **self.data_s,
                },
            )
            if self._prune_data is not None:
                record["calibration"] = self._prune_data[1]
        except EcoflapError as exc:
            record["error"] = str(exc)
        record["peak_rss_mib"] = peak_rss_mib()
        return self.save(spec.name, sparsity, record)

    def retime(self, spec: MethodSpec, sparsity: float, record: dict[str, Any]) -> dict[str, Any]:
        """One more measurement of the prune stage alone (for medians over repeats)."""
        if "error" in record:
            return record
        if spec.peer:
            if self.peer is not None:
                self.peer.retime(self, spec, sparsity, record)
        else:
            scores_doc, _, _ = self.scores(spec, sparsity)
            plan = self.plan(spec, sparsity, scores_doc)
            record["times"]["prune_s"].append(round(self._prune(spec, plan), 3))
            record["times"].setdefault("prune_cpu_s", []).append(self._last_cpu_s)
        if not spec.peer:  # a peer record keeps the runner's own peak
            record["peak_rss_mib"] = max(record.get("peak_rss_mib") or 0.0, peak_rss_mib())
        return self.save(spec.name, sparsity, record)

    def _prune(self, spec: MethodSpec, plan: dict[str, Any]) -> float:
        self.restore()
        settings = PruneSettings(
            spec.solver,
            solver_settings=spec.solver_settings(),
            reconstruct=spec.reconstruct,
            reconstruct_settings=spec.reconstruct_settings(),
            seed=self.cfg.seed,
        )
        batches, prov = self.prune_data() if settings.needs_data else ([], None)
        self.mark_dirty()
        start, cpu = time.perf_counter(), time.process_time()
        driver.prune(self.loaded, self.adapter, plan, batches, prov, settings)
        self._last_cpu_s = round(time.process_time() - cpu, 3)
        return time.perf_counter() - start

    def record_of(self, spec: MethodSpec, sparsity: float) -> dict[str, Any]:
        return {
            "method": spec.name,
            "library": "llm-compressor" if spec.peer else "ecoflap",
            "allocator": spec.allocator,
            "scoring": spec.scoring,
            "solver": spec.solver,
            "reconstruct": spec.reconstruct,
            "params": spec.param,
            "sparsity": sparsity,
            "isolated": self.cfg.isolate,
            "threads": torch.get_num_threads(),
        }

    # -- the run cache --
    def _path(self, method: str, sparsity: float) -> Path:
        return self.out / "runs" / f"{safe_name(method)}-{sparsity:g}-{run_key(self.cfg, method, sparsity)}.json"

    def _cached(self, method: str, sparsity: float) -> dict[str, Any] | None:
        path = self._path(method, sparsity)
        if self.cfg.resume and path.is_file():
            record = json.loads(path.read_text())
            if "error" not in record:
                self.log(f"{method} at {sparsity:g}: reused from {path.name}")
                return record
        return None

    def load_record(self, method: str, sparsity: float) -> dict[str, Any] | None:
        path = self._path(method, sparsity)
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, method: str, sparsity: float, record: dict[str, Any]) -> dict[str, Any]:
        record["key"] = run_key(self.cfg, method, sparsity)
        artifacts.write_atomic(self._path(method, sparsity), json.dumps(record, indent=1).encode())
        return record

    # -- passes --
    def _timing_names(self) -> set[str]:
        return {parse_method(m).name for m in self.cfg.timing_methods or []}

    def run_pass(self, specs: Sequence[MethodSpec], repeat: int, include_dense: bool = True) -> None:
        """Pass 0 runs everything; pass r >= 1 re-times the prune stage of each run once more.

        Sparsity is the outer loop and methods the inner one, so methods interleave in time and
        machine noise spreads over all of them alike.
        """
        if repeat == 0 and include_dense:
            self.dense()
        for sparsity in self.cfg.sparsities:
            for spec in specs:
                if repeat == 0:
                    record = self.run(spec, sparsity)
                    ppl = record.get("ppl")
                    outcome = f"ppl {ppl:.2f}" if ppl else f"error: {record.get('error')}"
                    self.log(f"{spec.name} at {sparsity:g}: {outcome}")
                    continue
                if self.cfg.timing_methods is not None and spec.name not in self._timing_names():
                    continue
                if self.cfg.timing_sparsities is not None and sparsity not in self.cfg.timing_sparsities:
                    continue
                cached = self.load_record(spec.name, sparsity)
                if cached is None or "error" in cached or len(cached["times"]["prune_s"]) > repeat:
                    continue
                self.retime(spec, sparsity, cached)


# --- orchestration --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = total_memory()
    if total is not None:
        info["memory_gib"] = round(total / 2**30, 1)
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return info


def run_sweep(cfg: SweepConfig, log: Log | None = None, peer: Any = None) -> dict[str, Any]:
    """Run every (method, sparsity) in this process and write OUT/sweep.json; returns the summary.
    (The benchmarks add process isolation, other tools' methods and the markdown tables and plot:
    ``bench.sweep_report``.)"""
    cfg.check()
    log = log or (lambda message: None)
    out = Path(cfg.output)
    specs = cfg.specs()
    if peer is None and any(s.peer for s in specs):
        raise PlanError(
            "llmc:* methods compare ecoflap with llm-compressor: run them from the benchmarks "
            "(python -m ecoflap_cli.bench.quality; docs/benchmarks.md)"
        )
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = machine_info().get("load_average")
    runner = SweepRunner(cfg, log, peer)
    for repeat in range(cfg.repeats):
        runner.run_pass(specs, repeat)
    summary = collect(cfg, runner, specs)
    summary["machine"] = machine_info()
    summary["machine"]["load_average_at_start"] = load_before
    summary["wall_s"] = round(time.time() - started, 1)
    summary["counters"] = dict(runner.counters)
    artifacts.write_atomic(out / "sweep.json", (json.dumps(summary, indent=2) + "\n").encode())
    log(f"results -> {out / 'sweep.json'}")
    return summary


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def collect(cfg: SweepConfig, runner: SweepRunner, specs: Sequence[MethodSpec]) -> dict[str, Any]:
    """Gather the cached run records into one summary document (with ours/peer time ratios)."""
    dense = runner.load_record("dense", 0.0)
    runs = []
    for spec in specs:
        for p in cfg.sparsities:
            record = runner.load_record(spec.name, p)
            if record is None:
                record = {"method": spec.name, "sparsity": p, "error": "not run"}
            times = record.get("times", {})
            if times.get("prune_s"):
                times["prune_median_s"] = _median(times["prune_s"])
                times["prune_n"] = len(times["prune_s"])
            if times.get("prune_cpu_s"):
                times["prune_cpu_median_s"] = _median(times["prune_cpu_s"])
            runs.append(record)
    return {
        "format": "ecoflap.sweep",
        "version": 1,
        "ecoflap_version": __version__,
        "config": cfg.to_dict(),
        "dense": dense,
        "runs": runs,
    }
