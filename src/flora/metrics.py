"""Scores as the official Super-NaturalInstructions evaluation computes them.

- ROUGE-L: the F-measure of ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``
  with the library's default tokenizer (lower-case, keep ``[a-z0-9]`` runs, Porter-stem words of
  more than 3 letters): what the official script uses for English tasks.
- Exact match: equal after lower-casing, removing ``string.punctuation`` and collapsing white
  space; articles are kept (the official script comments their removal out).

Each is the maximum over an instance's references; aggregates are means over instances, times
100, rounded to 4 decimals (as the official ``compute_metrics``).
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from rouge_score import rouge_scorer

METRIC_NAMES = ("exact_match", "rougeL")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse white space (articles are kept)."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def _references(references: Sequence[str] | str) -> Sequence[str]:
    if isinstance(references, str):
        return [references]
    if not references:
        raise ValueError("no references given (expected at least one reference string)")
    return references


def exact_match(prediction: str, references: Sequence[str] | str) -> float:
    """1.0 when ``prediction`` equals any reference after `normalize_answer`, else 0.0."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(r) for r in _references(references)))


def rouge_l(prediction: str, references: Sequence[str] | str) -> float:
    """The best ROUGE-L F-measure (0..1) of ``prediction`` against the references."""
    scorer = _scorer()
    return max(scorer.score(target=r, prediction=prediction)["rougeL"].fmeasure for r in _references(references))


def score_instance(prediction: str, references: Sequence[str] | str) -> dict[str, float]:
    """``{"exact_match": 0 or 100, "rougeL": 0..100}`` for one prediction."""
    return {
        "exact_match": 100.0 * exact_match(prediction, references),
        "rougeL": 100.0 * rouge_l(prediction, references),
    }


def mean_scores(rows: Iterable[Mapping[str, float]]) -> dict[str, Any]:
    """Means of per-instance scores (0..100), rounded to 4 decimals, and ``n``."""
    rows = list(rows)
    out: dict[str, Any] = {}
    for name in METRIC_NAMES:
        out[name] = round(sum(r[name] for r in rows) / len(rows), 4) if rows else None
    out["n"] = len(rows)
    return out


def compute_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Official-style corpus scores: ``{"exact_match", "rougeL", "n"}``, each a mean times 100.

    Args:
        predictions: ``[n]`` strings.
        references: ``[n]`` lists of reference strings (the best one counts).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists (expected equal)")
    return mean_scores(score_instance(p, r) for p, r in zip(predictions, references, strict=True))


def grouped_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], groups: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """`compute_metrics` per group (task, category, ...): ``{group: {"exact_match", "rougeL", "n"}}``."""
    if not len(predictions) == len(references) == len(groups):
        raise ValueError(
            f"{len(predictions)} predictions, {len(references)} reference lists and {len(groups)} groups "
            f"(expected the same number)"
        )
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    return {
        group: compute_metrics([predictions[i] for i in rows], [references[i] for i in rows])
        for group, rows in members.items()
    }
