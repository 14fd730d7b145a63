"""Loading models: a hub id or local directory, or a local GGUF file, with accelerate placement."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ecoflap_cli.core.units import parse_size
from ecoflap_cli.errors import EcoflapError, MissingDependencyError, ModelError
from ecoflap_cli.io.reading import (
    auto_class_for,
    check_finite_weights,
    check_loading_info,
    first_line,
    packed_hub_snapshot,
    quiet_transformers,
    resolve_device,
    resolve_dtype,
)


@dataclass
class LoadOptions:
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    device_map: str | None = None  # "auto", "balanced", "sequential" or a JSON map
    max_memory: dict[str, str] = field(default_factory=dict)
    offload_folder: str | None = None
    #: sequential mode: keep every block on "cpu" or "disk", onloaded only while it runs
    offload: str | None = None
    #: check a checkpoint directory's weight files against the sha256 it records
    verify: bool = True
    #: hub models: the branch, tag or commit, and the download cache folder (None: the hub's defaults)
    revision: str | None = None
    cache_dir: str | None = None

    def hub_kwargs(self) -> dict[str, Any]:
        """``revision`` and ``cache_dir`` for ``from_pretrained``, when given."""
        return {k: v for k, v in (("revision", self.revision), ("cache_dir", self.cache_dir)) if v is not None}


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any  # tokenizer or multimodal processor, None when the model ships none
    source: str
    gguf_file: str | None = None
    #: why the weights were not verified against recorded checksums (None: verified, or not asked)
    note: str | None = None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)


def _sequential_map(source: str, config: Any, cls: Any, opts: LoadOptions) -> dict[str, Any]:
    """Build the model on the meta device to find its blocks, then map them to the offload target."""
    from accelerate import init_empty_weights

    from ecoflap_cli.engine.offload import sequential_device_map
    from ecoflap_cli.models import get_adapter

    with init_empty_weights():
        skeleton = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    paths = list(get_adapter(skeleton).tower_paths().values())
    blocks = [f"{p}.{i}" for p in paths for i in range(len(skeleton.get_submodule(p)))]
    device = resolve_device(opts.device)
    compute: Any = (device.index or 0) if device.type == "cuda" else device.type
    if opts.offload == "disk" and not opts.offload_folder:
        raise ModelError("--offload disk needs --offload-folder DIR")
    return sequential_device_map(skeleton, blocks, compute, opts.offload or "cpu")


def check_device_name(device: Any) -> None:
    """Refuse a device map entry naming a device this machine does not have."""
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        device = f"cuda:{device}"
    name = str(device)
    if name in ("cpu", "disk", "meta"):
        return
    if name.startswith("cuda"):
        index = int(name.split(":")[1]) if ":" in name else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ModelError(
                f"the device map names {name}, but this machine has "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA device(s)"
            )
        return
    if name.startswith("mps"):
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError("the device map names mps, but MPS is not available")
        return
    raise ModelError(f"the device map names an unknown device {name!r}")


def _parse_size(text: str) -> int:
    try:
        return parse_size(text, "--max-memory")
    except EcoflapError as exc:
        raise ModelError(str(exc)) from None


def check_budget(source: str, config: Any, cls: Any, opts: LoadOptions) -> None:
    """A --max-memory budget must hold at least one block on some device, or offload to disk."""
    if not opts.max_memory:
        return
    for device in opts.max_memory:
        check_device_name(device)
    budgets = [_parse_size(v) for k, v in opts.max_memory.items() if k != "disk"]
    from accelerate import init_empty_weights

    from ecoflap_cli.models import get_adapter

    with init_empty_weights():
        skeleton = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    dtype = resolve_dtype(opts.dtype)
    itemsize = torch.empty(0, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32).element_size()
    largest = max(sum(p.numel() for p in b.module.parameters()) for b in get_adapter(skeleton).blocks())
    if budgets and max(budgets) < largest * itemsize and not opts.offload_folder:
        raise ModelError(
            f"--max-memory allows at most {max(budgets) / 2**20:.3g} MiB per device, less than one block "
            f"({largest * itemsize / 2**20:.3g} MiB): raise it, or add --offload-folder to spill to disk"
        )


def _placement(opts: LoadOptions) -> dict[str, Any]:
    if opts.device_map is None:
        return {}
    device_map: Any = opts.device_map
    if device_map.strip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as exc:
            raise ModelError(f"--device-map is not valid JSON: {exc.msg}") from None
        for device in device_map.values():
            check_device_name(device)
    elif device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ModelError(
            f"--device-map takes auto, balanced, balanced_low_0, sequential or a JSON map, got {device_map!r}"
        )
    placement: dict[str, Any] = {"device_map": device_map}
    if opts.max_memory:
        placement["max_memory"] = {(int(k) if k.isdigit() else k): v for k, v in opts.max_memory.items()}
    if opts.offload_folder:
        placement["offload_folder"] = opts.offload_folder
    return placement


def load_model(source: str, opts: LoadOptions | None = None) -> LoadedModel:
    """Load a model and its processor; raises ModelError with one line on any failure."""
    opts = opts or LoadOptions()
    quiet_transformers()
    path = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"model path not found: {source}")
    if path.suffix == ".gguf":
        return _load_gguf(path, opts)
    note = None
    if not path.exists():
        snapshot = packed_hub_snapshot(source, opts.revision, opts.cache_dir)
        if snapshot is not None:  # a packed checkpoint on the hub: transformers cannot read it
            from ecoflap_cli.io.layout import verify_checksums

            note = verify_checksums(snapshot) if opts.verify else None
            return _load_packed(snapshot, source, opts, note)
    if path.is_dir():
        from ecoflap_cli.io.layout import is_packed_checkpoint, verify_checksums, weight_files
        from ecoflap_cli.io.packed import check_readable

        note = verify_checksums(path) if opts.verify else None  # first: a corrupt file is named as such
        if is_packed_checkpoint(path):
            return _load_packed(path, source, opts, note)
        refuse_pickle_only(path)
        check_readable(weight_files(path))  # every shard the index names lies inside the directory
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        config = transformers.AutoConfig.from_pretrained(
            source, trust_remote_code=opts.trust_remote_code, **opts.hub_kwargs()
        )
    except Exception as exc:
        raise ModelError(f"cannot load model {source!r}: {first_line(exc)}") from None
    cls = auto_class_for(getattr(config, "model_type", None))
    if opts.offload is not None:
        if opts.device_map is not None:
            raise ModelError("give either --offload (sequential mode) or --device-map, not both")
        opts = LoadOptions(**{**opts.__dict__, "device_map": "sequential-map"})
        placement: dict[str, Any] = {"device_map": _sequential_map(source, config, cls, opts)}
        if opts.offload_folder:
            placement["offload_folder"] = opts.offload_folder
    else:
        placement = _placement(opts)
        if opts.device_map is not None:
            check_budget(source, config, cls, opts)
    try:
        model, info = cls.from_pretrained(
            source,
            dtype=resolve_dtype(opts.dtype),
            trust_remote_code=opts.trust_remote_code,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # wrong shapes come back in info, named by check_loading_info
            use_safetensors=True,  # pickle files can run code when read: never unpickled
            **opts.hub_kwargs(),
            **placement,
        )
    except (ValueError, OSError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelError(f"cannot load model {source!r}: {first_line(exc)}") from None
    check_loading_info(info, source)
    check_finite_weights(model, source)
    if opts.device_map is None:
        model.to(resolve_device(opts.device))
    model.eval()
    return LoadedModel(model, _load_processor(source, opts.trust_remote_code, opts.hub_kwargs()), source, note=note)


#: weight files in Python's pickle format (torch.save): reading one can run arbitrary code
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle_only(path: Path) -> None:
    """A model directory must hold safetensors weights; one with pickle weights only is refused
    by name, before transformers sees it (pickle is never loaded)."""
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if pickles:
        raise ModelError(
            f"{path} holds pickle weights only ({pickles[0]}): ecoflap reads safetensors, as pickle can run code "
            "when loaded; convert it where you trust it (model.save_pretrained(dir, safe_serialization=True))"
        )


def _load_packed(path: Path, source: str, opts: LoadOptions, note: str | None) -> LoadedModel:
    """A packed checkpoint written by ``ecoflap prune --packed``: transformers cannot read it."""
    from ecoflap_cli.io.pruned import load_pruned_checked

    dtype = resolve_dtype(opts.dtype)
    model, _ = load_pruned_checked(
        path,
        None if dtype == "auto" else dtype,
        opts.device,
        trust_remote_code=opts.trust_remote_code,
        verify=False,  # load_model has verified it
        **_placement(opts),
    )
    check_finite_weights(model, source)
    return LoadedModel(model, _load_processor(str(path), opts.trust_remote_code), source, note=note)


def _load_processor(source: str, trust_remote_code: bool, hub: dict[str, Any] | None = None) -> Any:
    import transformers

    for loader in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            return loader.from_pretrained(source, trust_remote_code=trust_remote_code, **(hub or {}))
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
    if opts.offload is not None or opts.device_map is not None:
        raise ModelError("a .gguf model loads whole in memory: offloading needs a safetensors checkpoint directory")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    dtype = resolve_dtype(opts.dtype)
    dtype = torch.float32 if dtype == "auto" else dtype
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    previous = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(previous, disable=True)  # its own bar would clutter stderr
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelError(f"cannot load GGUF model {str(path)!r}: {first_line(exc)}") from None
    finally:
        gguf_utils.tqdm = previous
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    model = type(loaded)._from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    if loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    del loaded
    check_finite_weights(model, str(path))
    model.to(resolve_device(opts.device)).eval()
    return LoadedModel(model, tokenizer, str(path), gguf_file=path.name)


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
