"""Tests for ecoflap_cli.evaluation.metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ecoflap_cli.evaluation.metrics import (
    cider_d,
    normalize_vqa_answer,
    recall_at_k,
    retrieval_recalls,
    vqa_accuracy,
    vqa_soft_accuracy,
    zero_shot_accuracy,
)

# --------------------------------------------------------------------------
# VQA normalisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("the cat", "cat"),
        ("A Cat", "cat"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats that", "what's that"),
        ("cant", "can't"),
        ("wont", "won't"),
        ("youre", "you're"),
        ("don't", "don't"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("none", "0"),
        ("ten", "10"),
        ("  Yes  \n", "yes"),
        ("red   and\tblue", "red and blue"),
        ("yes!", "yes"),
        ("black/white", "black white"),  # no mark touches a space -> replaced by space
        ("black / white", "black white"),  # mark touches a space -> deleted
        ("t-shirt", "t shirt"),
        ("1,000 (approx)", "1000 approx"),  # digit comma digit -> all marks deleted
        ("end. of story.", "end of story"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


# --------------------------------------------------------------------------
# VQA soft accuracy
# --------------------------------------------------------------------------


def _answers(n_match: int, match: str = "2", other: str = "3") -> list[str]:
    return [match] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    ("n_match", "expected"),
    [
        (0, 0.0),
        # 1 match: dropping it leaves 0 (1 subset), the 9 others see 1 -> 9 * 1/3 / 10
        (1, 0.3),
        # 2 matches: 2 subsets see 1 -> 1/3, 8 subsets see 2 -> 2/3: (2/3 + 16/3) / 10
        (2, 0.6),
        # 3 matches: 3 subsets see 2 -> 2/3, 7 subsets see 3 -> 1: (2 + 7) / 10
        (3, 0.9),
        # 4 matches: every subset sees >= 3
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_soft_accuracy_counts(n_match: int, expected: float) -> None:
    assert vqa_soft_accuracy("2", _answers(n_match)) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalises_both_sides() -> None:
    gts = ["two", "2", "Two."] + ["three"] * 7
    assert vqa_soft_accuracy("2", gts) == pytest.approx(0.9)
    assert vqa_soft_accuracy("The two", gts) == pytest.approx(0.9)


def test_vqa_soft_accuracy_fewer_answers() -> None:
    # 3 answers, 2 match: dropping a match leaves 1 -> 1/3 (twice),
    # dropping the non-match leaves 2 -> 2/3: (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert vqa_soft_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    # a single answer has no "other" answers to match
    assert vqa_soft_accuracy("yes", ["yes"]) == 0.0


def test_vqa_soft_accuracy_empty_raises() -> None:
    with pytest.raises(ValueError):
        vqa_soft_accuracy("yes", [])


def test_vqa_accuracy_percent() -> None:
    preds = ["2", "2", "no"]
    answers = [_answers(3), _answers(10), ["yes"] * 10]
    assert vqa_accuracy(preds, answers) == pytest.approx(100 * (0.9 + 1.0 + 0.0) / 3)


def test_vqa_accuracy_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        vqa_accuracy(["a"], [])
    with pytest.raises(ValueError):
        vqa_accuracy([], [])


# --------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------


def test_cider_identical_two_word_captions() -> None:
    # Corpus of 2 images, refs "a b" and "c d", candidates identical.
    # N = 2, every n-gram has df = 1, so every weight is tf * (log 2 - log 1) = log 2.
    # Order 1: hyp == ref -> clipped cosine = 1. Order 2: one bigram, equal -> 1.
    # Orders 3 and 4: no n-grams -> 0. Lengths equal -> penalty 1.
    # Score = 10 * (1 + 1 + 0 + 0) / 4 / 1 ref = 5.0 for each image.
    corpus, per_item = cider_d(["A b.", "c d"], [["a b"], ["c d"]])
    assert per_item == pytest.approx([5.0, 5.0])
    assert corpus == pytest.approx(5.0)


def test_cider_identical_four_word_caption_scores_ten() -> None:
    # All four orders have cosine 1 -> 10 * 4/4 = 10.
    _, per_item = cider_d(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]])
    assert per_item == pytest.approx([10.0, 10.0])


def test_cider_partial_match_with_length_penalty() -> None:
    # Refs "a b c d" / "e f g h", candidate 0 = "a b c". All df = 1, weight w = log 2.
    # Order 1: hyp {a,b,c}, ref {a,b,c,d}: 3w^2 / (sqrt(3) w * 2 w) = sqrt(3)/2
    # Order 2: hyp {ab,bc}, ref {ab,bc,cd}: 2 / (sqrt(2) sqrt(3)) = sqrt(2/3)
    # Order 3: hyp {abc}, ref {abc,bcd}: 1 / sqrt(2)
    # Order 4: hyp empty: 0
    # delta = bigram counts 2 - 3 = -1 -> penalty exp(-1 / (2 * 36))
    expected = 10 * math.exp(-1 / 72) * (math.sqrt(3) / 2 + math.sqrt(2 / 3) + 1 / math.sqrt(2)) / 4
    _, per_item = cider_d(["a b c", "e f g h"], [["a b c d"], ["e f g h"]])
    assert per_item[0] == pytest.approx(expected)
    assert per_item[1] == pytest.approx(10.0)


def test_cider_clipping() -> None:
    # Candidate "a a" vs ref "a b", N = 2 (other image "c d"), weights w = log 2.
    # Order 1: hyp {a: 2w}, ref {a: w, b: w}: min(2w, w) * w / (2w * sqrt(2) w)
    #          = 1 / (2 sqrt 2)   (1 / sqrt 2 without clipping)
    # Order 2: bigram "a a" not in ref: 0. Orders 3-4: 0. Same length -> penalty 1.
    _, per_item = cider_d(["a a", "c d"], [["a b"], ["c d"]])
    assert per_item[0] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)


def test_cider_averages_over_references() -> None:
    # Image 0 has refs "a b" and "x y"; image 1 has "c d". N = 2, all df = 1.
    # Candidate "a b": sim with "a b" is 5.0-worth (orders 1, 2 = 1), with "x y" 0.
    # Score = 10 * ((1 + 1) / 4 + 0) / 2 refs = 2.5.
    _, per_item = cider_d(["a b", "c d"], [["a b", "x y"], ["c d"]])
    assert per_item[0] == pytest.approx(2.5)


def test_cider_ngram_in_every_image_has_zero_weight() -> None:
    # "a" appears in the references of both images: idf = log 2 - log 2 = 0.
    _, per_item = cider_d(["a", "a"], [["a b"], ["a c"]])
    assert per_item == pytest.approx([0.0, 0.0])


def test_cider_properties() -> None:
    refs = [["a dog runs on the grass"], ["a cat sleeps on a sofa"], ["two birds fly"]]
    same, _ = cider_d(["a dog runs on the grass", "x", "y"], refs)
    disjoint, per_item = cider_d(["purple elephant dancing", "x", "y"], refs)
    assert per_item == [0.0, 0.0, 0.0]
    assert disjoint == 0.0
    assert same > disjoint


def test_cider_errors() -> None:
    with pytest.raises(ValueError):
        cider_d(["a"], [])
    with pytest.raises(ValueError):
        cider_d([], [])
    with pytest.raises(ValueError):
        cider_d(["a"], [[]])


# --------------------------------------------------------------------------
# Retrieval and zero-shot
# --------------------------------------------------------------------------


def test_recall_at_k_hand_worked() -> None:
    sim = [
        [0.9, 0.1, 0.5],  # ranking 0, 2, 1; gt 0 at rank 1 -> hit@1
        [0.8, 0.3, 0.6],  # ranking 0, 2, 1; gt 1 at rank 3 -> hit only @3
        [0.2, 0.7, 0.7],  # tie 1 vs 2 -> ranking 1, 2, 0; gt 2 at rank 2 -> hit @2
    ]
    gt = [{0}, {1}, {2}]
    result = recall_at_k(sim, gt, ks=(1, 2, 3))
    assert result == pytest.approx({1: 100 / 3, 2: 200 / 3, 3: 100.0})


def test_recall_at_k_ties_go_to_lower_index() -> None:
    assert recall_at_k([[0.5, 0.5]], [[0]], ks=(1,)) == {1: 100.0}
    assert recall_at_k([[0.5, 0.5]], [[1]], ks=(1,)) == {1: 0.0}


def test_recall_at_k_any_of_several_and_large_k() -> None:
    sim = [[0.1, 0.9, 0.2]]
    assert recall_at_k(sim, [[0, 1]], ks=(1, 10)) == {1: 100.0, 10: 100.0}
    assert recall_at_k(sim, [[0]], ks=(1, 2, 10)) == {1: 0.0, 2: 0.0, 10: 100.0}


def test_recall_at_k_errors() -> None:
    with pytest.raises(ValueError):
        recall_at_k([], [])
    with pytest.raises(ValueError):
        recall_at_k([[1.0]], [[0], [0]])
    with pytest.raises(ValueError):
        recall_at_k([[1.0]], [[]])
    with pytest.raises(ValueError):
        recall_at_k([[1.0]], [[0]], ks=(0,))


def test_retrieval_recalls_both_directions() -> None:
    # 2 images, 4 texts; texts 0, 1 describe image 0, texts 2, 3 image 1.
    sim = [
        [0.1, 0.9, 0.3, 0.2],  # image 0: best text 1 (its caption) -> i2t hit@1
        [0.8, 0.1, 0.2, 0.7],  # image 1: ranking 0, 3, ... -> first caption at rank 2
    ]
    out = retrieval_recalls(sim, [0, 0, 1, 1], ks=(1, 2))
    # text->image columns: t0 (0.1, 0.8) -> image 1, wrong @1;
    # t1 (0.9, 0.1) right; t2 (0.3, 0.2) wrong @1; t3 (0.2, 0.7) right.
    assert out == pytest.approx({"i2t_r1": 50.0, "i2t_r2": 100.0, "t2i_r1": 50.0, "t2i_r2": 100.0})


def test_retrieval_recalls_default_keys_and_errors() -> None:
    out = retrieval_recalls([[1.0, 0.0], [0.0, 1.0]], [0, 1])
    assert set(out) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert all(v == 100.0 for v in out.values())
    with pytest.raises(ValueError):
        retrieval_recalls([[1.0, 0.0]], [0])
    with pytest.raises(ValueError):
        retrieval_recalls([[1.0]], [3])


def test_zero_shot_accuracy() -> None:
    logits = [
        [0.1, 0.7, 0.2],  # label 1: top-1 hit
        [0.5, 0.3, 0.2],  # label 2: rank 3
        [
            0.3,
            0.3,
            0.4,
        ],  # label 1: ranking 2, 0, 1 (tie -> lower index first) -> rank 3
        [0.6, 0.4, 0.0],  # label 1: rank 2
    ]
    out = zero_shot_accuracy(logits, [1, 2, 1, 1], topk=(1, 2, 5))
    assert out == pytest.approx({1: 25.0, 2: 50.0, 5: 100.0})


def test_zero_shot_accuracy_errors() -> None:
    with pytest.raises(ValueError):
        zero_shot_accuracy([[0.1, 0.2]], [2])
    with pytest.raises(ValueError):
        zero_shot_accuracy([[0.1, 0.2]], [0, 1])
    with pytest.raises(ValueError):
        zero_shot_accuracy([], [])
