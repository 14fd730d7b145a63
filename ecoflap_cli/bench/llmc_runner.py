"""Run llm-compressor's one-shot pruning on a saved model: the peer side of `ecoflap sweep`.

This file runs as a *script* inside llm-compressor's own virtual environment (it pins an older
transformers than ecoflap), so it imports only llmcompressor, transformers, torch and the
standard library - never ecoflap. The calling process gives it:

- ``--model DIR``: a plain fp32 safetensors checkpoint (ecoflap exports it from the model it
  evaluates, so both libraries start from the same weights);
- ``--windows FILE``: the calibration token windows, a ``(samples, seqlen)`` int64 tensor saved
  with ``torch.save`` - the very windows ecoflap prunes with, passed as a pre-tokenized dataset;
- ``--modifier wanda|sparsegpt`` and ``--sparsity``, optionally ``--owl-m/--owl-lmbda``.

For each sparsity it reloads the dense model, runs ``oneshot`` (timed alone: wall time of the
``oneshot`` call, nothing else), and writes the pruned weights of the targeted linears to
``OUT/<sparsity>/pruned.safetensors``; the caller loads them into its own model and evaluates.
``--time-only`` skips writing weights (extra timing runs). ``--repeats N`` re-runs ``oneshot`` N
times per sparsity (reloading the model each time, untimed)
and keeps the weights of the last run. A JSON result (times, the modifier's resolved settings,
versions, peak RSS of this process) goes to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path


def _modifier(kind: str, sparsity: float, owl_m: int | None, owl_lmbda: float | None):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    kwargs: dict = {"sparsity": sparsity, "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    if owl_m is not None or owl_lmbda is not None:
        kwargs.update(sparsity_profile="owl", owl_m=owl_m, owl_lmbda=owl_lmbda)
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[kind]
    return cls(**kwargs)


def _dataset(windows_path: str):
    import torch
    from datasets import Dataset

    windows = torch.load(windows_path)
    ids = windows.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}), windows.shape


def _targeted_state(model) -> dict:
    import torch

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}" and "lm_head" not in name:
            out[f"{name}.weight"] = module.weight.detach().to(torch.float32).contiguous().clone()
    return out


def run(args: argparse.Namespace) -> dict:
    import llmcompressor
    import torch
    import transformers
    from llmcompressor import oneshot
    from safetensors.torch import save_file

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset, shape = _dataset(args.windows)
    result: dict = {
        "modifier": args.modifier,
        "owl_m": args.owl_m,
        "owl_lmbda": args.owl_lmbda,
        "samples": int(shape[0]),
        "seqlen": int(shape[1]),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "llmcompressor": getattr(llmcompressor, "__version__", "?"),
        },
        "runs": [],
    }
    out_root = Path(args.out)
    for sparsity in args.sparsity:
        entry: dict = {"sparsity": sparsity, "oneshot_s": [], "oneshot_cpu_s": []}
        try:
            for _ in range(args.repeats):
                model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
                model.eval()
                modifier = _modifier(args.modifier, sparsity, args.owl_m, args.owl_lmbda)
                settings = modifier.model_dump() if hasattr(modifier, "model_dump") else {}
                start, cpu = time.perf_counter(), time.process_time()
                oneshot(
                    model=model,
                    dataset=dataset,
                    recipe=modifier,
                    num_calibration_samples=int(shape[0]),
                    max_seq_length=int(shape[1]),
                    batch_size=args.batch_size,
                    shuffle_calibration_samples=False,
                )
                entry["oneshot_s"].append(round(time.perf_counter() - start, 3))
                entry["oneshot_cpu_s"].append(round(time.process_time() - cpu, 3))
            entry["settings"] = {k: v for k, v in settings.items() if _jsonable(v)}
            state = _targeted_state(model)
            zeros = sum(int((w == 0).sum()) for w in state.values())
            total = sum(w.numel() for w in state.values())
            entry.update(achieved_sparsity=zeros / total, tensors=len(state))
            if not args.time_only:
                target = out_root / f"{sparsity:g}"
                target.mkdir(parents=True, exist_ok=True)
                save_file(state, str(target / "pruned.safetensors"))
                entry["weights"] = str(target / "pruned.safetensors")
            del model, state
        except Exception as exc:  # noqa: BLE001 - report any failure of the peer to the caller
            entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            entry["traceback"] = traceback.format_exc()[-3000:]
        entry["peak_rss_mib"] = _peak_rss_mib()
        result["runs"].append(entry)
    return result


def _peak_rss_mib() -> float:
    """VmHWM (fresh at exec); ru_maxrss would include the parent's peak inherited across fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True)
    parser.add_argument("--modifier", choices=("wanda", "sparsegpt"), required=True)
    parser.add_argument("--sparsity", type=float, nargs="+", required=True)
    parser.add_argument("--owl-m", type=int, default=None)
    parser.add_argument("--owl-lmbda", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--time-only", action="store_true", help="Time oneshot; write no weights.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args)
    tmp = Path(args.result).with_suffix(".part")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.result)
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
