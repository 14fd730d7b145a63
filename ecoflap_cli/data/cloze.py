"""A LAMBADA-style cloze task built from plain text: predict the last word of a passage.

LAMBADA (Paperno et al., 2016) keeps passages whose last word a reader can guess only from the
whole passage, and in most of them that word occurs earlier in the passage. Here, from plain text
(articles separated by blank lines), deterministically:

- each sentence that ends with ``.`` and whose last word is alphabetic (at least
  ``MIN_TARGET_CHARS`` letters) is a candidate ending;
- its passage is the article from its first sentence up to and including that sentence, with the
  final full stop removed, and must hold at least ``MIN_CONTEXT_WORDS`` words before the target;
- the target must occur (as a whole word, ignoring case) earlier in the passage, so the passage
  holds what is needed to predict it (LAMBADA's context dependence, approximated).

Each record is ``{"context", "target", "text", "article", "sentence"}`` where ``text`` is
``context + " " + target`` (LAMBADA's layout: the passage ending with its target word).

    python -m ecoflap_cli.data.cloze            # build (once) and print the Wikipedia cloze file
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ecoflap_cli.errors import DataError
from ecoflap_cli.files import write_atomic

#: a sentence ends at . ! or ? followed by space and what can start a sentence
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")
_WORDS = re.compile(r"[a-z]+")
MIN_TARGET_CHARS = 3
MIN_CONTEXT_WORDS = 30
#: bump when the records change: the cached file's name carries it, so an old file is not reused
BUILDER_VERSION = 1
WIKI_CLOZE_FILE = f"wiki_cloze_v{BUILDER_VERSION}.jsonl"


def _articles(text: str) -> list[str]:
    return [a.strip() for a in re.split(r"\n\s*\n", text) if a.strip()]


def _endings(article: str) -> Iterator[tuple[int, str, str]]:
    """(sentence index, context, target) for every sentence of ``article`` that qualifies."""
    sentences = _SENTENCE_END.split(" ".join(article.split()))
    for i in range(1, len(sentences)):
        sentence = sentences[i]
        if not sentence.endswith("."):
            continue
        words = sentence[:-1].split()
        target = words[-1] if words else ""
        if len(target) < MIN_TARGET_CHARS or not target.isascii() or not target.isalpha():
            continue
        context = " ".join([*sentences[:i], *words[:-1]])
        if len(context.split()) < MIN_CONTEXT_WORDS:
            continue
        if target.lower() not in set(_WORDS.findall(context.lower())):
            continue
        yield i, context, target


def cloze_records(text: str, max_records: int | None = None) -> list[dict[str, Any]]:
    """The cloze records of ``text`` (articles separated by blank lines), in text order."""
    records: list[dict[str, Any]] = []
    for a, article in enumerate(_articles(text)):
        for s, context, target in _endings(article):
            records.append(
                {"context": context, "target": target, "text": f"{context} {target}", "article": a, "sentence": s}
            )
            if max_records is not None and len(records) >= max_records:
                return records
    return records


def write_cloze_file(source: str | Path, dest: str | Path, max_records: int | None = None) -> int:
    """Build the cloze records of text file ``source`` into JSON lines at ``dest`` (written to a
    temporary file and renamed, so a partial file never looks complete); returns the count."""
    source, dest = Path(source), Path(dest)
    if not source.is_file():
        raise DataError(f"text file not found: {source}")
    records = cloze_records(source.read_text(encoding="utf-8"), max_records)
    if not records:
        raise DataError(f"{source} yields no cloze passages (it needs articles of several sentences)")
    write_atomic(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    return len(records)


def wiki_cloze_file() -> Path:
    """The cloze file of the Wikipedia test split (``assets.wikipedia_splits()['test']``), built
    into the ecoflap cache on first use."""
    from ecoflap_cli.data import assets

    dest = assets.cache_dir() / WIKI_CLOZE_FILE
    if not dest.is_file():
        write_cloze_file(assets.wikipedia_splits()["test"], dest)
    return dest


if __name__ == "__main__":
    print(wiki_cloze_file())
