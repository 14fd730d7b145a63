"""Evaluation metrics for pruned vision-language models, in pure Python.

Only the standard library is used, so these functions can be imported and
tested without torch or numpy. They cover:

* VQAv2 answer normalisation and soft accuracy (the official VQA eval rules);
* CIDEr-D for captioning (the coco-caption ``CiderD`` definition);
* Recall@K for image-text retrieval, in both directions;
* top-k accuracy for zero-shot classification.

All scores that are reported as percentages are in the range 0-100.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = [
    "cider_d",
    "normalize_vqa_answer",
    "recall_at_k",
    "retrieval_recalls",
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


def _caption_tokens(text: str) -> list[str]:
    """Lower-case, delete ASCII punctuation, split on whitespace."""
    return text.lower().translate(_CAPTION_PUNCT).split()


def _ngram_counts(text: str, n: int) -> Counter[_NGram]:
    """Counts of all 1..n-grams of the tokenised ``text``."""
    words = _caption_tokens(text)
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

    Tokenisation here is lower-casing, deleting ASCII punctuation and splitting
    on whitespace; the official pipeline uses the Stanford PTB tokenizer, so
    scores can differ slightly on text with punctuation or clitics.

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
    ref_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]
    doc_freq: Counter[_NGram] = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    ref_len = math.log(float(len(candidates)))
    scores: list[float] = []
    for cand, refs in zip(candidates, ref_counts):
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


def _ranking(row: Sequence[float]) -> list[int]:
    """Column indices by descending score; ties go to the lower index."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


def recall_at_k(
    similarity: Sequence[Sequence[float]],
    gt: Sequence[Iterable[int]],
    ks: Iterable[int] = (1, 5, 10),
) -> dict[int, float]:
    """Recall@K in percent for a query-by-candidate similarity matrix.

    Row ``q`` is ranked by descending similarity, ties broken by the lower
    column index first. Query ``q`` is a hit at ``k`` when any column in
    ``gt[q]`` is among its first ``k`` columns. A ``k`` larger than the number
    of columns means the whole row. Returns ``{k: percent of queries hit}``.

    Raises:
        ValueError: if ``similarity`` is empty, ``gt`` has another length, a
            query has no ground truth, or some ``k < 1``.
    """
    ks = tuple(ks)
    if not similarity:
        raise ValueError("recall_at_k needs at least one query")
    if len(similarity) != len(gt):
        raise ValueError(f"{len(similarity)} queries but {len(gt)} ground-truth sets")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    hits = dict.fromkeys(ks, 0)
    for row, targets in zip(similarity, gt):
        wanted = set(targets)
        if not wanted:
            raise ValueError("every query needs at least one ground-truth column")
        ranks = _ranking(row)
        best = min((pos for pos, col in enumerate(ranks) if col in wanted), default=None)
        for k in ks:
            if best is not None and best < k:
                hits[k] += 1
    return {k: 100.0 * hits[k] / len(similarity) for k in ks}


def retrieval_recalls(
    image_text_sim: Sequence[Sequence[float]],
    text_to_image: Sequence[int],
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K in percent.

    ``image_text_sim[i][t]`` is the similarity of image ``i`` and text ``t``;
    ``text_to_image[t]`` is the image that text ``t`` describes (an image may
    have several captions). Image->text counts a hit when any of the image's
    captions is in the top ``k``; text->image when the caption's image is.
    Keys are ``"i2t_r{k}"`` and ``"t2i_r{k}"``. Ties: see :func:`recall_at_k`.

    Raises:
        ValueError: on shape mismatch or an image without any caption.
    """
    ks = tuple(ks)
    n_images = len(image_text_sim)
    if any(len(row) != len(text_to_image) for row in image_text_sim):
        raise ValueError("every similarity row needs one column per text")
    if any(not 0 <= i < n_images for i in text_to_image):
        raise ValueError("text_to_image holds an image index outside the matrix")
    captions: list[set[int]] = [set() for _ in range(n_images)]
    for t, i in enumerate(text_to_image):
        captions[i].add(t)
    text_image_sim = [list(col) for col in zip(*image_text_sim)]
    i2t = recall_at_k(image_text_sim, captions, ks)
    t2i = recall_at_k(text_image_sim, [[i] for i in text_to_image], ks)
    out = {f"i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in t2i.items()})
    return out


def zero_shot_accuracy(
    logits: Sequence[Sequence[float]],
    labels: Sequence[int],
    topk: Iterable[int] = (1, 5),
) -> dict[int, float]:
    """Top-k classification accuracy in percent, ``{k: accuracy}``.

    A sample is correct at ``k`` when its label is among the ``k`` highest
    logits; ties are broken by the lower class index, as in
    :func:`recall_at_k`.

    Raises:
        ValueError: if the lists are empty or differ in length, a label is out
            of range, or some ``k < 1``.
    """
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} rows of logits but {len(labels)} labels")
    if any(not 0 <= y < len(row) for row, y in zip(logits, labels)):
        raise ValueError("a label is outside the range of its logits row")
    return recall_at_k(logits, [[y] for y in labels], topk)
