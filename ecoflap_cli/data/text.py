"""Text calibration and evaluation data: local files, seeded windows, an optional hub dataset."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecoflap_cli.errors import DataError, MissingDependencyError

#: What the Wanda / SparseGPT / ECoFLaP papers calibrate decoder-only LMs on.
DEFAULT_TEXT_DATASET = ("allenai/c4", "en/c4-train.00000-of-01024.json.gz")


@dataclass(frozen=True)
class Provenance:
    """Where calibration tokens came from, recorded in every artifact.

    ``source`` is the file, ``hub:NAME``, ``self`` or the whole mixing spec; ``tokens`` the size of
    the token stream the windows were drawn from (all sources together). For ``self`` and for a
    mixture, ``sources`` has one record per source: its name, its share of the windows (``weight``,
    normalised to sum 1), the windows it gave (``samples``), its stream's tokens and, for ``self``,
    the generation recipe (``recipe``). A single file or hub source leaves it None, and
    ``to_dict`` then writes the record as it always did.
    """

    source: str
    samples: int
    seqlen: int
    seed: int
    tokens: int
    sources: tuple[dict[str, Any], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = self.__dict__.copy()
        if self.sources is None:
            del out["sources"]
        else:
            out["sources"] = [dict(s) for s in self.sources]
        return out


def read_text(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a ``.txt`` file (one document) or a ``.jsonl``/``.json`` file of records."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"calibration/eval text file not found: {file}")
    if file.suffix in (".jsonl", ".json"):
        docs = _read_json_docs(file, text_field)
    else:
        docs = [read_utf8(file)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{file} contains no text")
    return docs


def read_utf8(file: Path) -> str:
    """A text file's content, which must be UTF-8 (a UTF-8 byte-order mark is dropped): binary
    files and UTF-16 text are refused, not turned into replacement characters the tokenizer
    reads as noise."""
    data = file.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{file} is UTF-16 text: convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in data:
        raise DataError(f"{file} holds NUL bytes: it is binary or UTF-16, not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): convert it to UTF-8"
        ) from None


#: Refuse text when more than this share of its tokens are unknown (``unk``) or byte-fallback
#: pieces. Measured with a 8k/32k BPE vocabulary trained on the Wikipedia calibration split: held-
#: out Wikipedia 0.02 %, Shakespeare 0.1 %, random Greek letters 37 %, binary read as latin-1 46 %,
#: CJK 99 %.
MAX_UNKNOWN_SHARE = 0.10
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def unknown_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's unknown token and its byte-fallback pieces (``<0x41>``), the ids a
    tokenizer gives text it does not understand."""
    ids = {int(tokenizer.unk_token_id)} if getattr(tokenizer, "unk_token_id", None) is not None else set()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids.update(int(i) for token, i in vocab.items() if _BYTE_PIECE.match(token))
    return ids


def check_understood(tokenizer: Any, ids: torch.Tensor, where: str = "the text") -> None:
    """Refuse text the tokenizer mostly does not know (see :data:`MAX_UNKNOWN_SHARE`)."""
    unknown = unknown_token_ids(tokenizer)
    if not unknown or ids.numel() == 0:
        return
    share = float(torch.isin(ids, torch.tensor(sorted(unknown), dtype=ids.dtype)).float().mean())
    if share > MAX_UNKNOWN_SHARE:
        raise DataError(
            f"{where}: {share:.0%} of its tokens are unknown to the model's tokenizer (at most "
            f"{MAX_UNKNOWN_SHARE:.0%} allowed): is it in a language or encoding the model reads?"
        )


def _read_json_docs(file: Path, text_field: str) -> list[str]:
    raw = read_utf8(file)
    if file.suffix == ".json":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(records, list):
            raise DataError(f"{file} must hold a JSON list of records")
    else:
        records = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{file} line {number} is not valid JSON: {exc.msg}") from None
    docs = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            docs.append(record)
        elif isinstance(record, dict) and isinstance(record.get(text_field), str):
            docs.append(record[text_field])
        else:
            raise DataError(f"{file} record {i + 1} has no string field {text_field!r} (--text-field)")
    return docs


def _chunks(text: str, size: int = 20_000) -> list[str]:
    """Split long text into pieces of about ``size`` characters, each cut just before a space.

    Byte-level BPE and SentencePiece tokenizers start a word with its leading space, so a cut there
    is a word boundary and the pieces tokenise like the whole text.
    """
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def tokenize_documents(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """One long 1-D token stream, documents separated by the tokenizer's EOS token.

    Long documents are tokenised in pieces: one call on a multi-megabyte text makes the fast
    tokenizer hold offsets and masks for every token (about 1 GB for 1 M tokens).
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for doc in docs:
        pieces = _chunks(doc)
        for start in range(0, len(pieces), 32):
            encoded = tokenizer(pieces[start : start + 32], add_special_tokens=False, return_attention_mask=False)[
                "input_ids"
            ]
            for piece in encoded:
                ids.extend(piece)
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokens: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets, shape (samples, seqlen)."""
    if samples < 1 or seqlen < 2:
        raise DataError(f"need at least 1 sample of at least 2 tokens (got {samples} x {seqlen})")
    if tokens.numel() <= seqlen:
        raise DataError(
            f"the calibration text has {tokens.numel()} tokens, fewer than one window of "
            f"{seqlen} (lower --seqlen or give more text)"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, tokens.numel() - seqlen) for _ in range(samples)]
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def context_length(model: Any) -> int | None:
    """The model's context length (``max_position_embeddings`` of its text config), if it states one."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_seqlen(model: Any, seqlen: int | None, option: str = "--seqlen") -> None:
    """Refuse windows longer than the model's context: OPT fails on them with an index error, and
    rotary models run silently past what they were trained on."""
    limit = context_length(model)
    if seqlen is not None and limit is not None and seqlen > limit:
        raise DataError(f"{option} {seqlen} is longer than the model's context length ({limit} tokens)")


def to_batches(windows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split (samples, seqlen) token windows into causal-LM batches."""
    if batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in windows.split(batch_size)]


def hub_documents(dataset: str, data_file: str | None, limit: int, seed: int) -> list[str]:
    """Documents from a Hugging Face dataset (needs ``datasets`` and a reachable hub)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise MissingDependencyError(
            "datasets", "calibration from a hub dataset (or pass local text with --calib FILE)", "hub"
        ) from None
    try:
        kwargs = {"data_files": {"train": data_file}} if data_file else {}
        ds = datasets.load_dataset(dataset, split="train", **kwargs)
    except Exception as exc:  # network, auth, missing dataset: all end the same way for a user
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load hub dataset {dataset!r} ({first}); pass local text with --calib FILE") from None
    rng = random.Random(seed)
    picks = rng.sample(range(len(ds)), min(limit, len(ds)))
    return [ds[i]["text"] for i in picks]


#: the ``--calib`` name of self-generated calibration text (see ``data.self_calib``)
SELF_SOURCE = "self"


def parse_calib_spec(calib: str) -> list[tuple[str, float]]:
    """``--calib`` as ``[(source, weight)]``, weights normalised to sum 1.

    One source: a file path, ``hub:NAME`` or ``self`` (weight 1). Several sources mixed in stated
    proportions: ``SOURCE:WEIGHT,SOURCE:WEIGHT,...`` (``wiki.txt:0.5,self:0.5``; weights are
    positive numbers, normalised, so ``a.txt:1,self:3`` is a quarter and three quarters). A value
    that names an existing file is always that one file, whatever commas or colons it holds.
    """
    if Path(calib).is_file() or "," not in calib and not _weighted(calib)[1]:
        return [(calib, 1.0)]
    items = [part.strip() for part in calib.split(",")]
    parsed = [_weighted(item) for item in items]
    if any(not name for name, _ in parsed):
        raise DataError(f"--calib {calib!r}: an empty source in the mix")
    if any(weight is None for _, weight in parsed):
        raise DataError(
            f"--calib {calib!r}: give every source of a mix a weight, as SOURCE:WEIGHT (e.g. wiki.txt:0.5,self:0.5)"
        )
    weights = [float(w) for _, w in parsed]  # type: ignore[arg-type]
    if any(not (w > 0 and w < float("inf")) for w in weights):
        raise DataError(f"--calib {calib!r}: mixing weights must be positive numbers")
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        raise DataError(f"--calib {calib!r}: a source appears twice in the mix")
    total = sum(weights)
    return [(name, w / total) for name, w in zip(names, weights)]


def _weighted(item: str) -> tuple[str, float | None]:
    """``SOURCE:WEIGHT`` -> (SOURCE, WEIGHT); anything else -> (item, None)."""
    head, sep, tail = item.rpartition(":")
    if not sep or not head:
        return item, None
    try:
        return head, float(tail)
    except ValueError:
        return item, None


def _source_windows(
    tokenizer: Any,
    calib: str | None,
    samples: int,
    seqlen: int,
    seed: int,
    text_field: str,
    model: Any,
    self_recipe: Any,
) -> tuple[torch.Tensor, str, int, dict[str, Any] | None]:
    """Windows of one source: (windows, its recorded name, its stream's tokens, its recipe)."""
    if calib == SELF_SOURCE:
        from ecoflap_cli.data.self_calib import DEFAULT_RECIPE, fitted_recipe, generate_windows

        if model is None:
            raise DataError("--calib self needs the model to write its calibration text (none was given)")
        recipe = fitted_recipe(model, self_recipe or DEFAULT_RECIPE, samples, seqlen)
        windows = generate_windows(model, tokenizer, samples, seqlen, seed, recipe)
        return windows, SELF_SOURCE, int(windows.numel()), recipe.to_dict()
    if calib is None or calib.startswith("hub:"):
        name = calib[4:] if calib else DEFAULT_TEXT_DATASET[0]
        data_file = DEFAULT_TEXT_DATASET[1] if calib is None else None
        docs = hub_documents(name, data_file, limit=max(samples * 20, 1000), seed=seed)
        source = f"hub:{name}"
    else:
        docs = read_text(calib, text_field)
        source = str(Path(calib).resolve())
    tokens = tokenize_documents(tokenizer, docs)
    check_understood(tokenizer, tokens, f"calibration text {source}")
    return sample_windows(tokens, samples, seqlen, seed), source, int(tokens.numel()), None


def calibration_windows(
    tokenizer: Any,
    calib: str | None,
    samples: int,
    seqlen: int,
    seed: int,
    text_field: str = "text",
    *,
    model: Any = None,
    self_recipe: Any = None,
) -> tuple[torch.Tensor, Provenance]:
    """Token windows for calibration from ``calib`` (see :func:`parse_calib_spec`) or the default.

    ``self`` (alone or in a mix) has ``model`` write its windows (``data.self_calib``, with
    ``self_recipe`` or the default recipe). A mix gives each source its share of the ``samples``
    windows (largest remainders, ties to the earlier source; every source must get at least one),
    each drawn with the same ``seed``, concatenated in the order the spec names them.
    """
    if calib is None:
        windows, source, tokens, _ = _source_windows(tokenizer, None, samples, seqlen, seed, text_field, None, None)
        return windows, Provenance(source, samples, seqlen, seed, tokens)
    spec = parse_calib_spec(calib)
    if len(spec) == 1 and spec[0][0] != SELF_SOURCE:
        windows, source, tokens, _ = _source_windows(tokenizer, calib, samples, seqlen, seed, text_field, None, None)
        return windows, Provenance(source, samples, seqlen, seed, tokens)
    from ecoflap_cli.core.rounding import largest_remainder

    counts = largest_remainder([samples * w for _, w in spec], None, samples)
    if any(c == 0 for c in counts):
        raise DataError(
            f"--calib {calib!r}: {samples} samples cannot give every source of the mix a window "
            f"(shares {', '.join(f'{n}={c}' for (n, _), c in zip(spec, counts))}); raise --samples"
        )
    parts, records, total = [], [], 0
    for (name, weight), count in zip(spec, counts):
        windows, source, tokens, recipe = _source_windows(
            tokenizer, name, count, seqlen, seed, text_field, model, self_recipe
        )
        parts.append(windows)
        total += tokens
        record: dict[str, Any] = {"source": source, "weight": weight, "samples": count, "tokens": tokens}
        if recipe is not None:
            record["recipe"] = recipe
        records.append(record)
    label = ",".join(f"{r['source']}:{r['weight']:g}" for r in records) if len(records) > 1 else records[0]["source"]
    return torch.cat(parts, dim=0), Provenance(label, samples, seqlen, seed, total, tuple(records))
