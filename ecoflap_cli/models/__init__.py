"""Model-family adapters, looked up by the model's structure and config.model_type."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ecoflap_cli.errors import ModelError
from ecoflap_cli.models.base import Adapter, Batch, Block, BlockInputs
from ecoflap_cli.models.causal_lm import CausalLMAdapter

#: config.model_type -> adapter class, for families that need more than the causal-LM default.
REGISTRY: dict[str, Callable[..., Adapter]] = {}


def register(*model_types: str) -> Callable[[type[Adapter]], type[Adapter]]:
    def wrap(cls: type[Adapter]) -> type[Adapter]:
        for model_type in model_types:
            REGISTRY[model_type] = cls
        return cls

    return wrap


def _accepted(factory: Callable[..., Adapter], options: dict[str, Any]) -> dict[str, Any]:
    """The options that ``factory`` takes as keyword arguments (all of them if it takes **kwargs)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(options)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in options.items() if k in names}


def get_adapter(model: nn.Module, **options: Any) -> Adapter:
    """The adapter for a loaded model: a registered family, else the causal-LM default.

    ``options`` (e.g. ``include_qformer=True``) go to the family's adapter; an option a family
    does not have (a causal LM or CLIP has no Q-Former) is ignored.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REGISTRY:
        factory = REGISTRY[model_type]
        return factory(model, **_accepted(factory, options))
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"model type {model_type!r} (encoder-decoder) is not supported yet")
    if not hasattr(model, "generate"):
        raise ModelError(
            f"model type {model_type!r} is not a causal LM and has no ecoflap adapter"
        )
    return CausalLMAdapter(model, **_accepted(CausalLMAdapter, options))


__all__ = ["Adapter", "Batch", "Block", "BlockInputs", "REGISTRY", "get_adapter", "register"]

# Family adapters register themselves with @register when imported.
from ecoflap_cli.models import blip2  # noqa: E402,F401
from ecoflap_cli.models import clip  # noqa: E402,F401
