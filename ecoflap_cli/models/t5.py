"""T5 stacks as pruning towers (the FlanT5 language model inside BLIP-2 / InstructBLIP).

A T5 stack runs its blocks as::

    hidden, self_bias, cross_bias = block(hidden, attention_mask, position_bias,
                                          encoder_hidden_states, encoder_attention_mask,
                                          encoder_decoder_position_bias, cache=..., **kwargs)

Block 0 owns the relative attention bias; it computes ``position_bias`` (and, in the decoder,
``encoder_decoder_position_bias``) and the stack hands both on to every later block. So the
inputs of block b > 0 are block b-1's hidden states *and* its returned biases: the generic
"same kwargs, new hidden" rule would leave ``position_bias=None`` and block 1 would run without
any relative position information. :func:`t5_next_inputs` does what ``T5Stack.forward`` does.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ecoflap_cli.errors import ModelError
from ecoflap_cli.models.base import BlockInputs
from ecoflap_cli.models.causal_lm import largest_block_list

#: T5Block.forward's parameters in order (transformers 5.x); T5Stack passes the first six
#: positionally and ``cache`` by keyword.
T5_BLOCK_PARAMS = (
    "hidden_states",
    "attention_mask",
    "position_bias",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "encoder_decoder_position_bias",
)


def module_path(root: nn.Module, target: nn.Module) -> str:
    """The dotted path of ``target`` below ``root`` ("" for root itself)."""
    for path, module in root.named_modules():
        if module is target:
            return path
    raise ModelError(f"module {type(target).__name__} is not part of the model")


def join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def t5_tower_paths(model: nn.Module, seq2seq: nn.Module, prefix: str = "language") -> dict[str, str]:
    """Towers ``{prefix}-encoder`` and ``{prefix}-decoder``: the block lists of both T5 stacks.

    ``seq2seq`` is the T5ForConditionalGeneration (or any model with get_encoder/get_decoder)
    found inside ``model``; the stacks are located structurally, not by attribute names.
    """
    get_encoder = getattr(seq2seq, "get_encoder", None)
    get_decoder = getattr(seq2seq, "get_decoder", None)
    if get_encoder is None or get_decoder is None:
        raise ModelError(f"{type(seq2seq).__name__} has no encoder/decoder accessors")
    towers: dict[str, str] = {}
    for side, stack in (("encoder", get_encoder()), ("decoder", get_decoder())):
        stack_path = module_path(model, stack)
        towers[f"{prefix}-{side}"] = join(stack_path, largest_block_list(stack))
    return towers


def _lookup(args: tuple, kwargs: dict, name: str) -> Any:
    index = T5_BLOCK_PARAMS.index(name)
    if index < len(args):
        return args[index]
    return kwargs.get(name)


def t5_next_inputs(output: Any, inputs: BlockInputs) -> BlockInputs:
    """The next T5 block's inputs: new hidden states plus the biases this block returned."""
    if not isinstance(output, (tuple, list)) or len(output) < 2:
        raise ModelError(
            "a T5 block returned no position bias; this transformers version's T5Block output "
            "is not (hidden_states, position_bias, encoder_decoder_position_bias)"
        )
    args, kwargs = inputs
    updates = {"hidden_states": output[0], "position_bias": output[1]}
    # T5Stack only hands the cross-attention bias on when there is something to attend to.
    if _lookup(args, kwargs, "encoder_hidden_states") is not None and len(output) > 2:
        updates["encoder_decoder_position_bias"] = output[2]
    new_args = list(args)
    new_kwargs = dict(kwargs)
    for name, value in updates.items():
        index = T5_BLOCK_PARAMS.index(name)
        if index < len(new_args):
            new_args[index] = value
        else:
            new_kwargs[name] = value
    return tuple(new_args), new_kwargs
