"""Model-family adapters, looked up by the model's structure and config.model_type."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ModelError
from .base import Adapter, Batch, Block, BlockInputs
from .causal_lm import CausalLMAdapter

#: config.model_type -> adapter class, for families that need more than the causal-LM default.
REGISTRY: dict[str, Callable[[nn.Module], Adapter]] = {}


def register(*model_types: str) -> Callable[[type[Adapter]], type[Adapter]]:
    def wrap(cls: type[Adapter]) -> type[Adapter]:
        for model_type in model_types:
            REGISTRY[model_type] = cls
        return cls

    return wrap


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded model: a registered family, else the causal-LM default."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REGISTRY:
        return REGISTRY[model_type](model)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"model type {model_type!r} (encoder-decoder) is not supported yet")
    if not hasattr(model, "generate"):
        raise ModelError(
            f"model type {model_type!r} is not a causal LM and has no ecoflap adapter"
        )
    return CausalLMAdapter(model)


__all__ = ["Adapter", "Batch", "Block", "BlockInputs", "REGISTRY", "get_adapter", "register"]

# Family adapters register themselves with @register when imported.
from . import blip2, clip  # noqa: E402,F401
