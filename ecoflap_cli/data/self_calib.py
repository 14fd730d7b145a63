"""Self-calibration: the model writes its own calibration text (``--calib self``).

Following the idea of Williams, Chrysostomou & Aletras (NAACL 2025, "Self-calibration for language
model quantization and pruning"): calibration text sampled from the model itself approximates the
distribution it was trained on, needs no dataset and no hub. The recipe here is ecoflap's own and
is recorded in full in every artifact's calibration provenance:

- **prompt**: the tokenizer's BOS token (its EOS token when it has no BOS, as Qwen2 tokenizers
  do), followed by ``prompt`` (empty by default: generation starts from the start token alone,
  as a pre-training document does);
- **sampling**: ancestral sampling with nucleus (top-p) truncation, and a temperature that moves
  linearly from ``temperature_start`` at the first generated token to ``temperature_end`` at the
  last: more varied openings, more fluent continuations. Every window is generated to exactly the
  requested length; an end-of-text token does not stop it (the model starts a new document, as in
  the concatenated text of a real corpus);
- **determinism**: window ``i`` has its own CPU ``torch.Generator`` seeded from (seed, i), which
  draws its tokens from fp32 probabilities; windows are generated ``batch_size`` at a time with a
  KV cache. The same model, seed, length and recipe give the same tokens, and window ``i`` does
  not depend on how many windows are asked for (a scoring pass's 32 windows begin with a prune's
  first windows).

Everything here is pure tensor code over a causal LM's ``forward``; nothing knows a model family.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ecoflap_cli.errors import DataError

#: the probabilities are computed and sampled in this precision, on the CPU, whatever the model's
SAMPLING_PRECISION = torch.float32


@dataclass(frozen=True)
class SelfRecipe:
    """How the model writes its calibration text (recorded with the tokens it produced)."""

    prompt: str = ""
    temperature_start: float = 1.0
    temperature_end: float = 0.7
    top_p: float = 0.95
    #: windows generated at once (one forward per token for all of them); see :func:`fitted_recipe`
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not (self.temperature_start > 0 and self.temperature_end > 0):
            raise DataError("self-calibration temperatures must be positive")
        if not 0 < self.top_p <= 1:
            raise DataError(f"self-calibration top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise DataError("self-calibration batch_size must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return {"method": "self-generated", "start": "bos (eos when none)", "sampling": "top-p", **asdict(self)}


DEFAULT_RECIPE = SelfRecipe()
#: the share of the device's free memory one generation batch's KV cache may take
KV_CACHE_SHARE = 0.25


def kv_cache_bytes(model: Any, seqlen: int) -> int | None:
    """Bytes of one window's KV cache at ``seqlen`` tokens (keys and values of every layer, in the
    model's dtype), or None when the config does not say (then nothing is capped)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(hidden, int) and heads > 0):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    itemsize = next((p.element_size() for p in model.parameters()), 4)
    return 2 * layers * int(kv_heads) * int(head_dim) * seqlen * itemsize


def fitted_recipe(model: Any, recipe: SelfRecipe, samples: int, seqlen: int) -> SelfRecipe:
    """``recipe`` with its batch no larger than the windows asked for and than what lets the KV
    cache stay within ``KV_CACHE_SHARE`` of the device's free memory (at least 1). The batch
    changes the cost, not the tokens: window ``i`` draws from its own generator (measured equal
    on CPU for batches of 8, 16 and 32), and the provenance records the batch used."""
    from ecoflap_cli.engine.memory import free_memory

    batch = min(recipe.batch_size, max(samples, 1))
    per_window = kv_cache_bytes(model, seqlen)
    free = free_memory(_device(model))
    if per_window and free is not None:
        batch = max(1, min(batch, int(free * KV_CACHE_SHARE) // per_window))
    return recipe if batch == recipe.batch_size else replace(recipe, batch_size=batch)


def start_ids(tokenizer: Any, prompt: str = "") -> list[int]:
    """The ids every generated window starts with: BOS (or EOS) then the prompt's tokens."""
    start = getattr(tokenizer, "bos_token_id", None)
    if start is None:
        start = getattr(tokenizer, "eos_token_id", None)
    if start is None:
        raise DataError("self-calibration needs a tokenizer with a BOS or EOS token to start from")
    ids = [int(start)]
    if prompt:
        ids += list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ids


def temperature_at(step: int, steps: int, recipe: SelfRecipe) -> float:
    """The temperature of generated token ``step`` (0-based) of ``steps``: linear start -> end."""
    if steps <= 1:
        return recipe.temperature_start
    frac = step / (steps - 1)
    return recipe.temperature_start + frac * (recipe.temperature_end - recipe.temperature_start)


def window_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of window ``index``, seeded with 32 bits of sha256("seed:index") (the CPU
    generator keeps only 32 bits of its seed, so ``(seed << 32) + index`` would ignore the seed)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:4], "little"))


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row of ``logits`` (batch, vocab), row ``r`` drawn with ``generators[r]``:
    temperature, then nucleus truncation."""
    probs = torch.softmax(logits.to(device="cpu", dtype=SAMPLING_PRECISION) / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the better tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])


def _cache_keyword(model: Any) -> str:
    """The forward keyword that takes the KV cache: ``cache`` (transformers 5.2x), else the older
    ``past_key_values``."""
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _device(model: Any) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def generate_windows(
    model: Any,
    tokenizer: Any,
    samples: int,
    seqlen: int,
    seed: int,
    recipe: SelfRecipe = DEFAULT_RECIPE,
) -> torch.Tensor:
    """``samples`` windows of exactly ``seqlen`` tokens written by ``model``, shape (samples, seqlen).

    Each window is the start ids (see :func:`start_ids`) followed by sampled tokens; generation
    runs ``recipe.batch_size`` windows at a time with the model's KV cache.
    """
    prefix = start_ids(tokenizer, recipe.prompt)
    if samples < 1 or seqlen <= len(prefix):
        raise DataError(f"self-calibration needs at least 1 sample longer than its prompt (got {samples} x {seqlen})")
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    device = _device(model)
    keyword = _cache_keyword(model)
    steps = seqlen - len(prefix)
    windows = []
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():  # not inference_mode: buffers a forward touches stay usable by backprop
            for first in range(0, samples, recipe.batch_size):
                rows = min(recipe.batch_size, samples - first)
                ids = torch.tensor([prefix] * rows, dtype=torch.long)
                generators = [window_generator(seed, first + r) for r in range(rows)]
                out = model(input_ids=ids.to(device), use_cache=True)
                produced = [ids]
                for step in range(steps):
                    logits = out.logits[:, -1, :]
                    if vocab is not None and logits.shape[-1] > vocab:  # padded embedding rows
                        logits = logits[:, :vocab]
                    token = sample_next(logits, temperature_at(step, steps, recipe), recipe.top_p, generators)
                    produced.append(token.unsqueeze(1))
                    if step + 1 < steps:
                        cache = {keyword: _returned_cache(out)}
                        out = model(input_ids=token.unsqueeze(1).to(device), use_cache=True, **cache)
                windows.append(torch.cat(produced, dim=1))
                del out
    finally:
        model.train(was_training)
    return torch.cat(windows, dim=0)
