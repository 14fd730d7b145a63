"""Evaluation metrics for pruned vision-language models.

Importing this module loads no torch; the ranking metrics import it when called
(they rank with torch, on the scores' device). They cover:

* VQAv2 answer normalisation and soft accuracy (the official VQA eval rules);
* CIDEr-D for captioning (the coco-caption ``CiderD`` definition, on PTB tokens);
* Recall@K for image-text retrieval, in both directions;
* top-k accuracy for zero-shot classification.

All scores that are reported as percentages are in the range 0-100.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import string
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch

__all__ = [
    "CIDER_TOKENIZERS",
    "cider_d",
    "ptb_tokenize",
    "normalize_vqa_answer",
    "recall_at_k",
    "resolve_cider_tokenizer",
    "retrieval_recalls",
    "tokenize_captions",
    "vqa_accuracy",
    "vqa_soft_accuracy",
    "zero_shot_accuracy",
]

# --------------------------------------------------------------------------
# VQAv2
# --------------------------------------------------------------------------

# The punctuation characters the official VQA eval script handles in
# processPunctuation. Periods and apostrophes are deliberately absent: periods
# are handled by _PERIOD_STRIP, apostrophes are kept (contractions).
_VQA_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
    "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# A comma between two digits ("1,000").
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit; the official pattern also carries a
# malformed look-behind that never fires, so in effect this is the rule.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")

_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# The lower-case entries of the official contractions map (entries whose key
# contains a capital letter can never match after lower-casing and are left out).
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "lets": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "shant": "shan't",
    "shed": "she'd",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "thats": "that's",
    "thered": "there'd",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed": "we'd",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _vqa_punctuation(text: str) -> str:
    """Apply the official ``processPunctuation`` rules to ``text``.

    Each punctuation mark is deleted when it touches a space somewhere in the
    text, or when the text contains a digit-comma-digit group; otherwise it is
    replaced by a space. Finally periods not followed by a digit are removed.
    """
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise a VQA answer the way the official VQAv2 eval script does.

    Steps, in order: newlines/tabs become spaces, lower-case, strip; punctuation
    handling of ``processPunctuation`` (commas between digits disappear, other
    marks are deleted or replaced by a space, periods are dropped unless they
    precede a digit, so decimals like ``3.5`` survive); number words ``zero``
    to ``ten`` (and ``none``) become digits; the articles ``a``, ``an``, ``the``
    are dropped; common apostrophe-less contractions are restored
    (``dont`` -> ``don't``); whitespace is collapsed to single spaces.

    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    """
    text = answer.replace("\n", " ").replace("\t", " ").lower().strip()
    text = _vqa_punctuation(text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy of one prediction, in [0, 1].

    The prediction and every ground-truth answer are normalised with
    :func:`normalize_vqa_answer`. For each ground-truth answer ``i`` the
    accuracy is ``min(1, m_i / 3)`` where ``m_i`` counts the matches among the
    *other* answers; the result is the mean over all ``i`` (leave-one-out).
    With the usual 10 answers, 3 or more matches among 10 give 0.9 or 1.0 and
    1 match gives 0.3. The same average is used for fewer answers, so a single
    ground-truth answer always scores 0 (there is no other answer to match).

    Raises:
        ValueError: if ``gt_answers`` is empty.
    """
    if not gt_answers:
        raise ValueError("vqa_soft_accuracy needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in gt_answers]
    total = sum(matches)
    accs = [min(1.0, (total - int(hit)) / 3.0) for hit in matches]
    return sum(accs) / len(accs)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQAv2 soft accuracy over questions, in percent (0-100).

    Raises:
        ValueError: if the lists differ in length, are empty, or a question has
            no ground-truth answers.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("vqa_accuracy needs at least one question")
    total = sum(vqa_soft_accuracy(p, a) for p, a in zip(predictions, answers))
    return 100.0 * total / len(predictions)


# --------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------

_CAPTION_PUNCT = str.maketrans("", "", string.punctuation)

_NGram = tuple[str, ...]

#: tokens the COCO toolkit drops after PTB tokenisation (pycocoevalcap ``ptbtokenizer.PUNCTUATIONS``);
#: with its ``-lowerCase`` option brackets come out as ``-lrb-`` ..., which this list does not hold
COCO_PUNCTUATIONS = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)
#: the tokenizers :func:`cider_d` knows, by the name eval records as ``cider_tokenizer``
CIDER_TOKENIZERS = ("coco-ptb-java", "ptb-python", "simple")

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
#: words CoreNLP keeps with their period (``no.`` only before a number: "No. 5", but "says no.")
_ABBREVIATIONS = frozenset(
    ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "ft", "vs", "etc", "inc", "ltd", "co", "corp",
     "ave", "blvd", "rd", "gen", "col", "lt", "sgt", "capt", "rev", "jan", "feb", "mar", "apr", "jun", "jul",
     "aug", "sep", "sept", "oct", "nov", "dec")
)  # fmt: skip
_URL = re.compile(r"^(?:(?:https?://|www\.)\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)$")
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                "gimme": "gim me", "lemme": "lem me"}  # fmt: skip
_PTB_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r'["\u201c\u201d]', " "),  # quotes become `` and '', which COCO drops
        (r"[\u2018\u2019]", "'"),
        (r"(^|[^\w])'+|'+($|[^\w])|`", r"\1 \2"),  # single quotes, not inside a word (o'clock)
        (r"\.\.\.+", " ... "),
        (r"--+", " -- "),
        (r"([\w])n't\b", r"\1 n't"),  # don't -> do n't, can't -> ca n't
        (r"([\w])'(s|re|ve|ll|d|m)\b", r"\1 '\2"),  # dog's -> dog 's
        (r"(\w)'n'(\w)", r"\1 'n' \2"),  # rock'n'roll
        (r"([,:])(?!\d)|(?<!\d)([,:])", r" \1\2 "),  # , and : except inside numbers (1,000 12:30)
        (r"([;!?%$#&*+=<>|~^()\[\]{}])", r" \1 "),
        (r"(^|\s)-+|-+($|\s)", r"\1 - \2"),  # a hyphen at a word's edge (not inside: black-and-white)
    )
)


def _ptb_token(token: str) -> list[str]:
    """Split a sentence-final period off a token, keeping abbreviations (u.s., mr.) and numbers."""
    if not token.endswith(".") or token == "." or _URL.match(token):
        return [token]
    stem = token.rstrip(".")
    if re.fullmatch(r"(?:[a-z]\.){2,}", token) or stem in _ABBREVIATIONS:
        return [token]
    return [stem, "."] if stem else ["."]


def ptb_tokenize(text: str) -> list[str]:
    """The tokens the COCO caption toolkit scores, by ecoflap's Python port of its rules.

    The toolkit runs Stanford CoreNLP's ``PTBTokenizer -preserveLines -lowerCase`` (Java) and
    drops :data:`COCO_PUNCTUATIONS`. This port applies the same rules for caption text: lower
    case; clitics split (``dog 's``, ``do n't``, ``ca n't``, ``they 're``, ``can not``,
    ``gon na``); brackets as ``-lrb-`` ... (kept, as the toolkit keeps them); punctuation split off
    words but kept inside numbers (``3.5``, ``1,000``, ``12:30``), hyphenated and slashed words
    (``black-and-white``, ``hat/cap``), abbreviations (``u.s.``, ``mr.``), ``o'clock``, URLs
    and e-mail addresses; then the toolkit's punctuation list removed.
    """
    chunks = text.replace("\n", " ").lower().split()
    tokens: list[str] = []
    for i, chunk in enumerate(chunks):
        if _URL.match(chunk) or (chunk == "no." and i + 1 < len(chunks) and chunks[i + 1][:1].isdigit()):
            tokens.append(chunk)
            continue
        chunk = _SPLIT_WORDS.get(chunk, chunk)
        for pattern, replacement in _PTB_RULES:
            chunk = pattern.sub(replacement, chunk)
        for token in chunk.split():
            tokens += _ptb_token(_BRACKETS.get(token, token))
    return [t for t in tokens if t not in COCO_PUNCTUATIONS]


def simple_tokenize(text: str) -> list[str]:
    """Lower-case, delete ASCII punctuation, split on whitespace (ecoflap before 0.x; no PTB rules)."""
    return text.lower().translate(_CAPTION_PUNCT).split()


def coco_java_available() -> bool:
    """Whether the COCO toolkit's own tokenizer can run: pycocoevalcap installed and java on PATH."""
    import importlib.util
    import shutil

    return importlib.util.find_spec("pycocoevalcap") is not None and shutil.which("java") is not None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 (a child process's stderr too) to /dev/null for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def coco_java_tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Tokens of each text by pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1 in Java), the
    COCO toolkit's own, in one Java run. Raises RuntimeError when it cannot run."""
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as exc:
        raise RuntimeError("pycocoevalcap is not installed") from exc
    captions = {i: [{"caption": text}] for i, text in enumerate(texts)}
    try:
        with _quiet_stderr():  # java prints a timing line on stderr
            tokenized = PTBTokenizer().tokenize(captions)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the COCO PTB tokenizer failed: {exc}") from exc
    if len(tokenized) != len(texts):
        raise RuntimeError("the COCO PTB tokenizer returned another number of captions")
    return [tokenized[i][0].split() for i in range(len(texts))]


def resolve_cider_tokenizer(choice: str = "auto") -> str:
    """The tokenizer :func:`cider_d` will use for ``choice``: ``auto`` is the COCO toolkit's own
    (``coco-ptb-java``) when pycocoevalcap and java are present, else ``ptb-python``."""
    if choice == "auto":
        return "coco-ptb-java" if coco_java_available() else "ptb-python"
    if choice not in CIDER_TOKENIZERS:
        raise ValueError(f"unknown CIDEr tokenizer {choice!r} (choose from auto, {', '.join(CIDER_TOKENIZERS)})")
    return choice


def tokenize_captions(texts: Sequence[str], tokenizer: str = "ptb-python") -> list[list[str]]:
    """Tokens of each caption by a tokenizer of :data:`CIDER_TOKENIZERS` (or ``auto``)."""
    name = resolve_cider_tokenizer(tokenizer)
    if name == "coco-ptb-java":
        return coco_java_tokenize(texts)
    split = ptb_tokenize if name == "ptb-python" else simple_tokenize
    return [split(t) for t in texts]


def _ngram_counts(words: Sequence[str], n: int) -> Counter[_NGram]:
    """Counts of all 1..n-grams of the tokens."""
    counts: Counter[_NGram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _tfidf(
    counts: Counter[_NGram], doc_freq: Counter[_NGram], ref_len: float, n: int
) -> tuple[list[dict[_NGram, float]], list[float], int]:
    """Per-order tf-idf vectors, their L2 norms and the coco-caption "length".

    As in coco-caption, the length is the number of *bigrams* (the count of
    n-grams with ``len(ngram) - 1 == 1``), i.e. word count minus one.
    """
    vecs: list[dict[_NGram, float]] = [{} for _ in range(n)]
    norms = [0.0] * n
    length = 0
    for ngram, tf in counts.items():
        order = len(ngram) - 1
        weight = float(tf) * (ref_len - math.log(max(1.0, float(doc_freq[ngram]))))
        vecs[order][ngram] = weight
        norms[order] += weight * weight
        if order == 1:
            length += tf
    return vecs, [math.sqrt(v) for v in norms], length


def _cider_sim(
    hyp: tuple[list[dict[_NGram, float]], list[float], int],
    ref: tuple[list[dict[_NGram, float]], list[float], int],
    sigma: float,
) -> list[float]:
    """coco-caption ``CiderScorer.sim``: clipped cosine per order times the length penalty."""
    vec_h, norm_h, len_h = hyp
    vec_r, norm_r, len_r = ref
    delta = float(len_h - len_r)
    penalty = math.exp(-(delta**2) / (2.0 * sigma**2))
    vals = []
    for order, grams in enumerate(vec_h):
        val = 0.0
        for ngram, weight in grams.items():
            ref_weight = vec_r[order].get(ngram, 0.0)
            val += min(weight, ref_weight) * ref_weight
        if norm_h[order] != 0 and norm_r[order] != 0:
            val /= norm_h[order] * norm_r[order]
        vals.append(val * penalty)
    return vals


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenizer: str = "ptb-python",
) -> tuple[float, list[float]]:
    """CIDEr-D as defined by coco-caption's ``CiderD`` scorer.

    Returns ``(corpus_score, per_item_scores)``; the corpus score is the mean of
    the per-item scores. Semantics follow coco-caption exactly:

    * document frequency ``df(g)`` = number of items whose reference set
      contains n-gram ``g`` (computed over *this* corpus's references);
    * tf-idf weight ``tf * (log(N) - log(max(1, df)))`` with ``N`` = number of
      items (images);
    * per order ``k`` in 1..n: ``sum_g min(h_g, r_g) * r_g / (|h| |r|)`` (the
      "clipped" cosine; no division when either norm is 0), times the Gaussian
      penalty ``exp(-delta**2 / (2 sigma**2))`` where ``delta`` is the
      difference of the coco-caption lengths (which count bigrams, i.e.
      words minus one);
    * mean over orders, mean over references, times 10.

    Captions are tokenised as the COCO toolkit does before scoring, by
    ``tokenizer`` (:func:`tokenize_captions`): ``coco-ptb-java`` is the
    toolkit's own Stanford PTB tokenizer (pycocoevalcap and java), ``ptb-python``
    ecoflap's Python port of its rules (:func:`ptb_tokenize`), ``simple`` the
    earlier lower-case / strip punctuation / split; ``auto`` the first of the two
    PTB ones that can run (:func:`resolve_cider_tokenizer`).

    Raises:
        ValueError: on length mismatch, an empty corpus, an item without
            references, or ``n < 1``.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("cider_d needs at least one candidate")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every candidate needs at least one reference")
    tokens = tokenize_captions([*candidates, *(r for refs in references for r in refs)], tokenizer)
    cand_tokens, ref_tokens = tokens[: len(candidates)], iter(tokens[len(candidates) :])
    ref_counts = [[_ngram_counts(next(ref_tokens), n) for _ in refs] for refs in references]
    doc_freq: Counter[_NGram] = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    ref_len = math.log(float(len(candidates)))
    scores: list[float] = []
    for cand, refs in zip(cand_tokens, ref_counts):
        hyp = _tfidf(_ngram_counts(cand, n), doc_freq, ref_len, n)
        total = [0.0] * n
        for ref in refs:
            sims = _cider_sim(hyp, _tfidf(ref, doc_freq, ref_len, n), sigma)
            total = [t + s for t, s in zip(total, sims)]
        scores.append(10.0 * (sum(total) / n) / len(refs))
    return sum(scores) / len(scores), scores


# --------------------------------------------------------------------------
# Retrieval and zero-shot classification
# --------------------------------------------------------------------------

#: entries compared per chunk when ranking (bounds memory: COCO's 25k x 5k matrix in slices)
_CHUNK_ELEMENTS = 1 << 24
#: best rank of a query none of whose ground-truth columns exists in the row
_MISS = 1 << 62

Matrix = Union["torch.Tensor", Sequence[Sequence[float]]]


def _as_matrix(values: Matrix, what: str) -> torch.Tensor:
    """A 2-D float tensor of the scores; lists become float64, so they compare as Python floats do."""
    import torch

    if isinstance(values, torch.Tensor):
        matrix = values.detach()
        if not matrix.is_floating_point():
            matrix = matrix.double()
    else:
        rows = [list(row) for row in values]
        if len({len(row) for row in rows}) > 1:
            raise ValueError(f"every row of the {what} matrix needs the same length")
        matrix = torch.tensor(rows, dtype=torch.float64) if rows else torch.zeros(0, 0, dtype=torch.float64)
    if matrix.dim() != 2:
        raise ValueError(f"the {what} matrix must be 2-D, got {matrix.dim()}-D")
    if matrix.numel() and bool(torch.isnan(matrix).any()):
        raise ValueError(f"the {what} matrix holds NaN")
    return matrix


def _best_ranks(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per row of ``matrix``: the best (lowest) rank among the (row, col) ground-truth pairs.

    A column's rank is the number of columns before it when the row is sorted by descending
    score with ties to the lower index: the columns scoring higher, plus the tied ones to its left.
    The best-ranked ground truth of a row is its highest-scoring one (the lowest index among
    ties), so one comparison per row suffices. Rows without a pair get ``_MISS``.
    """
    import torch

    queries = matrix.shape[0]
    best = torch.full((queries,), _MISS, dtype=torch.long, device=matrix.device)
    if rows.numel() == 0:
        return best
    scores = matrix[rows, cols]
    top = torch.full((queries,), float("-inf"), dtype=matrix.dtype, device=matrix.device)
    top.scatter_reduce_(0, rows, scores, reduce="amax")
    first = torch.full((queries,), matrix.shape[1], dtype=torch.long, device=matrix.device)
    tied = scores == top[rows]
    first.scatter_reduce_(0, rows[tied], cols[tied], reduce="amin")
    present = torch.unique(rows)
    index = torch.arange(matrix.shape[1], device=matrix.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, matrix.shape[1]))
    for start in range(0, present.numel(), step):
        q = present[start : start + step]
        row, target, col = matrix[q], top[q, None], first[q, None]
        best[q] = (row > target).sum(dim=1) + ((row == target) & (index < col)).sum(dim=1)
    return best


def _recalls(matrix: torch.Tensor, pairs: tuple[list[int], list[int]], ks: tuple[int, ...]) -> dict[int, float]:
    import torch

    rows = torch.tensor(pairs[0], dtype=torch.long, device=matrix.device)
    cols = torch.tensor(pairs[1], dtype=torch.long, device=matrix.device)
    best = _best_ranks(matrix, rows, cols)
    queries = matrix.shape[0]
    return {k: 100.0 * int((best < k).sum()) / queries for k in ks}


def _check_ks(ks: tuple[int, ...]) -> None:
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")


def recall_at_k(
    similarity: Matrix,
    gt: Sequence[Iterable[int]],
    ks: Iterable[int] = (1, 5, 10),
) -> dict[int, float]:
    """Recall@K in percent for a query-by-candidate similarity matrix (a tensor or nested lists).

    Row ``q`` is ranked by descending similarity, ties broken by the lower
    column index first. Query ``q`` is a hit at ``k`` when any column in
    ``gt[q]`` is among its first ``k`` columns (indices outside the row never
    are). A ``k`` larger than the number of columns means the whole row.
    Returns ``{k: percent of queries hit}``. Computed with torch on the
    matrix's device, in slices of the rows.

    Raises:
        ValueError: if ``similarity`` is empty, ragged or holds NaN, ``gt`` has
            another length, a query has no ground truth, or some ``k < 1``.
    """
    ks = tuple(ks)
    matrix = _as_matrix(similarity, "similarity")
    if matrix.shape[0] == 0:
        raise ValueError("recall_at_k needs at least one query")
    if matrix.shape[0] != len(gt):
        raise ValueError(f"{matrix.shape[0]} queries but {len(gt)} ground-truth sets")
    _check_ks(ks)
    rows: list[int] = []
    cols: list[int] = []
    width = matrix.shape[1]
    for q, targets in enumerate(gt):
        wanted = set(targets)
        if not wanted:
            raise ValueError("every query needs at least one ground-truth column")
        valid = [j for j in wanted if 0 <= j < width]
        rows += [q] * len(valid)
        cols += valid
    return _recalls(matrix, (rows, cols), ks)


def retrieval_recalls(
    image_text_sim: Matrix,
    text_to_image: Sequence[int],
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K in percent.

    ``image_text_sim[i][t]`` is the similarity of image ``i`` and text ``t``
    (a tensor or nested lists); ``text_to_image[t]`` is the image that text
    ``t`` describes (an image may have several captions). Image->text counts a
    hit when any of the image's captions is in the top ``k``; text->image when
    the caption's image is. Keys are ``"i2t_r{k}"`` and ``"t2i_r{k}"``. Ties:
    see :func:`recall_at_k`.

    Raises:
        ValueError: on shape mismatch or an image without any caption.
    """
    ks = tuple(ks)
    matrix = _as_matrix(image_text_sim, "similarity")
    n_images = matrix.shape[0]
    if n_images and matrix.shape[1] != len(text_to_image):
        raise ValueError("every similarity row needs one column per text")
    if any(not 0 <= i < n_images for i in text_to_image):
        raise ValueError("text_to_image holds an image index outside the matrix")
    if n_images == 0:
        raise ValueError("recall_at_k needs at least one query")
    _check_ks(ks)
    if len(set(text_to_image)) < n_images:
        raise ValueError("every query needs at least one ground-truth column")
    texts = list(range(len(text_to_image)))
    i2t = _recalls(matrix, (list(text_to_image), texts), ks)
    t2i = _recalls(matrix.T, (texts, list(text_to_image)), ks)
    out = {f"i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in t2i.items()})
    return out


def zero_shot_accuracy(
    logits: Matrix,
    labels: Sequence[int],
    topk: Iterable[int] = (1, 5),
) -> dict[int, float]:
    """Top-k classification accuracy in percent, ``{k: accuracy}``.

    A sample is correct at ``k`` when its label is among the ``k`` highest
    logits (a tensor or nested lists); ties are broken by the lower class
    index, as in :func:`recall_at_k`.

    Raises:
        ValueError: if the lists are empty or differ in length, a label is out
            of range, or some ``k < 1``.
    """
    matrix = _as_matrix(logits, "logits")
    if matrix.shape[0] != len(labels):
        raise ValueError(f"{matrix.shape[0]} rows of logits but {len(labels)} labels")
    if any(not 0 <= y < matrix.shape[1] for y in labels):
        raise ValueError("a label is outside the range of its logits row")
    return recall_at_k(matrix, [[y] for y in labels], topk)
