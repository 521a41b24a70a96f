"""The papers' findings, one by one, against a study's results: agrees, disagrees or cannot tell.

Each `Finding` states the paper's claim and numbers, the rule that decides it
(`flora.study.verdicts`), our estimates with their 95 % intervals (`flora.study.results`), the
verdict, and for *cannot tell* what would decide it (a power estimate). Scores are those of
``evaluation.metric`` on the unseen tasks when the study has them (the PEFT study's headline),
else on the seen tasks' held-out instances; every trial at its final step. A method's setting
(size, learning rate) is the one with the best mean validation score (`StudyResults.choose`: the
validation tasks for unseen scores, the training tasks' validation instances for seen scores),
never the best test score. A finding that rests on a chosen learning rate at the edge of its
sweep (or on one never swept) says *cannot tell*: the optimum may lie outside the grid.

- ``peft-instruction`` (He, 2024, *Parameter Efficient Instruction Tuning: An Empirical Study*):
  only LoRA and adapters get close to full fine-tuning; full fine-tuning's best learning rate is
  lower than theirs; they are unstable (diverge, or vary from seed to seed) away from their best
  learning rate; larger rank / size is better; more training tasks are better on unseen tasks;
  LoRA needs more tasks than adapters; LoRA learns slower than adapters.
- ``flora-domains`` (Wen & Chaudhuri, 2024, *Batched Low-Rank Adaptation of Foundation Models*):
  FLoRA is at least as good as LoRA at the same rank (non-inferiority); FLoRA and LoRA beat IA3;
  FLoRA needs a higher learning rate than LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flora.study import stats
from flora.study.data import SELECTED_ON
from flora.study.results import CellKey, Choice, StudyResults
from flora.study.tables import fmt, fmt_estimate, format_rate, method_label
from flora.study.verdicts import (
    AGREES,
    CANNOT_TELL,
    DISAGREES,
    LOWER,
    SUPERIORITY,
    Rule,
    combine,
    non_inferiority,
    not_close,
    to_decide,
)

PAPER_BEST_LR = {"lora": 1e-4, "bottleneck": 1e-4, "full": 1e-5}
LEARNED = 0.9  # "learns slower": the share of training to reach this fraction of the loss's improvement


@dataclass
class Part:
    """One estimate behind a finding, with its rule's verdict."""

    label: str
    estimate: stats.Estimate | None
    verdict: str
    note: str = ""
    decide: str | None = None


@dataclass
class Finding:
    claim: str
    paper: str
    rule: str
    ours: str
    verdict: str
    parts: list[Part] = field(default_factory=list)

    @property
    def to_decide(self) -> list[str]:
        return [f"{p.label}: {p.decide}" for p in self.parts if p.decide]


def _part(label: str, estimate: stats.Estimate | None, rule: Rule, choices: Sequence[Choice] = ()) -> Part:
    """A part judged by ``rule``; *cannot tell* whatever the interval when a choice is unbracketed."""
    edges = [f"{method_label(c.cell.method, c.cell.series.size)} learning rate {format_rate(c.cell.learning_rate)} is "
             f"{'never swept' if c.edge == 'not swept' else f'the {c.edge} of its grid'}"
             for c in choices if not c.bracketed]  # fmt: skip
    verdict = rule.verdict(estimate)
    note = ""
    if edges:
        note = f"unbracketed: {'; '.join(edges)}"
        verdict = CANNOT_TELL
    decide = None
    if verdict == CANNOT_TELL and estimate is not None and not edges and math.isfinite(estimate.low):
        decide = to_decide(estimate, rule)
    elif edges:
        decide = "a learning-rate grid that brackets the chosen rate"
    return Part(label, estimate, verdict, note, decide)


def _describe(parts: Sequence[Part]) -> str:
    lines = []
    for p in parts:
        text = f"{p.label}: {fmt_estimate(p.estimate, signed=True) if p.estimate else '-'} -> {p.verdict}"
        if p.estimate is not None:
            text += f" ({p.estimate.n})"
        if p.note:
            text += f"; {p.note}"
        lines.append(text)
    return "; ".join(lines)


def _finding(claim: str, paper: str, rule: str, parts: list[Part], missing: str) -> Finding:
    if not parts:
        return Finding(claim, paper, rule, missing, CANNOT_TELL)
    return Finding(claim, paper, rule, _describe(parts), combine(p.verdict for p in parts), parts)


def _label(cell: CellKey) -> str:
    return f"{method_label(cell.method, cell.series.size)} lr {format_rate(cell.learning_rate)}"


def test_split(results: StudyResults) -> str:
    """The split the findings score: unseen tasks when the study has them, else the seen tasks."""
    return "unseen" if results.has("unseen") else "seen"


# -- peft-instruction -------------------------------------------------------------------------------


def peft_instruction(results: StudyResults, margin: float) -> list[Finding]:
    """The PEFT study's findings (see the module docstring)."""
    split = test_split(results)
    what = f"{split} {_metric_name(results)}"
    choice = {m: results.choose(results.sweep(m), split) for m in results.methods()}
    findings = [_close_to_full(results, choice, split, what, margin), _best_rates(results, split),
                _instability(results, split, what), _larger_is_better(results, choice, split, what)]  # fmt: skip
    findings += _more_tasks(results, split, what)
    findings.append(_learns_slower(results))
    return findings


def _metric_name(results: StudyResults) -> str:
    return {"rougeL": "ROUGE-L", "exact_match": "exact match", "primary": "score"}[results.metric]


def _close_to_full(results, choice: dict[str, Choice], split: str, what: str, margin: float) -> Finding:
    claim = "Only LoRA and adapters get close to full fine-tuning"
    paper = (
        "T5-xl, 707 tasks: LoRA and adapters approach full fine-tuning; IA3, prompt and prefix tuning stay well below"
    )
    rule = (f"per method, x = its score minus full fine-tuning's ({what}, each at its learning rate chosen on "
            f"validation in its sweep). LoRA and adapters claim x > -{margin:g} (non-inferiority, margin {margin:g} "
            f"points): {non_inferiority(margin).describe('x')}; the other methods claim x < -{margin:g} (not close): "
            f"{not_close(margin).describe('x')}. The finding agrees when every part agrees, disagrees when any "
            f"disagrees")  # fmt: skip
    parts = []
    if "full" in choice:
        full = choice["full"]
        for method, chosen in choice.items():
            if method == "full":
                continue
            rule_m = non_inferiority(margin) if method in ("lora", "bottleneck") else not_close(margin)
            estimate = results.difference(chosen.cell, full.cell, split)
            parts.append(_part(f"{_label(chosen.cell)} - {_label(full.cell)}", estimate, rule_m, [chosen, full]))
    return _finding(claim, paper, rule, parts, "the study lacks full fine-tuning")


def _best_rates(results: StudyResults, split: str) -> Finding:
    claim = "Full fine-tuning's best learning rate is lower than LoRA's and adapters'"
    paper = ("best: LoRA and adapters 1e-4, full fine-tuning 1e-5 (grid 1e-5 ... 1e-3; T5-xl, 4 epochs); the values "
             "depend on the training length, the order is what carries over")  # fmt: skip
    valid = SELECTED_ON[split]
    rule = (f"each method's best learning rate on the {valid.replace('_', ' ')} split, re-chosen in every bootstrap "
            f"replicate; {LOWER.describe('log10(full FT best / method best)')}; both optima bracketed")  # fmt: skip
    full = results.sweep("full")
    parts = []
    for method in ("lora", "bottleneck"):
        sweep = results.sweep(method)
        if len(full) < 2 or len(sweep) < 2:
            continue
        estimate = results.best_rate_ratio(full, sweep, valid)
        choices = [results.choose(full, split), results.choose(sweep, split)]
        part = _part(f"log10 best rate, full FT / {method_label(method, sweep[0].series.size)}", estimate, LOWER,
                     choices)  # fmt: skip
        part.note = "; ".join(filter(None, [f"chosen: full FT {format_rate(choices[0].cell.learning_rate)}, "
                                            f"{method_label(method)} {format_rate(choices[1].cell.learning_rate)}",
                                            part.note]))  # fmt: skip
        parts.append(part)
    return _finding(claim, paper, rule, parts, "no learning-rate sweep of full fine-tuning and of LoRA or adapters")


def _instability(results: StudyResults, split: str, what: str) -> Finding:
    claim = "LoRA and adapters are unstable away from their best learning rate"
    paper = "outside the ideal setting (learning rate, size, tasks) LoRA and adapters are unstable"
    rule = ("unstable means a diverged trial (NaN or infinite loss) or seed-to-seed variance, not a lower score: "
            "per method, agrees when trials diverged away from the best learning rate and none at it, or when the 95 % "
            "interval of the seed variance away from it over the variance at it (an F interval) lies above 1; "
            "disagrees when no trial diverged and that interval lies below 1; otherwise cannot tell; both methods "
            "must agree")  # fmt: skip
    parts = []
    for method in ("lora", "bottleneck"):
        sweep = results.sweep(method)
        all_cells = results.series(method).get(sweep[0].series, []) if sweep else []
        if len(all_cells) < 2:
            continue
        chosen = results.choose(sweep, split).cell
        diverged = {c.learning_rate: results.cells[c].unstable for c in all_cells}
        per_seed = {c: _per_seed(results, c, split) for c in sweep}
        ratio, low, high, df1, df2 = stats.variance_ratio([per_seed[c] for c in sweep if c != chosen], per_seed[chosen])
        off = sum(n for rate, n in diverged.items() if rate != chosen.learning_rate)
        at = diverged[chosen.learning_rate]
        if off and not at or (math.isfinite(low) and low > 1):
            verdict = AGREES
        elif not off and not at and math.isfinite(high) and high < 1:
            verdict = DISAGREES
        else:
            verdict = CANNOT_TELL
        sds = ", ".join(f"{format_rate(c.learning_rate)}: {fmt(_sd(per_seed[c]))} ({len(per_seed[c])} seeds)"
                        for c in sweep)  # fmt: skip
        text = (f"{method_label(method, chosen.series.size)} (best {format_rate(chosen.learning_rate)}): diverged "
                f"trials by learning rate {', '.join(f'{format_rate(r)}: {n}' for r, n in diverged.items())}; seed SD "
                f"of {what} {sds}; variance ratio away / at the best {fmt(ratio, 2)} [{fmt(low, 2)}, {fmt(high, 2)}] "
                f"(df {df1}, {df2})")  # fmt: skip
        decide = _seeds_for_ratio(ratio, len(sweep) - 1) if verdict == CANNOT_TELL else None
        parts.append(Part(method_label(method), None, verdict, text, decide))
    if not parts:
        return Finding(claim, paper, rule, "no learning-rate sweep of LoRA or adapters", CANNOT_TELL)
    return Finding(claim, paper, rule, "; ".join(p.note for p in parts), combine(p.verdict for p in parts), parts)


def _sd(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _per_seed(results: StudyResults, cell: CellKey, split: str) -> list[float]:
    values, layout = results.matrix(cell, split)
    return [float(v) for v in stats.macro_means(values, layout)]


def _seeds_for_ratio(ratio: float, off_cells: int) -> str:
    if not math.isfinite(ratio) or ratio <= 0:
        return "seeds at every learning rate (a seed variance needs at least two)"
    for seeds in range(2, 41):
        low_q, high_q = stats.f_quantiles(off_cells * (seeds - 1), seeds - 1)
        if ratio / high_q > 1 or ratio / low_q < 1:
            return f"about {seeds} seeds per learning rate if the variance ratio stayed {fmt(ratio, 2)}"
    return f"more than 40 seeds per learning rate (the variance ratio {fmt(ratio, 2)} is close to 1)"


def _larger_is_better(results, choice: dict[str, Choice], split: str, what: str) -> Finding:
    claim = "Larger LoRA rank / adapter size is better"
    paper = ("unseen ROUGE-L, r / size 8, 32, 64, 128, 256, 512: LoRA 43.0, 43.6, 44.2, 45.5, 46.5, 47.1; "
             "adapter 43.3, 44.2, 45.2, 46.0, 46.6, 46.7")  # fmt: skip
    rule = (f"per method, the largest minus the smallest size at one learning rate ({what}); "
            f"{SUPERIORITY.describe('the difference')}; both methods must agree")  # fmt: skip
    parts = []
    for method in ("lora", "bottleneck"):
        by_rate: dict[float, list[CellKey]] = {}
        for c in results.most_tasks(method):
            by_rate.setdefault(c.learning_rate, []).append(c)
        sweeps = [sorted(cells, key=lambda c: c.series.size or 0) for cells in by_rate.values() if len(cells) > 1]
        if not sweeps:
            continue
        chosen_rate = choice[method].cell.learning_rate if method in choice else None
        cells = max(sweeps, key=lambda s: (s[0].learning_rate == chosen_rate, len(s)))
        estimate = results.difference(cells[-1], cells[0], split)
        label = (
            f"{method_label(method, cells[-1].series.size)} - {method_label(method, cells[0].series.size)} at lr "
            f"{format_rate(cells[0].learning_rate)}"
        )
        parts.append(_part(label, estimate, SUPERIORITY))
    return _finding(claim, paper, rule, parts, "no size sweep of LoRA or adapters")


def _task_pairs(results: StudyResults, method: str) -> tuple[CellKey, CellKey] | None:
    """The cells of ``method`` with the fewest and the most training tasks at one size and learning rate."""
    groups: dict[tuple, list[CellKey]] = {}
    for c in results.cells:
        if c.method == method and results.cells[c].done:
            groups.setdefault((c.series.size, c.series.model, c.learning_rate), []).append(c)
    sweeps = [sorted(g, key=lambda c: c.series.num_tasks) for g in groups.values()
              if len({c.series.num_tasks for c in g}) > 1]  # fmt: skip
    if not sweeps:
        return None
    cells = max(sweeps, key=len)
    return cells[0], cells[-1]


def _more_tasks(results: StudyResults, split: str, what: str) -> list[Finding]:
    claim = "More training tasks are better on unseen tasks"
    paper = "training tasks 8 ... 707: unseen scores rise with the number of tasks (the same epochs, so more steps)"
    rule = (f"per method, the most minus the fewest training tasks, the same steps ({what}); "
            f"{SUPERIORITY.describe('the difference')}; both methods must agree")  # fmt: skip
    pairs = {m: _task_pairs(results, m) for m in ("lora", "bottleneck")}
    parts = []
    for method, pair in pairs.items():
        if pair is None or split != "unseen":
            continue
        fewest, most = pair
        estimate = results.difference(most, fewest, split)
        parts.append(_part(f"{method_label(method, most.series.size)}: {most.series.num_tasks} - "
                           f"{fewest.series.num_tasks} tasks", estimate, SUPERIORITY))  # fmt: skip
    first = _finding(claim, paper, rule, parts, "no number-of-tasks sweep scored on unseen tasks")

    claim = "LoRA needs more training tasks than adapters to generalise to unseen tasks"
    paper = "LoRA trails adapters with few tasks and catches up with many"
    rule = (f"the gain of LoRA from the fewest to the most tasks minus the adapters' gain ({what}); "
            f"{SUPERIORITY.describe('it')}")  # fmt: skip
    lora, adapter = pairs["lora"], pairs["bottleneck"]
    if lora is None or adapter is None or split != "unseen":
        return [first, Finding(claim, paper, rule, "the number-of-tasks sweep lacks LoRA or adapters", CANNOT_TELL)]
    tasks = results.tasks(lora[1], split)
    estimate = results.contrast([(1.0, lora[1]), (-1.0, lora[0]), (-1.0, adapter[1]), (1.0, adapter[0])], split, tasks)
    part = _part("LoRA gain - adapter gain", estimate, SUPERIORITY)
    return [first, _finding(claim, paper, rule, [part], "")]


def _learns_slower(results: StudyResults) -> Finding:
    claim = "LoRA learns slower than adapters"
    paper = "LoRA needs more steps than adapters to reach its performance"
    rule = (f"on the validation loss curves (training tasks' validation instances, each method at the learning rate "
            f"of its sweep chosen on them): the share of training after which the loss has made {LEARNED:.0%} of its "
            f"improvement from step 0 to the last step, LoRA minus adapters; "
            f"{SUPERIORITY.describe('the difference')}")  # fmt: skip
    if not (results.sweep("lora") and results.sweep("bottleneck")):
        return Finding(claim, paper, rule, "the study lacks LoRA or adapters", CANNOT_TELL)
    lora = results.choose(results.sweep("lora"), "seen")
    adapter = results.choose(results.sweep("bottleneck"), "seen")
    estimate = results.learning_speed(lora.cell, adapter.cell, "validation", LEARNED)
    part = _part(f"{_label(lora.cell)} - {_label(adapter.cell)} (share of training)", estimate, SUPERIORITY)
    return _finding(claim, paper, rule, [part], "")


# -- flora-domains ----------------------------------------------------------------------------------


def flora_domains(results: StudyResults, margin: float) -> list[Finding]:
    """The FLoRA paper's quality findings (see the module docstring)."""
    split = test_split(results)
    what = f"{split} {_metric_name(results)}"
    series = results.series()
    chosen = {key: results.choose(cells, split) for key, cells in series.items()}
    ranks = sorted({k.size for k in series if k.method == "flora"} & {k.size for k in series if k.method == "lora"})

    def of(method: str, size: int | None) -> Choice | None:
        return next((c for k, c in chosen.items() if k.method == method and k.size == size), None)

    claim = "FLoRA is at least as good as LoRA at the same rank"
    paper = "MultiPL-E pass@1 and Whisper WER, rank 1: FLoRA about equal to LoRA (often slightly better)"
    rule = (
        f"per rank, FLoRA minus LoRA ({what}, each at its learning rate chosen on validation); "
        f"{non_inferiority(margin).describe('the difference')} (non-inferiority margin {margin:g} points)"
    )
    parts = []
    for rank in ranks:
        f, lo = of("flora", rank), of("lora", rank)
        parts.append(_part(f"{_label(f.cell)} - {_label(lo.cell)}", results.difference(f.cell, lo.cell, split),
                           non_inferiority(margin), [f, lo]))  # fmt: skip
    findings = [_finding(claim, paper, rule, parts, "no FLoRA and LoRA trials at the same rank")]

    claim = "FLoRA and LoRA beat IA3"
    rule = f"each FLoRA and LoRA rank minus IA3 ({what}); {SUPERIORITY.describe('the difference')}; all must agree"
    ia3 = of("ia3", None)
    parts = []
    if ia3 is not None:
        for key, c in chosen.items():
            if key.method in ("flora", "lora"):
                estimate = results.difference(c.cell, ia3.cell, split)
                parts.append(_part(f"{_label(c.cell)} - {_label(ia3.cell)}", estimate, SUPERIORITY, [c, ia3]))
    findings.append(_finding(claim, "FLoRA ≈ LoRA > IA3 on every language", rule, parts, "no IA3, or no FLoRA/LoRA"))

    claim = "FLoRA needs a higher learning rate than LoRA"
    paper = "FLoRA 8e-3, IA3 5e-3, LoRA 1e-4 (code); 6e-3 / 4e-3 / 2e-4 (speech)"
    valid = SELECTED_ON[split]
    rule = (f"the best learning rate of each on the {valid.replace('_', ' ')} split, re-chosen in every bootstrap "
            f"replicate, at the lowest common rank; {SUPERIORITY.describe('log10(FLoRA best / LoRA best)')}; both "
            f"optima bracketed")  # fmt: skip
    parts = []
    if ranks:
        f_key = next(k for k in series if k.method == "flora" and k.size == ranks[0])
        l_key = next(k for k in series if k.method == "lora" and k.size == ranks[0])
        if len(series[f_key]) > 1 and len(series[l_key]) > 1:
            estimate = results.best_rate_ratio(series[f_key], series[l_key], valid)
            part = _part(f"log10 best rate, FLoRA r{ranks[0]} / LoRA r{ranks[0]}", estimate, SUPERIORITY,
                         [chosen[f_key], chosen[l_key]])  # fmt: skip
            part.note = "; ".join(
                filter(
                    None,
                    [
                        f"chosen: FLoRA {format_rate(chosen[f_key].cell.learning_rate)}, LoRA "
                        f"{format_rate(chosen[l_key].cell.learning_rate)}",
                        part.note,
                    ],
                )
            )
            parts.append(part)
    findings.append(_finding(claim, paper, rule, parts, "the grid does not sweep the learning rate of both FLoRA and "
                                                        "LoRA at one rank"))  # fmt: skip
    return findings
