"""The papers' findings, one by one, against a study's results: agrees, disagrees, or cannot tell.

Each finding states the paper's claim (and its numbers where the paper gives them), the numbers of
this study behind the check, and a verdict. A difference counts only when it exceeds the margin:
1 ROUGE-L point, or twice the mean standard deviation over seeds when the study has several seeds
(so with one seed, differences under a point are not read). The checks use unseen ROUGE-L when the
study has unseen tasks (the PEFT study's headline), else seen ROUGE-L; a method's score is that of
its trial with the best validation ROUGE-L (the paper's selection).

- ``peft-instruction`` (He, 2024, *Parameter Efficient Instruction Tuning: An Empirical Study*):
  only LoRA and adapters get close to full fine-tuning; the paper's best learning rates; both are
  unstable away from the best learning rate; larger rank / adapter size is better; more training
  tasks are better on unseen tasks; LoRA needs more tasks than adapters to generalise to unseen
  tasks; LoRA learns slower.
- ``flora-domains`` (Wen & Chaudhuri, 2024, *Batched Low-Rank Adaptation of Foundation Models*):
  FLoRA matches LoRA at the same rank; FLoRA and LoRA beat IA3; FLoRA needs a much higher
  learning rate than LoRA.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flora.study.tables import METHOD_NAMES, best_by_method, format_rate, method_label

AGREES, DISAGREES, CANNOT_TELL = "agrees", "disagrees", "cannot tell at this scale"
SPREAD = 5.0  # ROUGE-L points lost somewhere in a learning-rate sweep that count as "unstable"
PAPER_BEST_LR = {"lora": 1e-4, "bottleneck": 1e-4, "full": 1e-5}
PEFT_CLAIMS = (
    "Only LoRA and adapters get close to full fine-tuning",
    "Best learning rate: 1e-4 for LoRA and adapters, 1e-5 for full fine-tuning",
    "LoRA and adapters are unstable outside the ideal setting (the right learning rate)",
    "Larger LoRA rank / adapter size is better (the ideal setting is the largest)",
    "More (more diverse) training tasks are better on unseen tasks",
    "LoRA needs more training tasks than adapters to generalise to unseen tasks",
    "LoRA learns slower than adapters",
)


@dataclass
class Finding:
    claim: str
    paper: str
    ours: str
    verdict: str


def margin(records: Sequence[dict[str, Any]], column: str) -> float:
    """1 point, or twice the mean standard deviation over seeds of trials that differ only in seed."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r["status"] == "done" and r[column] is not None:
            key = (r["method"], r["learning_rate"], r["size"], r["num_tasks"], r["model"])
            groups.setdefault(key, []).append(r[column])
    spreads = [statistics.stdev(v) for v in groups.values() if len(v) > 1]
    return max(1.0, 2 * statistics.fmean(spreads)) if spreads else 1.0


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _series(table: Sequence[dict[str, Any]], method: str, axis: str, column: str) -> list[tuple[Any, float]]:
    """``[(x, mean score)]`` of one method in an experiment table, sorted by x (rows without a score dropped)."""
    points = [(row[axis], row[column]) for row in table if row["method"] == method and row[column] is not None]
    return sorted(points, key=lambda p: p[0])


def _trend(points: list[tuple[Any, float]], tolerance: float) -> str | None:
    """agrees (the largest x scores best within ``tolerance`` and above the smallest by more than it),
    disagrees (the largest x is worse than the best, or than the smallest, by more than it), or
    cannot tell; None for fewer than two points."""
    if len(points) < 2:
        return None
    best = max(score for _, score in points)
    first, last = points[0][1], points[-1][1]
    if last < best - tolerance or last < first - tolerance:
        return DISAGREES
    if last - first > tolerance:
        return AGREES
    return CANNOT_TELL


def peft_instruction(records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
                     tables: dict[str, list[dict[str, Any]]], column: str) -> list[Finding]:  # fmt: skip
    """The PEFT study's findings (``tables``: experiment tables by x axis, experiments of one axis joined)."""
    tol = margin(records, column)
    what = "unseen" if column.startswith("unseen") else "seen"
    best = {r["method"]: r for r in best_by_method(records)}
    findings = []
    top = max((r[column] for r in records if r["status"] == "done" and r[column] is not None), default=None)
    if top is None or top < SPREAD:
        return [Finding(claim, "-", f"no trial scores {SPREAD:g} {what} ROUGE-L or more (best: {_f(top)}): nothing "
                        f"to compare", CANNOT_TELL) for claim in PEFT_CLAIMS]  # fmt: skip

    # 1. Only LoRA and adapters get close to full fine-tuning.
    claim = PEFT_CLAIMS[0]
    paper = (
        "T5-xl, 707 tasks: LoRA and adapters approach full fine-tuning; IA3, prompt and prefix tuning stay well below"
    )
    if "full" not in best or not ({"lora", "bottleneck"} & set(best)):
        findings.append(
            Finding(claim, paper, "the study lacks full fine-tuning, or both LoRA and adapters", CANNOT_TELL)
        )
    else:
        full = best["full"][column]
        gaps = {m: r[column] - full for m, r in best.items() if m != "full" and r[column] is not None}
        ours = f"best {what} ROUGE-L (by validation): full FT {_f(full)}; " + ", ".join(
            f"{METHOD_NAMES.get(m, m)} {_f(best[m][column])} ({gap:+.1f})" for m, gap in gaps.items()
        )
        close = {m for m, gap in gaps.items() if gap >= -tol}
        chosen = {"lora", "bottleneck"} & set(gaps)
        others = set(gaps) - {"lora", "bottleneck"}
        verdict = AGREES if chosen <= close and not (others & close) else DISAGREES
        findings.append(Finding(claim, paper, ours + f" (margin {tol:.1f})", verdict))

    lr_table = tables.get("learning_rate", [])
    # 2. The best learning rates.
    claim = PEFT_CLAIMS[1]
    parts, verdicts = [], []
    for method, rate in PAPER_BEST_LR.items():
        points = _series(lr_table, method, "learning_rate", column)
        if len(points) < 2:
            continue
        top = max(points, key=lambda p: p[1])
        at_paper = dict(points).get(rate)
        parts.append(
            f"{METHOD_NAMES[method]}: best {format_rate(top[0])} ({_f(top[1])}), at {format_rate(rate)}: {_f(at_paper)}"
        )
        verdicts.append(at_paper is not None and at_paper >= top[1] - tol)
    findings.append(Finding(claim, "grid 1e-5 ... 1e-3 for every method",
                            "; ".join(parts) or "no learning-rate sweep of LoRA, adapters or full FT",
                            CANNOT_TELL if not verdicts else AGREES if all(verdicts) else DISAGREES))  # fmt: skip

    # 3. Unstable away from the best learning rate.
    claim = PEFT_CLAIMS[2]
    parts, spreads = [], []
    for method in ("lora", "bottleneck"):
        members = [row for row in lr_table if row["method"] == method]
        points = _series(lr_table, method, "learning_rate", column)
        if len(points) < 2:
            continue
        unstable = sum(row["unstable"] for row in members)
        spread = max(s for _, s in points) - min(s for _, s in points)
        spreads.append((spread, unstable))
        parts.append(f"{METHOD_NAMES[method]}: {what} ROUGE-L {_f(min(s for _, s in points))} to "
                     f"{_f(max(s for _, s in points))} over learning rates "
                     f"{', '.join(format_rate(x) for x, _ in points)}"
                     + (f", {unstable} unstable (NaN)" if unstable else ""))  # fmt: skip
    if not spreads:
        verdict = CANNOT_TELL
    elif all(spread >= SPREAD or unstable for spread, unstable in spreads):
        verdict = AGREES
    elif all(spread < tol and not unstable for spread, unstable in spreads):
        verdict = DISAGREES
    else:
        verdict = CANNOT_TELL
    findings.append(Finding(claim, "scores collapse away from 1e-4 (LoRA, adapters)",
                            "; ".join(parts) + f" (unstable here: a spread of at least {SPREAD:g} points or a NaN)"
                            if parts else "no learning-rate sweep of LoRA or adapters", verdict))  # fmt: skip

    # 4. Larger rank / size is better.
    size_table = tables.get("size", [])
    claim = PEFT_CLAIMS[3]
    paper = ("unseen ROUGE-L, r / size 8, 32, 64, 128, 256, 512: LoRA 43.0, 43.6, 44.2, 45.5, 46.5, 47.1; "
             "adapter 43.3, 44.2, 45.2, 46.0, 46.6, 46.7")  # fmt: skip
    parts, verdicts = [], []
    for method in ("lora", "bottleneck"):
        points = _series(size_table, method, "size", column)
        if len(points) >= 2:
            parts.append(f"{METHOD_NAMES[method]}: " + ", ".join(f"{x}: {_f(s)}" for x, s in points))
            verdicts.append(_trend(points, tol))
    findings.append(Finding(claim, paper, "; ".join(parts) or "no size sweep", _combine(verdicts)))

    # 5. More training tasks are better on unseen tasks.
    task_table = tables.get("num_tasks", [])
    claim = PEFT_CLAIMS[4]
    parts, verdicts, gains = [], [], {}
    for method in dict.fromkeys(row["method"] for row in task_table):
        points = _series(task_table, method, "num_tasks", column)
        if len(points) >= 2:
            parts.append(f"{METHOD_NAMES.get(method, method)}: " + ", ".join(f"{x} tasks: {_f(s)}" for x, s in points))
            verdicts.append(_trend(points, tol))
            gains[method] = points[-1][1] - points[0][1]
    findings.append(Finding(claim, "training tasks 8 ... 707: scores rise with the number of tasks",
                            "; ".join(parts) or "no number-of-tasks sweep", _combine(verdicts)))  # fmt: skip

    # 6. LoRA needs more tasks than adapters to generalise.
    claim = PEFT_CLAIMS[5]
    if "lora" in gains and "bottleneck" in gains:
        difference = gains["lora"] - gains["bottleneck"]
        verdict = AGREES if difference > tol else DISAGREES if difference < -tol else CANNOT_TELL
        ours = f"gain from the fewest to the most tasks: LoRA {gains['lora']:+.1f}, adapter {gains['bottleneck']:+.1f}"
    else:
        verdict, ours = CANNOT_TELL, "the number-of-tasks sweep lacks LoRA or adapters"
    findings.append(Finding(claim, "LoRA trails adapters with few tasks and catches up with many", ours, verdict))

    # 7. LoRA learns slower.
    claim = PEFT_CLAIMS[6]
    slow = _learning_speed(rows, best)
    findings.append(Finding(claim, "LoRA needs more steps to reach the adapter's score", *slow))
    return findings


def _learning_speed(rows: Sequence[dict[str, Any]], best: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """Compare the early training loss (mean over the first quarter of the steps) and the first
    checkpoint's share of the best validation score, of the best LoRA and adapter trials."""
    by_id = {row["id"]: row for row in rows}
    if "lora" not in best or "bottleneck" not in best:
        return "the study lacks LoRA or adapters", CANNOT_TELL
    stats = {}
    for method in ("lora", "bottleneck"):
        row = by_id[best[method]["id"]]
        losses = row.get("losses") or []
        early = statistics.fmean(losses[: max(1, len(losses) // 4)]) if losses else None
        checkpoints = row.get("checkpoints") or []
        scores = [c["validation"]["rougeL"] for c in checkpoints]
        share = scores[0] / max(scores) if scores and max(scores) > 0 else None
        stats[method] = (early, share)
    (lora_loss, lora_share), (adapter_loss, adapter_share) = stats["lora"], stats["bottleneck"]
    ours = (f"best trials: mean loss over the first quarter of training LoRA {_f2(lora_loss)}, adapter "
            f"{_f2(adapter_loss)}; first checkpoint's share of the best validation ROUGE-L LoRA {_pct(lora_share)}, "
            f"adapter {_pct(adapter_share)}")  # fmt: skip
    signs = []
    if lora_loss is not None and adapter_loss is not None:
        ratio = lora_loss / adapter_loss
        signs.append(1 if ratio > 1.05 else -1 if ratio < 0.95 else 0)
    if lora_share is not None and adapter_share is not None:
        difference = lora_share - adapter_share
        signs.append(1 if difference < -0.1 else -1 if difference > 0.1 else 0)
    verdict = AGREES if signs and all(s > 0 for s in signs) else DISAGREES if signs and all(s < 0 for s in signs) \
        else CANNOT_TELL  # fmt: skip
    return ours, verdict


def _f2(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _combine(verdicts: list[str | None]) -> str:
    verdicts = [v for v in verdicts if v is not None]
    if not verdicts:
        return CANNOT_TELL
    if all(v == AGREES for v in verdicts):
        return AGREES
    if DISAGREES in verdicts and AGREES not in verdicts:
        return DISAGREES
    return CANNOT_TELL


def flora_domains(records: Sequence[dict[str, Any]], columns: list[str], table: list[dict[str, Any]],
                  tolerance_column: str = "seen_rougeL") -> list[Finding]:  # fmt: skip
    """The FLoRA paper's quality findings, from the category x method table (its ``mean`` row)."""
    tol = margin(records, tolerance_column)
    mean = next((row for row in table if row["category"] == "mean"), {})
    score = {c: mean.get(c) for c in columns}
    findings = []
    pairs = []
    for rank in sorted({r["size"] for r in records if r["method"] in ("lora", "flora") and r["size"] is not None}):
        f_cols = [c for c in columns if c.startswith(method_label("flora", rank))]
        l_cols = [c for c in columns if c.startswith(method_label("lora", rank))]
        if f_cols and l_cols:
            f_best = max(f_cols, key=lambda c: score[c] or -1)
            l_best = max(l_cols, key=lambda c: score[c] or -1)
            pairs.append((rank, f_best, l_best, score[f_best] - score[l_best]))
    claim = "FLoRA matches LoRA at the same rank"
    paper = "MultiPL-E pass@1 and Whisper WER, rank 1: FLoRA about equal to LoRA"
    if pairs:
        ours = "; ".join(f"rank {r}: {f} {_f(score[f])} vs {lo} {_f(score[lo])} ({d:+.1f})" for r, f, lo, d in pairs)
        verdict = AGREES if all(abs(d) <= tol for *_, d in pairs) else DISAGREES
        findings.append(Finding(claim, paper, ours + f" (mean over categories; margin {tol:.1f})", verdict))
    else:
        findings.append(Finding(claim, paper, "no FLoRA and LoRA trials at the same rank", CANNOT_TELL))

    claim = "FLoRA and LoRA beat IA3"
    ia3 = [c for c in columns if c.startswith("IA3")]
    groups: dict[str, list[str]] = {}  # each method and rank at its best learning rate
    for column in (c for c in columns if c.startswith(("FLoRA", "LoRA"))):
        groups.setdefault(column.split(" lr ")[0], []).append(column)
    others = [max(members, key=lambda c: score[c] or -1) for members in groups.values()]
    if ia3 and others:
        base = max(score[c] for c in ia3)
        gaps = {c: score[c] - base for c in others}
        ours = f"IA3 {_f(base)}; " + ", ".join(f"{c} {_f(score[c])} ({g:+.1f})" for c, g in gaps.items())
        verdict = AGREES if all(g > tol for g in gaps.values()) else DISAGREES if all(
            g < -tol for g in gaps.values()) else CANNOT_TELL  # fmt: skip
        findings.append(Finding(claim, "FLoRA ≈ LoRA > IA3 on every language", ours, verdict))
    else:
        findings.append(Finding(claim, "FLoRA ≈ LoRA > IA3 on every language", "no IA3 or no FLoRA/LoRA", CANNOT_TELL))

    claim = "FLoRA needs a much higher learning rate than LoRA"
    paper = "FLoRA 8e-3, IA3 5e-3, LoRA 1e-4 (code); 6e-3 / 4e-3 / 2e-4 (speech)"
    best_rate, rank = {}, min((r["size"] for r in records if r["method"] in ("flora", "lora") and r["size"]),
                              default=None)  # fmt: skip
    for method in ("flora", "lora"):  # at the same rank, by validation ROUGE-L
        done = [r for r in records if r["method"] == method and r["size"] == rank and r["status"] == "done"
                and r["validation_rougeL"] is not None]  # fmt: skip
        if len({r["learning_rate"] for r in done}) > 1:
            best_rate[method] = max(done, key=lambda r: r["validation_rougeL"])["learning_rate"]
    if len(best_rate) == 2:
        verdict = AGREES if best_rate["flora"] > best_rate["lora"] * 3 else DISAGREES
        ours = (f"rank {rank}, best learning rate by validation: FLoRA {format_rate(best_rate['flora'])}, "
                f"LoRA {format_rate(best_rate['lora'])}")  # fmt: skip
    else:
        verdict = CANNOT_TELL
        ours = "the grid does not sweep the learning rate of both FLoRA and LoRA (it uses the paper's rates)"
    findings.append(Finding(claim, paper, ours, verdict))
    return findings
