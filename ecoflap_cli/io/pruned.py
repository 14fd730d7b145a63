"""The package API for pruned checkpoints.

    from ecoflap_cli.io.pruned import load_pruned

    model = load_pruned("out/")                      # dense or packed, as written by `ecoflap prune`
    model = load_pruned("out/", dtype="bfloat16", device="cuda")

Packed checkpoints (``ecoflap prune --packed``) need this loader: plain ``from_pretrained`` cannot
read the packed layout. Dense ones load either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoflap_cli.errors import ArtifactError, ModelError
from ecoflap_cli.io.checkpoint import checkpoint_layout
from ecoflap_cli.io.loading import _first_line, _model_class, quiet_transformers, resolve_device, resolve_dtype
from ecoflap_cli.io.packed import load_sharded

__all__ = ["load_pruned", "model_class"]


def model_class(config: Any) -> type:
    """The transformers class for a config: by ``model_type`` as ``ecoflap`` loads it, resolved
    to the concrete class (``LlamaForCausalLM``, ...) when that is an Auto class."""
    cls = _model_class(getattr(config, "model_type", None))
    mapping = getattr(cls, "_model_mapping", None)  # only Auto* classes have one
    if mapping is None:
        return cls
    try:
        return mapping[type(config)]
    except KeyError:
        raise ModelError(f"no {cls.__name__} class for model type {config.model_type!r}") from None


def load_pruned(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    trust_remote_code: bool = False,
    **from_pretrained: Any,
) -> nn.Module:
    """Load a pruned checkpoint directory, dense or packed, as the class its config records.

    ``dtype`` None keeps the checkpoint's dtype (as ``dtype="auto"``); tied weights are tied as by
    ``from_pretrained``. Extra keywords (``device_map``, ``max_memory``, ...) go to
    ``from_pretrained``; with a ``device_map`` the model is not moved to ``device``. Every weight
    must come from the checkpoint: a missing, unexpected or mis-shaped tensor raises ArtifactError,
    an unreadable or corrupt file too. The model is returned in eval mode.
    """
    import transformers

    quiet_transformers()
    directory = Path(directory)
    layout = checkpoint_layout(directory) if directory.is_dir() else None
    if layout is None:
        raise ArtifactError(f"{directory} is not a checkpoint directory with safetensors weights")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise ModelError(f"cannot read the config of {directory}: {_first_line(exc)}") from None
    cls = model_class(config)
    dtype_arg = "auto" if dtype is None else dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    kwargs: dict[str, Any] = dict(
        config=config, dtype=dtype_arg, trust_remote_code=trust_remote_code, output_loading_info=True, **from_pretrained
    )
    if layout == "packed":
        source, kwargs["state_dict"] = None, load_sharded(directory)
    else:
        source = str(directory)
    try:
        model, info = cls.from_pretrained(source, **kwargs)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        raise ModelError(f"cannot load {directory}: {_first_line(exc)}") from None
    _check_complete(info, directory)
    model.tie_weights()
    if "device_map" not in from_pretrained:
        model.to(resolve_device(str(device)))
    return model.eval()


def _check_complete(info: dict[str, Any], directory: Path) -> None:
    """Refuse a model any of whose weights did not come from the checkpoint."""
    for key, what in (
        ("missing_keys", "lacks"),
        ("unexpected_keys", "has unexpected"),
        ("mismatched_keys", "has mis-shaped"),
    ):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise ArtifactError(f"{directory} {what} weight(s) {', '.join(names[:3])}{more}")
