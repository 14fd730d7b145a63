"""The primitives of reading a model with transformers, shared by the loaders of dense models
(``loading``) and of pruned checkpoints (``pruned``): device and dtype names, the model class of
a config, hub snapshots, and the checks every loaded model passes (weights match the config,
weights are finite)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoflap_cli.errors import ArtifactError, ModelError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when present, then MPS, else CPU."""
    if device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ModelError(f"unknown device {device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r} (choose from auto, {', '.join(sorted(DTYPES))})")
    return DTYPES[name]


def auto_class_for(model_type: str | None) -> Any:
    """The transformers class the family's adapter loads with (``Adapter.loader_class``), known
    from the config's model type before any model exists; AutoModelForCausalLM for the rest."""
    import transformers

    from ecoflap_cli.models import adapter_class

    return getattr(transformers, adapter_class(model_type).loader_class)


def quiet_transformers() -> None:
    """Our own progress goes to stderr; transformers' per-file bars and info logs would clutter it."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def check_loading_info(info: dict[str, Any], source: str) -> None:
    """Refuse a model whose weights do not match its config: weights the config's model needs but
    the checkpoint lacks (they would be random), weights it has that the model has no place for
    (they would be dropped), or weights of the wrong shape. Names a few of them.

    ``info`` is ``from_pretrained(..., output_loading_info=True)``'s; transformers has already left
    out what may legitimately be absent (tied weights, non-persistent buffers, the model class's
    ignore patterns).
    """
    for key, what in (
        ("missing_keys", "lacks weight(s)"),
        ("unexpected_keys", "has weight(s) its config has no place for:"),
        ("mismatched_keys", "has weight(s) of the wrong shape:"),
    ):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise ArtifactError(f"{source} does not match its config.json: it {what} {', '.join(names[:3])}{more}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: elements checked at a time for non-finite values (bounds the temporary mask to 16 MB)
_FINITE_CHUNK = 1 << 24


def first_non_finite(tensor: torch.Tensor) -> int | None:
    """The flat index of the first NaN or infinity in a floating tensor, or None; checked in chunks."""
    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        bad = ~torch.isfinite(flat[start : start + _FINITE_CHUNK])
        if bool(bad.any()):
            return start + int(bad.nonzero()[0, 0])
    return None


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Refuse a model whose weights hold NaN or infinity: one ModelError line naming the first such
    tensor and the value, before any statistics are gathered or a weight is pruned (their scores,
    masks and the saved checkpoint would all be NaN). Weights offloaded to disk or CPU storage
    (on the meta device) are not read here."""
    for name, param in model.named_parameters():
        index = first_non_finite(param)
        if index is not None:
            value = param.detach().reshape(-1)[index].item()
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), param.shape))
            raise ModelError(
                f"{source}: weight {name} holds {value} at {list(where)}: NaN or infinite weights cannot be "
                "scored, pruned or evaluated (repair or re-export the checkpoint)"
            )


_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def packed_hub_snapshot(source: str, revision: str | None = None, cache_dir: str | None = None) -> Path | None:
    """The local snapshot (downloaded, or found in the cache offline) of hub repository ``source``
    when its config marks an ecoflap packed checkpoint; None for anything else (a dense hub model,
    a name that is no repository, a hub that cannot be reached): those go to transformers."""
    if not _HUB_REPO.match(source) or source.endswith((".gguf", ".json", ".safetensors")):
        return None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        config_path = hf_hub_download(source, "config.json", revision=revision, cache_dir=cache_dir)
        config = json.loads(Path(config_path).read_bytes())
        if not (isinstance(config, dict) and "ecoflap_packed" in config):
            return None
        return Path(snapshot_download(source, revision=revision, cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - not a packed hub checkpoint we can reach: transformers reports it
        return None


def hub_snapshot(source: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """The local snapshot directory of hub repository ``source`` (from the cache when offline);
    ModelError with one line when it is no repository name or cannot be found."""
    if not _HUB_REPO.match(source):
        raise ModelError(f"model path not found: {source}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - offline without a cached copy, unknown repository, ...
        raise ModelError(f"cannot find {source!r} locally or on the hub: {first_line(exc)}") from None
