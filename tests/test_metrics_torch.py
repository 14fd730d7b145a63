"""Retrieval and zero-shot metrics ranked with torch equal the earlier pure-Python ones; CIDEr's
PTB tokenisation (the COCO toolkit's Java tokenizer when present, else the Python port).

``python tests/test_metrics_torch.py`` times both implementations on a 1000 x 5000 matrix
(docs/evaluation.md, "Metrics speed").
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterable, Sequence

import pytest
import torch

from ecoflap_cli.evaluation import metrics
from ecoflap_cli.evaluation.metrics import (
    cider_d,
    ptb_tokenize,
    recall_at_k,
    resolve_cider_tokenizer,
    retrieval_recalls,
    tokenize_captions,
    zero_shot_accuracy,
)

# --- the earlier implementation, kept as the reference ----------------------------------------


def ref_ranking(row: Sequence[float]) -> list[int]:
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


def ref_recall_at_k(
    similarity: Sequence[Sequence[float]], gt: Sequence[Iterable[int]], ks: Iterable[int] = (1, 5, 10)
) -> dict[int, float]:
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
        ranks = ref_ranking(row)
        best = min((pos for pos, col in enumerate(ranks) if col in wanted), default=None)
        for k in ks:
            if best is not None and best < k:
                hits[k] += 1
    return {k: 100.0 * hits[k] / len(similarity) for k in ks}


def ref_retrieval_recalls(
    image_text_sim: Sequence[Sequence[float]], text_to_image: Sequence[int], ks: Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
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
    i2t = ref_recall_at_k(image_text_sim, captions, ks)
    t2i = ref_recall_at_k(text_image_sim, [[i] for i in text_to_image], ks)
    out = {f"i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in t2i.items()})
    return out


def ref_zero_shot_accuracy(
    logits: Sequence[Sequence[float]], labels: Sequence[int], topk: Iterable[int] = (1, 5)
) -> dict[int, float]:
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} rows of logits but {len(labels)} labels")
    if any(not 0 <= y < len(row) for row, y in zip(logits, labels)):
        raise ValueError("a label is outside the range of its logits row")
    return ref_recall_at_k(logits, [[y] for y in labels], topk)


# --- random inputs ----------------------------------------------------------------------------


def random_matrix(rng: random.Random, rows: int, cols: int, ties: bool) -> list[list[float]]:
    """Scores; with ``ties`` a handful of distinct values, so most rows hold ties."""
    if ties:
        return [[float(rng.randint(0, 3)) for _ in range(cols)] for _ in range(rows)]
    return [[rng.uniform(-1.0, 1.0) for _ in range(cols)] for _ in range(rows)]


CASES = [(seed, ties) for seed in range(12) for ties in (False, True)]


@pytest.mark.parametrize(("seed", "ties"), CASES)
def test_recall_at_k_equals_the_python_reference(seed: int, ties: bool) -> None:
    rng = random.Random(seed)
    rows, cols = rng.randint(1, 30), rng.randint(1, 40)
    sim = random_matrix(rng, rows, cols, ties)
    # several ground-truth columns per query, some outside the row (never a hit)
    gt = [rng.sample(range(-2, cols + 3), rng.randint(1, min(4, cols + 5))) for _ in range(rows)]
    # distinct ks: the reference counted a repeated k twice (a k listed twice could exceed 100%)
    ks = tuple(dict.fromkeys((1, 2, 5, 10, cols, cols + 7)))
    expected = ref_recall_at_k(sim, gt, ks)
    assert recall_at_k(sim, gt, ks) == expected
    assert recall_at_k(torch.tensor(sim, dtype=torch.float64), gt, ks) == expected


@pytest.mark.parametrize(("seed", "ties"), CASES)
def test_retrieval_recalls_equal_the_python_reference(seed: int, ties: bool) -> None:
    rng = random.Random(100 + seed)
    images = rng.randint(1, 20)
    text_to_image = list(range(images)) + [rng.randrange(images) for _ in range(rng.randint(0, 40))]
    rng.shuffle(text_to_image)
    sim = random_matrix(rng, images, len(text_to_image), ties)
    expected = ref_retrieval_recalls(sim, text_to_image, (1, 5, 10))
    assert retrieval_recalls(sim, text_to_image, (1, 5, 10)) == expected
    # float32 scores (as the model computes them): the same ranking as their float64 values
    as_f32 = torch.tensor(sim, dtype=torch.float32)
    assert retrieval_recalls(as_f32, text_to_image) == ref_retrieval_recalls(as_f32.tolist(), text_to_image)


@pytest.mark.parametrize(("seed", "ties"), CASES)
def test_zero_shot_accuracy_equals_the_python_reference(seed: int, ties: bool) -> None:
    rng = random.Random(200 + seed)
    samples, classes = rng.randint(1, 50), rng.randint(1, 12)
    logits = random_matrix(rng, samples, classes, ties)
    labels = [rng.randrange(classes) for _ in range(samples)]
    expected = ref_zero_shot_accuracy(logits, labels, (1, 3, 5))
    assert zero_shot_accuracy(logits, labels, (1, 3, 5)) == expected
    assert zero_shot_accuracy(torch.tensor(logits), labels, (1, 3, 5)) == ref_zero_shot_accuracy(
        torch.tensor(logits).tolist(), labels, (1, 3, 5)
    )


def test_large_matrix_in_slices_equals_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are ranked in slices; a slice size that does not divide the pairs changes nothing."""
    rng = random.Random(7)
    sim = random_matrix(rng, 40, 300, ties=True)
    text_to_image = [rng.randrange(40) for _ in range(260)] + list(range(40))
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7 * 40 + 3)
    assert retrieval_recalls(sim, text_to_image) == ref_retrieval_recalls(sim, text_to_image)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: f[0]([], []), "at least one query"),
        (lambda f: f[0]([[1.0]], [[0], [0]]), "ground-truth sets"),
        (lambda f: f[0]([[1.0]], [[]]), "at least one ground-truth"),
        (lambda f: f[0]([[1.0]], [[0]], ks=(0,)), "k must be"),
        (lambda f: f[1]([[1.0, 0.0]], [0]), "one column per text"),
        (lambda f: f[1]([[1.0]], [3]), "outside the matrix"),
        (lambda f: f[1]([[1.0, 2.0], [0.0, 1.0]], [0, 0]), "at least one ground-truth"),
        (lambda f: f[2]([[1.0, 2.0]], [0, 1]), "labels"),
        (lambda f: f[2]([[1.0, 2.0]], [2]), "outside the range"),
    ],
)
def test_errors_are_the_reference_errors(call, message: str) -> None:
    for implementation in (
        (recall_at_k, retrieval_recalls, zero_shot_accuracy),
        (ref_recall_at_k, ref_retrieval_recalls, ref_zero_shot_accuracy),
    ):
        with pytest.raises(ValueError, match=message):
            call(implementation)


def test_ragged_and_nan_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="same length"):
        recall_at_k([[1.0, 2.0], [1.0]], [[0], [0]])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[float("nan"), 1.0]]), [[0]])


# --- CIDEr tokenisation -----------------------------------------------------------------------

#: caption -> the tokens of the COCO toolkit's Java PTBTokenizer (pycocoevalcap 1.2), recorded
PTB_CASES = {
    "A dog's toy (red) is on the black-and-white floor.": (
        "a dog 's toy -lrb- red -rrb- is on the black-and-white floor"
    ),
    "Two men don't play; they can't.": "two men do n't play they ca n't",
    "A 3.5 ft tall cat, 1,000 birds & a U.S. flag!": "a 3.5 ft tall cat 1,000 birds & a u.s. flag",
    'He said "hello" to the man\'s wife...': "he said hello to the man 's wife",
    "A woman -- in a red shirt -- rides a bike.": "a woman in a red shirt rides a bike",
    "Mr. Smith's car isn't here?": "mr. smith 's car is n't here",
    "They're gonna eat lunch at 12:30 pm.": "they 're gon na eat lunch at 12:30 pm",
    "I'm at St. Mary's; it's 5 o'clock": "i 'm at st. mary 's it 's 5 o'clock",
    "a {curly} [square] `tick' word's end-": "a -lcb- curly -rcb- -lsb- square -rsb- tick word 's end",
    "cannot wanna 'quoted' rock'n'roll": "can not wan na quoted rock 'n' roll",
    "A man with a hat/cap and 50% off $5.00 sale #1": "a man with a hat/cap and 50 % off $ 5.00 sale # 1",
    "The dogs' bowls": "the dogs bowls",
    "A dog says no.": "a dog says no",
    "a man at No. 5 street": "a man at no. 5 street",
}

#: captions in the style of COCO's, for comparing the Python port with the Java tokenizer
REALISTIC = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in a grassy field.",
    "A kitchen with stainless steel appliances and granite counter tops.",
    "A woman's hand holding a smartphone, with a cup of coffee nearby.",
    "There's a red double-decker bus parked on the street.",
    "A group of people standing around a table (with food on it).",
    "An old black-and-white photo of a train station.",
    "The cat isn't sleeping; it's watching the birds outside.",
    'A sign that says "STOP" at an intersection.',
    "A plate of food: broccoli, rice and chicken.",
    "Several zebras grazing near a watering hole...",
    "A young boy swinging a baseball bat at a ball!",
    "Is this a giraffe or a horse?",
    "A 12-year-old girl flying a kite at the beach.",
    "A bathroom with a toilet, sink, and mirror",
    "people walking down a busy city street at night",
    "A pizza with pepperoni, cheese & olives on a wooden board.",
    "The clock on the tower reads 3:45.",
    "Two men in suits shaking hands in front of the U.S. Capitol.",
    "A dog laying on a couch next to a remote control.",
]


@pytest.mark.parametrize(("caption", "tokens"), list(PTB_CASES.items()))
def test_ptb_python_port_matches_recorded_java_tokens(caption: str, tokens: str) -> None:
    assert ptb_tokenize(caption) == tokens.split()


@pytest.mark.skipif(not metrics.coco_java_available(), reason="needs pycocoevalcap and java")
def test_ptb_python_port_matches_the_java_tokenizer_on_captions() -> None:
    captions = [*PTB_CASES, *REALISTIC]
    java = tokenize_captions(captions, "coco-ptb-java")
    assert [" ".join(t) for t in java[: len(PTB_CASES)]] == list(PTB_CASES.values())
    assert [ptb_tokenize(c) for c in captions] == java
    refs = [[c, REALISTIC[(i + 3) % len(REALISTIC)]] for i, c in enumerate(REALISTIC)]
    candidates = [c.upper() for c in reversed(REALISTIC)]
    assert cider_d(candidates, refs, tokenizer="ptb-python") == cider_d(candidates, refs, tokenizer="coco-ptb-java")


def test_tokenizers_differ_where_ptb_rules_matter() -> None:
    """The earlier tokenizer glued clitics and hyphenated words; PTB keeps what COCO scores."""
    assert tokenize_captions(["A dog's black-and-white toy."], "simple") == [["a", "dogs", "blackandwhite", "toy"]]
    assert tokenize_captions(["A dog's black-and-white toy."], "ptb-python") == [
        ["a", "dog", "'s", "black-and-white", "toy"]
    ]
    refs = [["a dog's black-and-white toy"], ["two cats on a mat"]]
    candidates = ["a dog's black-and-white toy", "two cats on a mat"]
    simple, _ = cider_d(candidates, refs, tokenizer="simple")
    ptb, _ = cider_d(candidates, refs, tokenizer="ptb-python")
    assert simple == pytest.approx(ptb)  # identical texts score alike either way...
    partial = ["a dog's toy", "two cats"]
    assert cider_d(partial, refs, tokenizer="simple")[0] != cider_d(partial, refs, tokenizer="ptb-python")[0]


def test_resolve_cider_tokenizer() -> None:
    auto = resolve_cider_tokenizer("auto")
    assert auto == ("coco-ptb-java" if metrics.coco_java_available() else "ptb-python")
    assert resolve_cider_tokenizer("simple") == "simple"
    with pytest.raises(ValueError, match="unknown CIDEr tokenizer"):
        resolve_cider_tokenizer("spacy")


def test_auto_falls_back_to_the_python_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "coco_java_available", lambda: False)
    assert resolve_cider_tokenizer("auto") == "ptb-python"
    assert tokenize_captions(["Mr. Smith's car."], "auto") == [["mr.", "smith", "'s", "car"]]


# --- speed (docs/evaluation.md) ---------------------------------------------------------------


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(images: int = 1000, texts: int = 5000, repeats: int = 5) -> None:
    """Median seconds of the earlier and the torch implementations, run in turn in one process
    (interleaved, so a busy machine slows both alike)."""
    generator = torch.Generator().manual_seed(0)
    sim = torch.randn(images, texts, generator=generator)
    text_to_image = [t % images for t in range(texts)]
    as_lists = sim.tolist()
    logits = torch.randn(texts, images, generator=generator)
    labels = [t % images for t in range(texts)]
    logit_lists = logits.tolist()
    assert retrieval_recalls(sim, text_to_image) == ref_retrieval_recalls(as_lists, text_to_image)
    assert zero_shot_accuracy(logits, labels) == ref_zero_shot_accuracy(logit_lists, labels)
    runs: dict[str, list[float]] = {}
    calls = {
        "retrieval, pure Python (before)": lambda: ref_retrieval_recalls(as_lists, text_to_image),
        "retrieval, torch on the tensor": lambda: retrieval_recalls(sim, text_to_image),
        "retrieval, torch on nested lists": lambda: retrieval_recalls(as_lists, text_to_image),
        "zero-shot, pure Python (before)": lambda: ref_zero_shot_accuracy(logit_lists, labels),
        "zero-shot, torch on the tensor": lambda: zero_shot_accuracy(logits, labels),
    }
    for _ in range(repeats):
        for name, call in calls.items():
            runs.setdefault(name, []).append(_seconds(call))
    print(f"{images} images x {texts} texts, median of {repeats} runs, torch threads: {torch.get_num_threads()}")
    for name, times in runs.items():
        print(f"{name:34s} {statistics.median(times):8.3f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
