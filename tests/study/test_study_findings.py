"""The report's tables and the papers' findings on hand-made trial records: the verdicts follow the
numbers (agrees, disagrees, cannot tell), and the tables average what they should."""

from __future__ import annotations

import pytest

from flora.study.findings import AGREES, CANNOT_TELL, DISAGREES, flora_domains, margin, peft_instruction
from flora.study.tables import best_by_method, category_table, experiment_axis, experiment_table, to_markdown


def record(method, lr, unseen, size=None, tasks=29, seed=0, status="done", validation=None, experiment="lr"):
    return {"id": f"{method}-{lr}-{size}-{tasks}-{seed}", "experiments": experiment, "method": method,
            "learning_rate": lr, "size": size, "num_tasks": tasks, "model": "m", "seed": seed, "status": status,
            "trainable_params": 10 * (size or 1), "validation_rougeL": unseen if validation is None else validation,
            "seen_rougeL": unseen + 10, "unseen_rougeL": unseen}  # fmt: skip


def verdicts(records, tables):
    rows = [{**r, "losses": [2.0, 1.0], "checkpoints": [{"validation": {"rougeL": r["validation_rougeL"]}}]}
            for r in records]  # fmt: skip
    return {f.claim.split(" ")[0] + str(i): f.verdict
            for i, f in enumerate(peft_instruction(records, rows, tables, "unseen_rougeL"))}  # fmt: skip


def learning_rate_findings(records: list[dict]):
    """The findings for ``records`` as one learning-rate experiment (no loss curves)."""
    tables = {"learning_rate": experiment_table(records, "learning_rate")}
    return peft_instruction(records, [{**r, "losses": []} for r in records], tables, "unseen_rougeL")


def test_the_paper_pattern_agrees_and_its_opposite_disagrees():
    paper = [record("full", 1e-5, 40), record("lora", 1e-4, 39.5, 8), record("bottleneck", 1e-4, 39.8, 8),
             record("ia3", 1e-3, 20), record("lora", 1e-3, 10, 8), record("bottleneck", 1e-3, 12, 8),
             record("full", 1e-4, 30)]  # fmt: skip
    assert [f.verdict for f in learning_rate_findings(paper)[:3]] == [AGREES, AGREES, AGREES]
    opposite = [record("full", 1e-5, 40), record("lora", 1e-4, 20, 8), record("bottleneck", 1e-4, 21, 8),
                record("ia3", 1e-3, 39.5), record("lora", 1e-3, 20.5, 8), record("bottleneck", 1e-3, 20.5, 8),
                record("full", 1e-4, 45)]  # fmt: skip
    found = learning_rate_findings(opposite)
    assert [f.verdict for f in found[:3]] == [DISAGREES, DISAGREES, DISAGREES]
    assert "full FT 45.0" in found[0].ours and "LoRA 20.5 (-24.5)" in found[0].ours


def test_size_and_task_trends_and_a_study_that_learned_nothing():
    sizes = [record("lora", 1e-4, s, size=r) for r, s in ((2, 20), (8, 25), (32, 30))]
    sizes += [record("bottleneck", 1e-4, s, size=r) for r, s in ((2, 30), (8, 25), (32, 20))]
    found = peft_instruction(sizes, sizes, {"size": experiment_table(sizes, "size")}, "unseen_rougeL")
    assert found[3].verdict == CANNOT_TELL  # LoRA agrees, adapters disagree
    assert "LoRA: 2: 20.0, 8: 25.0, 32: 30.0" in found[3].ours
    tasks = [record(m, 1e-3, s, size=8, tasks=n) for m, points in
             (("lora", ((4, 10), (29, 30))), ("bottleneck", ((4, 20), (29, 25)))) for n, s in points]  # fmt: skip
    found = peft_instruction(tasks, tasks, {"num_tasks": experiment_table(tasks, "num_tasks")}, "unseen_rougeL")
    assert found[4].verdict == AGREES and found[5].verdict == AGREES  # LoRA gains 20, adapters 5
    flat = [record("lora", 1e-3, 1.0, size=8), record("full", 1e-5, 2.0)]
    assert {f.verdict for f in peft_instruction(flat, flat, {}, "unseen_rougeL")} == {CANNOT_TELL}


def test_the_margin_grows_with_the_seed_spread():
    one_seed = [record("lora", 1e-3, 30)]
    assert margin(one_seed, "unseen_rougeL") == 1.0
    seeds = [record("lora", 1e-3, v, seed=i) for i, v in enumerate((30, 34, 26))]
    assert margin(seeds, "unseen_rougeL") == pytest.approx(2 * 4.0)


def test_tables_average_seeds_and_pick_the_best_by_validation():
    records = [record("lora", 1e-3, v, size=8, seed=i) for i, v in enumerate((30, 34))]
    records.append(record("lora", 1e-3, 0, size=8, seed=2, status="unstable"))
    (row,) = experiment_table(records, "learning_rate")
    assert row["unseen_rougeL"] == 32.0 and row["done"] == 2 and row["unstable"] == 1
    assert row["unseen_rougeL_std"] == pytest.approx(2.83, abs=0.01)
    best = best_by_method([record("lora", 1e-3, 30, validation=5), record("lora", 1e-2, 20, validation=9)])
    assert [b["learning_rate"] for b in best] == [1e-2]  # by validation, not by the test score
    # a validation score on 4 training tasks does not compete with one on 29 (another validation set)
    fewer_tasks = record("lora", 1e-3, 5, tasks=4, validation=90)
    best = best_by_method([record("lora", 1e-3, 30, validation=5), fewer_tasks, record("ia3", 1e-2, 9, tasks=4)])
    assert [(b["method"], b["num_tasks"], b["validation_rougeL"]) for b in best] == [("lora", 29, 5)]


def test_an_experiments_axis_is_what_varies_within_a_method():
    sizes = [record("lora", 1e-3, 10, size=s) for s in (2, 8)] + [record("prompt_tuning", 1e-2, 5, size=8)]
    assert experiment_axis({"name": "size"}, sizes) == "size"  # not the learning rate, which differs by method
    rates = [record("lora", r, 10, size=8) for r in (1e-4, 1e-3)]
    assert experiment_axis({"name": "lr"}, rates) == "learning_rate"
    assert experiment_axis({"name": "lr", "plot": "method"}, rates) == "method"


def test_markdown_tables_show_learning_rates_as_set_and_scores_to_one_decimal():
    pairs = ((1e-2, 0.04), (8e-3, 31.46), (0.3, 0.0))
    rows = [{"learning_rate": rate, "unseen_rougeL": score} for rate, score in pairs]
    lines = to_markdown(rows, ["learning_rate", "unseen_rougeL"]).splitlines()[2:]
    assert lines == ["| 1e-02 | 0.0 |", "| 8e-03 | 31.5 |", "| 0.3 | 0.0 |"]


def test_category_table_and_flora_findings():
    def trial(method, size, lr, scores):
        tasks = {f"{c}-{i}": {"category": c, "score": s} for c, s in scores.items() for i in range(2)}
        return {"method": method, "size": size, "learning_rate": lr, "status": "done", "seed": 0,
                "scores": {"tasks": tasks}, "validation_rougeL": sum(scores.values())}  # fmt: skip

    rows = [trial("flora", 1, 8e-3, {"A": 80, "B": 60}), trial("lora", 1, 1e-3, {"A": 79, "B": 60.5}),
            trial("lora", 1, 1e-4, {"A": 10, "B": 10}), trial("ia3", None, 5e-3, {"A": 40, "B": 30})]  # fmt: skip
    columns, table = category_table(rows)
    assert columns == ["FLoRA r1", "LoRA r1 lr 1e-03", "LoRA r1 lr 1e-04", "IA3"]
    assert table[-1] == {"category": "mean", "FLoRA r1": 70.0, "LoRA r1 lr 1e-03": 69.75,
                         "LoRA r1 lr 1e-04": 10.0, "IA3": 35.0}  # fmt: skip
    records = [{**r, "seen_rougeL": r["validation_rougeL"], "num_tasks": 2, "model": "m"} for r in rows]
    found = flora_domains(records, columns, table)
    assert [f.verdict for f in found] == [AGREES, AGREES, CANNOT_TELL]  # one FLoRA learning rate: cannot tell
    assert "IA3 35.0" in found[1].ours and "LoRA r1 lr 1e-04" not in found[1].ours
