"""Model-family adapters, looked up by config.model_type (and the model's structure).

One registry: each family file decorates its adapter class with :func:`register`, which maps
every ``model_types`` entry to the class. :func:`adapter_class` answers from a model type alone
(loading needs the transformers class before the model exists); :func:`get_adapter` builds the
adapter of a loaded model. Types no family claims are causal LMs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ecoflap_cli.errors import ModelError
from ecoflap_cli.models.base import Adapter, Batch, Block, BlockInputs, RecordText
from ecoflap_cli.models.causal_lm import CausalLMAdapter

#: config.model_type -> adapter class, for families that need more than the causal-LM default.
REGISTRY: dict[str, type[Adapter]] = {}


def register(*args: Any) -> Any:
    """Class decorator: the adapter handles every ``config.model_type`` in its ``model_types``.

    ``@register`` reads the class's ``model_types``; ``@register("type", ...)`` sets them.
    """
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], Adapter):
        return _register(args[0], args[0].model_types)
    if not args or not all(isinstance(a, str) for a in args):
        raise TypeError("use @register or @register('model_type', ...)")
    return lambda cls: _register(cls, tuple(args))


def _register(cls: type[Adapter], model_types: tuple[str, ...]) -> type[Adapter]:
    if not model_types:
        raise TypeError(f"{cls.__name__} declares no model_types")
    for model_type in model_types:
        if REGISTRY.get(model_type, cls) is not cls:
            raise TypeError(
                f"model type {model_type!r} is claimed by {REGISTRY[model_type].__name__} and {cls.__name__}"
            )
        REGISTRY[model_type] = cls
    cls.model_types = tuple(model_types)
    return cls


def adapter_class(model_type: str | None) -> type[Adapter]:
    """The adapter class for a config's model_type, no model needed (default: causal LM)."""
    return REGISTRY.get(model_type or "", CausalLMAdapter)


def families() -> list[type[Adapter]]:
    """Every registered adapter class once, in registration order."""
    return list(dict.fromkeys(REGISTRY.values()))


def families_with_task(task: str) -> list[str]:
    """Display names of the families that support eval ``task``, each once, in registration order."""
    return list(dict.fromkeys(cls.display_name for cls in families() if task in cls.eval_tasks))


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
        raise ModelError(f"model type {model_type!r} is not a causal LM and has no ecoflap adapter")
    return CausalLMAdapter(model, **_accepted(CausalLMAdapter, options))


__all__ = ["Adapter", "Batch", "Block", "BlockInputs", "REGISTRY", "RecordText", "adapter_class",
           "families", "families_with_task", "get_adapter", "register"]  # fmt: skip

# Family adapters register themselves with @register when imported.
from ecoflap_cli.models import blip2, clip, llava, siglip  # noqa: E402,F401
