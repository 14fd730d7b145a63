"""Loading models: a hub id or local directory, or a local GGUF file, with accelerate placement."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MissingDependencyError, ModelError

#: config.model_type -> transformers class, for families that are not plain causal LMs.
MODEL_CLASSES = {
    "blip-2": "Blip2ForConditionalGeneration",
    "instructblip": "InstructBlipForConditionalGeneration",
    "clip": "CLIPModel",
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadOptions:
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    device_map: str | None = None  # "auto", "balanced", "sequential" or a JSON map
    max_memory: dict[str, str] = field(default_factory=dict)
    offload_folder: str | None = None


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any  # tokenizer or multimodal processor, None when the model ships none
    source: str
    gguf_file: str | None = None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)


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


def _model_class(model_type: str | None) -> Any:
    import transformers

    name = MODEL_CLASSES.get(model_type or "", "AutoModelForCausalLM")
    return getattr(transformers, name)


def _placement(opts: LoadOptions) -> dict[str, Any]:
    if opts.device_map is None:
        return {}
    device_map: Any = opts.device_map
    if device_map.strip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as exc:
            raise ModelError(f"--device-map is not valid JSON: {exc.msg}") from None
    placement: dict[str, Any] = {"device_map": device_map}
    if opts.max_memory:
        placement["max_memory"] = {(int(k) if k.isdigit() else k): v for k, v in opts.max_memory.items()}
    if opts.offload_folder:
        placement["offload_folder"] = opts.offload_folder
    return placement


def quiet_transformers() -> None:
    """Our own progress goes to stderr; transformers' per-file bars and info logs would clutter it."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def load_model(source: str, opts: LoadOptions | None = None) -> LoadedModel:
    """Load a model and its processor; raises ModelError with one line on any failure."""
    opts = opts or LoadOptions()
    quiet_transformers()
    path = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"model path not found: {source}")
    if path.suffix == ".gguf":
        return _load_gguf(path, opts)
    if path.is_dir():
        from .checkpoint import is_packed_checkpoint

        if is_packed_checkpoint(path):
            return _load_packed(path, source, opts)
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=opts.trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load model {source!r}: {_first_line(exc)}") from None
    cls = _model_class(getattr(config, "model_type", None))
    try:
        model = cls.from_pretrained(
            source, dtype=resolve_dtype(opts.dtype), trust_remote_code=opts.trust_remote_code,
            **_placement(opts),
        )
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        raise ModelError(f"cannot load model {source!r}: {_first_line(exc)}") from None
    if opts.device_map is None:
        model.to(resolve_device(opts.device))
    model.eval()
    return LoadedModel(model, _load_processor(source, opts.trust_remote_code), source)


def _load_packed(path: Path, source: str, opts: LoadOptions) -> LoadedModel:
    """A packed checkpoint written by ``ecoflap prune --packed``: transformers cannot read it."""
    from .api import load_pruned

    dtype = resolve_dtype(opts.dtype)
    model = load_pruned(path, None if dtype == "auto" else dtype, opts.device,
                        trust_remote_code=opts.trust_remote_code, **_placement(opts))
    return LoadedModel(model, _load_processor(source, opts.trust_remote_code), source)


def _load_processor(source: str, trust_remote_code: bool) -> Any:
    import transformers

    for loader in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            return loader.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception:  # noqa: BLE001 - a model may ship only one of them, or none
            continue
    return None


def _load_gguf(path: Path, opts: LoadOptions) -> LoadedModel:
    """Load a GGUF file with transformers, then rebuild it as a plain model that can be saved."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MissingDependencyError("gguf", "loading a .gguf model", "gguf") from None
    import transformers

    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    dtype = resolve_dtype(opts.dtype)
    dtype = torch.float32 if dtype == "auto" else dtype
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelError(f"cannot load GGUF model {str(path)!r}: {_first_line(exc)}") from None
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    model = type(loaded)._from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    if loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    del loaded
    model.to(resolve_device(opts.device)).eval()
    return LoadedModel(model, tokenizer, str(path), gguf_file=path.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's type and parameter names and shapes (not values).

    Plans and scores are tied to a model *structure*: a plan made for another model is refused,
    while the pruned checkpoint of the same model still matches its plan.
    """
    digest = hashlib.sha256()
    digest.update(str(getattr(getattr(model, "config", None), "model_type", "")).encode())
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()[:16]
