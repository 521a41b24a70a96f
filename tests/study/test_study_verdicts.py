"""Verdicts on synthetic study stores (scores made up, written through the store's API): overlapping
intervals cannot tell, separated ones agree or disagree in the claim's direction, non-inferiority
uses its margin, selection never reads test scores, an unbracketed learning rate is flagged and its
finding cannot tell; the report shows every finding's rule and interval."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from flora.study.findings import flora_domains, peft_instruction
from flora.study.report import write_report
from flora.study.results import StudyResults
from flora.study.store import StudyStore
from flora.study.verdicts import AGREES, CANNOT_TELL, DISAGREES, Rule, combine, non_inferiority, not_close
from study.support import synthetic_study

DOMAINS = """
name = "synthetic-domains"
seeds = [0, 1]
[data]
tasks = ["reverse_words", "sort_words_alphabetically", "add_numbers", "subtract_numbers", "count_words",
         "count_vowels", "remove_vowels", "acronym"]
test_tasks = []
train_instances = 8
validation_instances = 6
seen_instances = 12
unseen_instances = 0
[training]
max_steps = 8
[evaluation]
metric = "primary"
zero_shot = false
[report]
findings = "flora-domains"
[[experiments]]
name = "methods"
method = ["flora", "lora", "ia3"]
learning_rate = { flora = [1e-3, 1e-2, 1e-1], lora = [1e-4, 1e-3, 1e-2], ia3 = [1e-3, 1e-2, 1e-1] }
size = { flora = 1, lora = 1 }
"""

PEFT = """
name = "synthetic-peft"
seeds = [0]
[data]
tasks = ["reverse_words", "sort_words_alphabetically", "add_numbers", "subtract_numbers", "count_words",
         "count_vowels", "remove_vowels", "acronym", "spell_out_word", "reverse_letters"]
test_tasks = ["multiply_numbers", "division_remainder", "count_letter", "sort_words_by_length"]
validation_tasks = 2
validation_task_instances = 10
train_instances = 8
validation_instances = 5
seen_instances = 5
unseen_instances = 20
[training]
max_steps = 8
[report]
findings = "peft-instruction"
[[experiments]]
name = "learning-rate"
method = ["lora", "bottleneck", "ia3", "full"]
learning_rate = { lora = [1e-3, 1e-2, 1e-1], bottleneck = [1e-3, 1e-2, 1e-1], ia3 = [1e-3, 1e-2, 1e-1], full = [1e-5, 1e-4, 1e-3] }
size = { lora = 8, bottleneck = 8 }
"""  # noqa: E501


def noise(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_score(level, spread: float = 3.0):
    """Scores around ``level(trial, split)`` per instance: a task effect shared by every trial (what
    pairing cancels), a small per-trial task effect and per-instance noise of SD ``spread``."""

    def score(trial, split, task, i) -> float:
        shared = noise(task).normal(0, 15)
        own = noise(trial.id, task).normal(0, spread / 3)
        value = 50 + level(trial, split) + shared + own + noise(trial.id, split, task, i).normal(0, spread)
        return float(np.clip(value, 0, 100))

    return score


def best_at(rates: dict[str, float], gain: float = 10.0):
    """A level that peaks at ``rates[method]`` (``gain`` points above the other rates)."""
    return lambda trial: gain if trial.learning_rate == rates.get(trial.method) else 0.0


def domains(tmp_path, level, spread: float = 3.0):
    out = synthetic_study(tmp_path, DOMAINS, make_score(lambda t, s: level(t), spread))
    store = StudyStore.open(out)
    try:
        return out, StudyResults.load(store)
    finally:
        store.close()


def findings_by_claim(results, margin: float = 2.0) -> dict[str, object]:
    return {f.claim.split(" ")[0] + " " + f.claim.split(" ")[-1]: f for f in flora_domains(results, margin)}


def test_rules_follow_the_interval():
    from flora.study.stats import Estimate

    def est(low, high):
        return Estimate((low + high) / 2, low, high, tasks=10, instances="60", seeds=1, seed_variance=0.0,
                        data_variance=1.0)  # fmt: skip

    better = Rule(0.0, above=True)
    assert [better.verdict(est(*i)) for i in ((0.5, 3.0), (-3.0, -0.5), (-1.0, 2.0), (-2.0, 0.0))] == [
        AGREES, DISAGREES, CANNOT_TELL, DISAGREES]  # fmt: skip
    assert better.verdict(est(float("nan"), float("nan"))) == CANNOT_TELL
    assert non_inferiority(2.0).verdict(est(-1.5, 3.0)) == AGREES  # no worse than 2 points
    assert non_inferiority(2.0).verdict(est(-6.0, -2.5)) == DISAGREES  # worse by more than 2
    assert non_inferiority(2.0).verdict(est(-3.0, 1.0)) == CANNOT_TELL
    assert not_close(2.0).verdict(est(-9.0, -3.0)) == AGREES
    assert combine([AGREES, AGREES]) == AGREES and combine([AGREES, CANNOT_TELL]) == CANNOT_TELL
    assert combine([AGREES, DISAGREES, CANNOT_TELL]) == DISAGREES and combine([]) == CANNOT_TELL


def test_a_separated_difference_agrees_and_its_opposite_disagrees(tmp_path):
    # FLoRA and LoRA far above IA3 (each at its middle learning rate: bracketed)
    rates = {"flora": 1e-2, "lora": 1e-3, "ia3": 1e-2}
    offsets = {"flora": 20.0, "lora": 20.0, "ia3": 0.0}
    _, results = domains(tmp_path / "a", lambda t: best_at(rates)(t) + offsets[t.method])
    found = findings_by_claim(results)
    assert found["FLoRA IA3"].verdict == AGREES
    assert all(p.estimate.low > 0 for p in found["FLoRA IA3"].parts)
    offsets = {"flora": 0.0, "lora": 0.0, "ia3": 20.0}
    _, results = domains(tmp_path / "b", lambda t: best_at(rates)(t) + offsets[t.method])
    found = findings_by_claim(results)
    assert found["FLoRA IA3"].verdict == DISAGREES
    assert all(p.estimate.high < 0 for p in found["FLoRA IA3"].parts)


def test_overlapping_intervals_cannot_tell_and_say_what_would_decide(tmp_path):
    rates = {"flora": 1e-2, "lora": 1e-3, "ia3": 1e-2}
    offsets = {"flora": 1.0, "lora": 0.0, "ia3": 0.0}  # 1 point apart, instance noise of 30
    _, results = domains(tmp_path, lambda t: best_at(rates, 40.0)(t) + offsets[t.method], spread=30.0)
    finding = findings_by_claim(results)["FLoRA IA3"]
    assert finding.verdict == CANNOT_TELL
    part = finding.parts[0]
    assert part.estimate.low < 0 < part.estimate.high
    assert "tasks" in part.decide and "if the estimate stayed where it is" in part.decide


def test_non_inferiority_is_judged_with_its_margin(tmp_path):
    rates = {"flora": 1e-2, "lora": 1e-3, "ia3": 1e-2}
    for name, gap, verdict in (("close", -1.0, AGREES), ("worse", -8.0, DISAGREES)):
        _, results = domains(tmp_path / name, lambda t, g=gap: best_at(rates)(t) + (g if t.method == "flora" else 0),
                             spread=1.0)  # fmt: skip
        finding = findings_by_claim(results, margin=2.0)["FLoRA rank"]
        assert finding.verdict == verdict, (name, finding.ours)
        assert "non-inferiority margin 2 points" in finding.rule
    # The same -1 point gap with a margin of 0.5 is no longer shown to be within it.
    _, results = domains(tmp_path / "tight", lambda t: best_at(rates)(t) + (-1.0 if t.method == "flora" else 0),
                         spread=1.0)  # fmt: skip
    assert findings_by_claim(results, margin=0.5)["FLoRA rank"].verdict in (DISAGREES, CANNOT_TELL)


def test_selection_reads_validation_scores_never_test_scores(tmp_path):
    # Validation says LoRA's best rate is 1e-3; the test split would say 1e-2.
    def level(trial, split):
        best = 1e-3 if split == "validation" else 1e-2
        return 10.0 if trial.learning_rate == best else 0.0

    out = synthetic_study(tmp_path, DOMAINS, make_score(level))
    store = StudyStore.open(out)
    results = StudyResults.load(store)
    lora = results.series("lora")
    (cells,) = lora.values()
    choice = results.choose(cells, "seen")
    assert choice.cell.learning_rate == 1e-3 and choice.split == "validation"
    assert max(cells, key=lambda c: results.score(c, "seen").value).learning_rate == 1e-2  # the test score's pick
    with pytest.raises(ValueError, match=r"selection reads validation scores only \(got split 'seen'"):
        results.validation_mean(cells[0], "seen")
    # Poison every test score: nothing selection returns changes.
    store.connection.execute("UPDATE scores SET rougeL = 100 - rougeL, exact_match = 100 - exact_match WHERE item IN "
                             "(SELECT id FROM instances WHERE split = 'seen')")  # fmt: skip
    store.connection.commit()
    poisoned = StudyResults.load(store)
    store.close()
    assert poisoned.choose(cells, "seen") == choice
    assert [f.parts[0].label if f.parts else None for f in flora_domains(poisoned, 2.0)] == [
        f.parts[0].label if f.parts else None for f in flora_domains(results, 2.0)]  # fmt: skip


def test_an_edge_optimum_is_flagged_and_its_finding_cannot_tell(tmp_path):
    # LoRA is best at its highest rate: unbracketed, whatever the test difference says.
    rates = {"flora": 1e-2, "lora": 1e-2, "ia3": 1e-2}
    out, results = domains(tmp_path, lambda t: best_at(rates)(t) + (30.0 if t.method == "flora" else 0.0))
    lora = next(iter(results.series("lora").values()))
    assert results.choose(lora, "seen").edge == "highest"
    found = findings_by_claim(results)
    rank = found["FLoRA rank"]
    assert rank.verdict == CANNOT_TELL and rank.parts[0].estimate.low > -2  # the interval alone would agree
    assert "unbracketed: LoRA r1 learning rate 1e-02 is the highest of its grid" in rank.ours
    assert "a learning-rate grid that brackets the chosen rate" in rank.parts[0].decide
    assert found["FLoRA LoRA"].verdict == CANNOT_TELL  # the learning-rate finding rests on it too
    report = (write_report(out)).read_text()
    assert "| LoRA r1, 1 tasks | seen | 1e-04, 1e-03, 1e-02 | 1e-02 | highest |" not in report  # 8 tasks here
    assert "| LoRA r1, 8 tasks | seen | 1e-04, 1e-03, 1e-02 | 1e-02 | highest |" in report


def test_flora_needs_a_higher_rate_from_the_bootstrapped_argmax(tmp_path):
    rates = {"flora": 1e-2, "lora": 1e-3, "ia3": 1e-2}
    _, results = domains(tmp_path / "higher", best_at(rates))
    finding = findings_by_claim(results)["FLoRA LoRA"]
    assert finding.verdict == AGREES and finding.parts[0].estimate.low == pytest.approx(1.0)  # log10(1e-2 / 1e-3)
    _, results = domains(tmp_path / "same", best_at({"flora": 1e-2, "lora": 1e-2, "ia3": 1e-2}))
    assert findings_by_claim(results)["FLoRA LoRA"].verdict == CANNOT_TELL  # LoRA's 1e-2 is its grid's top


def test_the_peft_findings_and_the_report_on_a_synthetic_store(tmp_path):
    rates = {"lora": 1e-2, "bottleneck": 1e-2, "ia3": 1e-2, "full": 1e-4}
    offsets = {"lora": -0.5, "bottleneck": 0.0, "ia3": -20.0, "full": 0.0, "zero_shot": -40.0}

    def level(trial, split):
        return best_at(rates)(trial) + offsets[trial.method]

    def curve(trial, step):  # adapters make 90 % of their progress by step 4, LoRA only by step 8
        drop = {0: 0.0, 4: 0.95 if trial.method != "lora" else 0.3, 8: 1.0}[step]
        return 3.0 - drop

    out = synthetic_study(tmp_path, PEFT, make_score(level), curve)
    store = StudyStore.open(out)
    results = StudyResults.load(store)
    store.close()
    found = {f.claim: f for f in peft_instruction(results, 2.0)}
    close = found["Only LoRA and adapters get close to full fine-tuning"]
    assert close.verdict == AGREES, close.ours  # LoRA, adapters within 2 points; IA3 20 below
    assert found["Full fine-tuning's best learning rate is lower than LoRA's and adapters'"].verdict == AGREES
    slower = found["LoRA learns slower than adapters"]
    assert slower.verdict == AGREES and slower.parts[0].estimate.value > 0.3
    report = write_report(out).read_text()
    assert "- rule: per method, x = its score minus full fine-tuning's" in report
    assert "| Zero-shot base model |" in report and "## Closing note" in report
    assert "[" in report.split("| Zero-shot base model |")[1].splitlines()[0]  # its scores have intervals
