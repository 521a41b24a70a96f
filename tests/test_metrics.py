"""The metrics on hand-checked cases: the official Super-NaturalInstructions definitions."""

from __future__ import annotations

import pytest

from flora.metrics import compute_metrics, exact_match, grouped_metrics, normalize_answer, rouge_l, score_instance


def test_normalization_lowercases_strips_punctuation_collapses_space_keeps_articles():
    assert normalize_answer("  The  Cat, sat!\n") == "the cat sat"
    assert normalize_answer("2021-03-05") == "20210305"
    assert normalize_answer("a  dog") == "a dog"  # articles stay (the official script keeps them)


def test_exact_match():
    assert exact_match("Positive.", ["positive"]) == 1.0
    assert exact_match("the answer", ["answer"]) == 0.0  # the article counts
    assert exact_match("slow", ["quick", "SLOW!"]) == 1.0  # any reference
    assert exact_match("slower", ["slow"]) == 0.0  # no stemming in exact match
    assert exact_match("", [""]) == 1.0


def test_rouge_l_by_hand():
    # Porter stemming: cats -> cat, running -> run; "the" and "are" are unmatched.
    # prediction [the, cat, are, run], reference [cat, run]: LCS 2, P = 2/4, R = 2/2, F = 2/3.
    assert rouge_l("The cats are running!", ["cat runs"]) == pytest.approx(2 / 3)
    # Without stemming "cats"/"cat" would not match; with it they do.
    assert rouge_l("cats", ["cat"]) == pytest.approx(1.0)
    # Order matters (longest common subsequence): reference [a, b, c, d], prediction [d, c, b, a]: LCS 1.
    assert rouge_l("d c b a", ["a b c d"]) == pytest.approx(0.25)
    # Punctuation and case are not tokens.
    assert rouge_l("Hello, World.", ["hello world"]) == pytest.approx(1.0)
    # Several references: the best one counts.
    assert rouge_l("small house", ["big house", "small house"]) == pytest.approx(1.0)
    assert rouge_l("small house", ["big house", "tiny home"]) == pytest.approx(0.5)
    assert rouge_l("", ["anything"]) == 0.0


def test_scores_are_percentages_and_means():
    assert score_instance("Cold.", ["cold"]) == {"exact_match": 100.0, "rougeL": 100.0}
    scores = compute_metrics(["cold", "big house", "x"], [["cold"], ["small house"], ["y", "z"]])
    assert scores == {"exact_match": round(100 / 3, 4), "rougeL": round(100 * (1 + 0.5 + 0) / 3, 4), "n": 3}
    grouped = grouped_metrics(["cold", "big house", "x"], [["cold"], ["small house"], ["y"]], ["a", "b", "a"])
    assert grouped["a"] == {"exact_match": 50.0, "rougeL": 50.0, "n": 2}
    assert grouped["b"] == {"exact_match": 0.0, "rougeL": 50.0, "n": 1}


def test_bad_metric_input():
    with pytest.raises(ValueError, match="no references"):
        rouge_l("x", [])
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        compute_metrics(["a", "b"], [["a"]])
