"""The package API for pruned checkpoints.

    from ecoflap_cli.io.pruned import load_pruned

    model = load_pruned("out/")                      # dense or packed, as written by `ecoflap prune`
    model = load_pruned("out/", dtype="bfloat16", device="cuda")

Packed checkpoints (``ecoflap prune --packed``) need this loader: plain ``from_pretrained`` cannot
read the packed layout. Dense ones load either way.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ecoflap_cli.errors import ArtifactError, ModelError
from ecoflap_cli.io.layout import checkpoint_layout, clear_packed_marker, verify_checksums, weight_files
from ecoflap_cli.io.packed import check_readable, load_sharded
from ecoflap_cli.io.reading import (
    auto_class_for,
    check_loading_info,
    first_line,
    hub_snapshot,
    quiet_transformers,
    resolve_device,
    resolve_dtype,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["load_pruned", "model_class"]


def model_class(config: Any) -> type[PreTrainedModel]:
    """The transformers class for a config: by ``model_type`` as ``ecoflap`` loads it, resolved
    to the concrete class (``LlamaForCausalLM``, ...) when that is an Auto class."""
    cls = auto_class_for(getattr(config, "model_type", None))
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
    verify: bool = True,
    **from_pretrained: Any,
) -> nn.Module:
    """Load a pruned checkpoint directory, dense or packed, as the class its config records; a hub
    id loads from its snapshot (the Hugging Face cache, downloaded when online; ``revision`` and
    ``cache_dir`` keywords select it).

    ``dtype`` None keeps the checkpoint's dtype (as ``dtype="auto"``); tied weights are tied as by
    ``from_pretrained``. Extra keywords (``device_map``, ``max_memory``, ...) go to
    ``from_pretrained``; with a ``device_map`` the model is not moved to ``device``. Every weight
    must come from the checkpoint: a missing, unexpected or mis-shaped tensor raises ArtifactError,
    an unreadable or corrupt file too. With ``verify`` (the default) every weight file is first
    checked against the sha256 the checkpoint records (a checkpoint that records none loads with
    a warning). The model is returned in eval mode.
    """
    model, note = load_pruned_checked(
        directory, dtype, device, trust_remote_code=trust_remote_code, verify=verify, **from_pretrained
    )
    if note:
        warnings.warn(note, stacklevel=2)
    return model


def load_pruned_checked(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    trust_remote_code: bool = False,
    verify: bool = True,
    **from_pretrained: Any,
) -> tuple[nn.Module, str | None]:
    """:func:`load_pruned`, returning ``(model, note)``: the note says why the weights were not
    verified (None when they were, or ``verify`` is False)."""
    import transformers

    quiet_transformers()
    if not Path(directory).exists():  # a hub id: its snapshot in the cache (downloaded when online)
        directory = hub_snapshot(
            str(directory), from_pretrained.pop("revision", None), from_pretrained.pop("cache_dir", None)
        )
    directory = Path(directory)
    note = verify_checksums(directory) if verify and directory.is_dir() else None
    layout = checkpoint_layout(directory) if directory.is_dir() else None
    if layout is None:
        raise ArtifactError(f"{directory} is not a checkpoint directory with safetensors weights")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise ModelError(f"cannot read the config of {directory}: {first_line(exc)}") from None
    clear_packed_marker(config)
    cls = model_class(config)
    dtype_arg = "auto" if dtype is None else dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    kwargs: dict[str, Any] = dict(
        config=config, dtype=dtype_arg, trust_remote_code=trust_remote_code, output_loading_info=True, **from_pretrained
    )
    kwargs["ignore_mismatched_sizes"] = True  # wrong shapes come back in info, named by check_loading_info
    if layout == "packed":
        source, kwargs["state_dict"] = None, load_sharded(directory, _expected_shapes(cls, config))
    else:
        source = str(directory)
        check_readable(weight_files(directory))
    try:
        # transformers annotates from_pretrained as returning the model, also with output_loading_info
        model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", cls.from_pretrained(source, **kwargs))
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        raise ModelError(f"cannot load {directory}: {first_line(exc)}") from None
    check_loading_info(info, str(directory))
    model.tie_weights()
    if "device_map" not in from_pretrained:
        # transformers decorates PreTrainedModel.to with functools.wraps(nn.Module.to): typed unbound
        model.to(resolve_device(str(device)))  # type: ignore[arg-type]
    return model.eval(), note


def _expected_shapes(cls: Any, config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the model the config describes, built on the meta device:
    packed tensors are checked against them before they are expanded."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=True):
            skeleton = cls._from_config(config)
    except Exception:  # noqa: BLE001 - a config transformers cannot build: from_pretrained reports it
        return {}
    return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
