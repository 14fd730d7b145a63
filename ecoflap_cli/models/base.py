"""The adapter contract: what the pruning and scoring drivers need to know about a model family.

An adapter names the model's towers (vision, language, ...) in pruning order, the transformer
blocks of each tower, the prunable linears of each block, how to run a calibration batch and its
loss, and how one block's output becomes the next block's input. It also holds everything else
that is particular to the family, so generic code asks the adapter instead of testing a model
type: the transformers class that loads it (``loader_class``, known from ``config.model_type``
before any model exists), the token layout of its image-text batches (``calibration_text``,
``prompt_inputs``, ``text_inputs``), the eval tasks it supports (``eval_tasks``), what its
processor must provide (``check_processor``) and which sub-model perplexity is measured on
(``perplexity_module``). A new family is one new adapter file.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ecoflap_cli.errors import ModelError

Batch = dict[str, torch.Tensor]
BlockInputs = tuple[tuple[Any, ...], dict[str, Any]]
Record = dict[str, Any]


class RecordText(Protocol):
    """The text of an image-text record, in the two shapes image-text families train on.

    Generic data code supplies it (with the user's caption prompt and question template); the
    adapter takes the shape its loss needs.
    """

    def pair(self, record: Record) -> tuple[str, str]:
        """(prompt, target): a generative model reads the prompt and is trained on the target."""
        ...

    def text(self, record: Record) -> str:
        """The one text matched to the image (contrastive models)."""
        ...


@dataclass
class Block:
    """One group of the method: a transformer block and its prunable linears."""

    name: str  # module path, e.g. "model.layers.3"
    tower: str  # e.g. "language", "vision"
    index: int  # position within its tower
    module: nn.Module
    linears: dict[str, nn.Linear] = field(default_factory=dict)  # full module path -> module

    @property
    def num_params(self) -> int:
        return sum(m.weight.numel() for m in self.linears.values())

    def tensor_names(self) -> list[str]:
        return [f"{path}.weight" for path in self.linears]


def find_linears(module: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """Every nn.Linear below ``module``, keyed by its full module path, in definition order."""
    found: dict[str, nn.Linear] = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and name:
            found[f"{prefix}.{name}"] = child
    return found


def block_list(model: nn.Module, path: str) -> nn.ModuleList:
    module = model.get_submodule(path)
    if not isinstance(module, nn.ModuleList):
        raise TypeError(f"{path} is not a ModuleList")
    return module


def blocks_from_paths(model: nn.Module, tower_paths: dict[str, str]) -> list[Block]:
    """Build Block records for each (tower -> ModuleList path), towers in the given order."""
    blocks: list[Block] = []
    for tower, path in tower_paths.items():
        for index, module in enumerate(block_list(model, path)):
            name = f"{path}.{index}"
            blocks.append(Block(name, tower, index, module, find_linears(module, name)))
    return blocks


def to_model_device(model: nn.Module, batch: Batch) -> Batch:
    """Move a batch's tensors to the device the model takes its inputs on.

    accelerate-dispatched models move inputs themselves (and may report "meta"): left alone.
    """
    device = getattr(model, "device", None)
    if not isinstance(device, torch.device) or device.type == "meta":
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a block's output (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find hidden states in a block output of type {type(output).__name__}")


class Adapter:
    """Base class: subclasses set ``family`` and implement towers, loss and data kind.

    A family file registers its adapter with ``@register`` (``ecoflap_cli.models``), which maps
    each of ``model_types`` to the class.
    """

    family = "base"
    #: the ``config.model_type`` values this adapter handles (the registry's keys)
    model_types: tuple[str, ...] = ()
    #: the transformers class that loads (and reloads) the family's checkpoints
    loader_class = "AutoModelForCausalLM"
    #: how messages to the user name the family
    display_name = "causal language"
    #: what calibration records this family needs: "text" or "image-text"
    data_kind = "text"
    #: the vision-language eval tasks the family supports (task names of ``evaluation.tasks``)
    eval_tasks: tuple[str, ...] = ()
    #: the fewest image-text pairs a calibration batch may hold (a contrastive loss needs two)
    min_batch_pairs = 1
    #: True when the loss depends on the prunable weights only through the output of the last
    #: block of the last tower (then zeroth-order scoring may linearize the head after it)
    loss_through_last_block = True
    #: what ``--allocator auto`` runs in a one-shot prune: "search" where the search refining the
    #: paper's plan was measured to beat that plan on text of several domains (decoder-only LMs:
    #: docs/benchmarks.md), "ecoflap" (the paper's rule) where nothing was measured to beat it
    one_shot_allocator = "ecoflap"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._blocks: list[Block] | None = None

    # --- structure ---------------------------------------------------------------------
    def tower_paths(self) -> dict[str, str]:
        """Tower name -> path of its block ModuleList, in pruning order."""
        raise NotImplementedError

    def blocks(self, tower: str | None = None) -> list[Block]:
        if self._blocks is None:
            found = blocks_from_paths(self.model, self.tower_paths())
            self._blocks = [b for b in found if self.affects_output(b)]
        return [b for b in self._blocks if tower is None or b.tower == tower]

    def affects_output(self, block: Block) -> bool:
        """False for a block whose output the model never reads (it stays dense and unscored).

        Only trailing blocks of a tower may be excluded: the drivers index blocks from the
        tower's start.
        """
        return True

    def towers(self) -> list[str]:
        return list(self.tower_paths())

    def default_compare_group(self, block: Block) -> str:
        """Wanda's comparison group: per output row by default (language layers)."""
        return "row"

    def uncovered_hint(self, tensor_names: list[str]) -> str:
        """A hint for a plan that prunes tensors outside this run's towers (e.g. an opt-in tower)."""
        return ""

    def reconstruction_units(self, block: Block) -> list[str]:
        """The sub-layers that local reconstruction fits one at a time, as module paths relative
        to the block, in the order the block runs them; ``""`` is the block itself.

        Default, from the structure alone: each child of the block that holds prunable linears
        (a child ModuleList's items one by one), e.g. ``self_attn`` and ``mlp`` of a LLaMA or
        CLIP layer, ``layer.0`` / ``layer.1`` / ``layer.2`` of a T5 block. Linears that sit
        directly in the block (OPT's ``fc1`` / ``fc2``) have no sub-layer of their own: the whole
        block is fitted last for them (a single linear alone fits worse than its sub-layer).
        """
        units: list[str] = []
        direct = False
        for name, child in block.module.named_children():
            items = list(child.named_children()) if isinstance(child, nn.ModuleList) else [("", child)]
            for sub, module in items:
                if isinstance(module, nn.Linear):
                    direct = True
                elif any(isinstance(m, nn.Linear) for m in module.modules()):
                    units.append(f"{name}.{sub}" if sub else name)
        return [*units, ""] if direct or not units else units

    def dense_parts(self) -> list[str]:
        """Human description of what stays dense (for reports)."""
        return ["embeddings", "lm_head", "norms", "biases"]

    # --- data and evaluation -----------------------------------------------------------
    def check_processor(self, processor: Any) -> None:
        """Raise ModelError when the processor lacks what this family's data needs.

        The message completes a sentence that starts with the checkpoint's name.
        """
        if self.data_kind == "image-text" and getattr(processor, "image_processor", None) is None:
            raise ModelError(
                "ships no image processor (preprocessor_config.json): cannot read images; "
                "save the model's processor into the checkpoint directory"
            )

    def calibration_text(
        self, processor: Any, records: Sequence[Record], max_text_len: int, texts: RecordText
    ) -> Batch:
        """The text part of an image-text calibration batch (``pixel_values`` come separately).

        Default: the generative layout of :meth:`prompt_inputs` on each record's (prompt, target).
        """
        return self.prompt_inputs(processor, [texts.pair(r) for r in records], max_text_len, generation=False)

    def prompt_inputs(
        self, processor: Any, pairs: Sequence[tuple[str, str | None]], max_text_len: int, generation: bool
    ) -> Batch:
        """Token inputs of a model that generates text from an image and a prompt.

        ``pairs`` are (prompt, target); with ``generation`` the targets are None and the batch is
        what ``generate`` continues from. ``max_text_len`` bounds the text tokens.
        """
        raise ModelError(f"{self.display_name} models do not generate text from an image")

    def text_inputs(self, processor: Any, texts: Sequence[str], max_text_len: int) -> Batch:
        """Token inputs of the text tower of an image-text matching model (one text per image)."""
        raise ModelError(f"{self.display_name} models have no text tower to match images against")

    def perplexity_module(self) -> nn.Module:
        """The causal LM that ``eval --text`` measures perplexity on (text alone, no image).

        Raises ModelError, its message completing "<model> (<type>) ...", when there is none.
        """
        return self.model

    # --- running -----------------------------------------------------------------------
    def check_batch(self, batch: Batch) -> None:
        """Raise DataError when a batch lacks what this family's forward needs (default: no check)."""

    def no_cache(self) -> dict[str, Any]:
        """``{"use_cache": False}`` when the model's forward accepts it, else nothing.

        A key/value cache would be built on every calibration pass and, worse, captured among a
        block's inputs and replayed. A forward that takes ``**kwargs`` accepts it (BLIP-2 hands
        it on to its language model); one that takes neither would raise on it.
        """
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):  # builtins or odd wrappers: do not guess
            return {}
        if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return {"use_cache": False}
        return {}

    def forward(self, batch: Batch) -> Any:
        """Run the model on a calibration batch (no loss needed)."""
        self.check_batch(batch)
        return self.model(**self.model_inputs(batch), **self.no_cache())

    def loss(self, batch: Batch) -> torch.Tensor:
        """The model's own training loss on a calibration batch (a scalar)."""
        raise NotImplementedError

    def loss_sample_weights(self, batch: Batch) -> list[float] | None:
        """w_k with loss(batch) == sum_k w_k loss(sample k), or None when unknown.

        Lets a computation that needs the loss's gradient run one sample at a time (less memory).
        """
        return None

    def model_inputs(self, batch: Batch) -> Batch:
        return {k: v for k, v in batch.items() if k != "labels"}

    def next_inputs(self, block: Block, output: Any, inputs: BlockInputs) -> BlockInputs:
        """Turn one block's output into the next block's inputs (same kwargs, new hidden)."""
        args, kwargs = inputs
        hidden = hidden_of(output)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
