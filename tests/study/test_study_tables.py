"""The report's tables: numbers rounded once (by `fmt`), intervals shown beside their score, learning
rates as written, and an experiment's axis found from what varies within a method."""

from __future__ import annotations

from flora.study.stats import Estimate
from flora.study.tables import experiment_axis, fmt, fmt_estimate, to_csv, to_markdown


def test_a_score_is_rounded_once_the_same_everywhere():
    # 14.0476 is 14.0 in every table: rounding it to 14.05 first would show 14.1 in one place.
    rows = [{"series": "LoRA r8", "unseen": 14.0476, "unseen_low": 9.95, "unseen_high": 18.25, "seen": 14.0476}]
    line = to_markdown(rows, ["series", "unseen", "seen"]).splitlines()[2]
    assert line == "| LoRA r8 | 14.0 [9.9, 18.2] | 14.0 |"
    assert fmt_estimate(Estimate(14.0476, 9.95, 18.25, 10, "60", 1)) == "14.0 [9.9, 18.2]"
    assert fmt(14.0476) == "14.0" and fmt(None) == "-" and fmt(float("nan")) == "-" and fmt(3.0, signed=True) == "+3.0"
    assert to_csv(rows, ["unseen", "unseen_low"]).splitlines()[1] == "14.0476,9.95"  # the CSV keeps every digit


def test_markdown_tables_show_learning_rates_as_set():
    pairs = ((1e-2, 0.04), (8e-3, 31.46), (0.3, 0.0))
    rows = [{"learning_rate": rate, "unseen_rougeL": score} for rate, score in pairs]
    lines = to_markdown(rows, ["learning_rate", "unseen_rougeL"]).splitlines()[2:]
    assert lines == ["| 1e-02 | 0.0 |", "| 8e-03 | 31.5 |", "| 0.3 | 0.0 |"]


def test_an_experiments_axis_is_what_varies_within_a_method():
    def record(method, lr, size):
        return {"method": method, "learning_rate": lr, "size": size, "num_tasks": 4, "model": "m"}

    sizes = [record("lora", 1e-3, s) for s in (2, 8)] + [record("prompt_tuning", 1e-2, 8)]
    assert experiment_axis({"name": "size"}, sizes) == "size"  # not the learning rate, which differs by method
    rates = [record("lora", r, 8) for r in (1e-4, 1e-3)]
    assert experiment_axis({"name": "lr"}, rates) == "learning_rate"
    assert experiment_axis({"name": "lr", "plot": "method"}, rates) == "method"
