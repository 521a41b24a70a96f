"""``flora study report``: ``report.md``, its figures (``figures/*.png``) and tables (``tables/*.csv``).

Everything comes from the study store (`flora.study.store`): the spec, and the trials of its plan.
The report holds, in order: what was run (model, data, profile, trials and their status, time);
the headline table (each method's best trial by validation ROUGE-L, as the paper selects, with its
seen and unseen scores and trainable parameters); one figure and table per experiment (score
against its axis: learning rate, size, number of training tasks); score against trainable
parameters; seen against unseen; training-loss curves; for one-adapter-per-category studies the
category x method table; then the papers' findings one by one (`flora.study.findings`). Every
figure is drawn from the table written beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flora.data.formats import write_text_atomic
from flora.study import figures
from flora.study.findings import Finding, flora_domains, peft_instruction
from flora.study.store import StudyStore
from flora.study.tables import (
    RECORD_COLUMNS,
    best_by_method,
    category_table,
    experiment_axis,
    experiment_table,
    method_label,
    to_csv,
    to_markdown,
    trial_records,
)

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
TABLES_DIR = "tables"


def write_report(directory: str | Path) -> Path:
    """Write the report of the study in ``directory``; returns the path of ``report.md``."""
    directory = Path(directory)
    store = StudyStore.open(directory)
    try:
        study, rows, runs = store.spec(), store.trials(), store.runs()
    finally:
        store.connection.close()
    spec = study["spec"]
    records = trial_records(rows)
    has_unseen = any(r["unseen_rougeL"] is not None for r in records)
    column = "unseen_rougeL" if has_unseen else "seen_rougeL"
    tables_dir, figures_dir = directory / TABLES_DIR, directory / FIGURES_DIR
    write_text_atomic(tables_dir / "trials.csv", to_csv(records, RECORD_COLUMNS))
    done = [r for r in records if r["status"] == "done"]
    out: list[str] = [f"# Study `{study['name']}`", "", _summary(study, spec, records, runs), ""]

    out += ["## Headline: each method's best trial", "",
            f"Best trial of each method by validation ROUGE-L (the paper's checkpoint and trial selection); "
            f"scores are ROUGE-L / exact match (0-100) on {'seen and unseen' if has_unseen else 'held-out'} "
            f"instances.", ""]  # fmt: skip
    headline = headline_rows(records)
    write_text_atomic(tables_dir / "headline.csv", to_csv(headline))
    out += [headline_markdown(headline, has_unseen), ""]

    tables_by_axis: dict[str, list[dict[str, Any]]] = {}
    out += ["## Experiments", ""]
    for experiment in spec["experiments"]:
        members = [r for r in records if experiment["name"] in r["experiments"].split(";")]
        if not members:
            continue
        axis = experiment_axis(experiment, members)
        table = experiment_table(members, axis)
        tables_by_axis.setdefault(axis, table)
        slug = _slug(experiment["name"])
        write_text_atomic(tables_dir / f"{slug}.csv", to_csv(table))
        title = f"{experiment['name']}: ROUGE-L against {figures.AXIS_LABELS[axis]}"
        figures.experiment_figure(table, axis, figures_dir / f"{slug}.png", title, has_unseen)
        columns = ["series", axis, "validation_rougeL", "seen_rougeL", *(["unseen_rougeL"] if has_unseen else []),
                   "trials", "unstable", "trainable_params"]  # fmt: skip
        out += [f"### {experiment['name']} (x: {figures.AXIS_LABELS[axis]})", "",
                f"![{experiment['name']}]({FIGURES_DIR}/{slug}.png)", "",
                "Mean over seeds (standard deviations in `tables/" + f"{slug}.csv`); unstable: trials whose loss "
                "became NaN.", "", to_markdown(table, columns), ""]  # fmt: skip

    if done:
        figures.params_figure(records, figures_dir / "params.png", has_unseen)
        out += ["## Score against trainable parameters", "", f"![params]({FIGURES_DIR}/params.png)", "",
                "Every finished trial (numbers in `tables/trials.csv`).", ""]  # fmt: skip
        if has_unseen:
            figures.seen_unseen_figure(records, figures_dir / "seen_unseen.png")
            out += ["## Seen against unseen tasks", "", f"![seen vs unseen]({FIGURES_DIR}/seen_unseen.png)", ""]
    if any(r.get("losses") for r in rows):
        figures.loss_figure(rows, figures_dir / "loss_curves.png")
        write_text_atomic(tables_dir / "losses.csv", _loss_csv(rows))
        out += ["## Training loss", "", f"![loss curves]({FIGURES_DIR}/loss_curves.png)", "",
                "Per step, the mean loss over the trial's response tokens (`tables/losses.csv`).", ""]  # fmt: skip

    findings: list[Finding] = []
    if spec["training"].get("adapter_per") == "category":
        columns, table = category_table(rows)
        if table:
            write_text_atomic(tables_dir / "categories.csv", to_csv(table, ["category", *columns]))
            figures.category_figure(columns, table, figures_dir / "categories.png")
            out += ["## Category x method", "",
                    "One adapter per category, trained together; at evaluation every row is routed to its "
                    "category's adapter in one mixed batch. Score: the mean over a category's tasks of each task's "
                    "primary metric (exact match or ROUGE-L), on held-out instances.", "",
                    f"![categories]({FIGURES_DIR}/categories.png)", "",
                    to_markdown(table, ["category", *columns]), ""]  # fmt: skip
            if spec["report"]["findings"] == "flora-domains":
                findings = flora_domains(records, columns, table)
    if spec["report"]["findings"] == "peft-instruction":
        findings = peft_instruction(records, rows, tables_by_axis, column)
    if findings:
        out += ["## The papers' findings, one by one", "",
                "A difference counts when it exceeds the margin (1 ROUGE-L point, or twice the seed standard "
                "deviation when there are several seeds). Verdicts: agrees, disagrees, cannot tell at this scale.",
                ""]  # fmt: skip
        for number, finding in enumerate(findings, start=1):
            out += [f"{number}. **{finding.claim}**: {finding.verdict}.", f"   - paper: {finding.paper}",
                    f"   - ours: {finding.ours}", ""]  # fmt: skip
    failed = [r for r in records if r["status"] in ("failed", "unstable")]
    if failed:
        out += ["## Failed and unstable trials", "",
                to_markdown(failed, ["id", "method", "learning_rate", "size", "status", "error"]), ""]  # fmt: skip
    return write_text_atomic(directory / REPORT_FILE, "\n".join(out).rstrip() + "\n")


def headline_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method's best trial by validation ROUGE-L, with its settings and scores."""
    return [{"method": method_label(r["method"], r["size"]), "learning_rate": r["learning_rate"],
             "num_tasks": r["num_tasks"], "trainable_params": r["trainable_params"],
             "validation_rougeL": r["validation_rougeL"], "seen_rougeL": r["seen_rougeL"],
             "seen_exact_match": r["seen_exact_match"], "unseen_rougeL": r["unseen_rougeL"],
             "unseen_exact_match": r["unseen_exact_match"], "id": r["id"]}
            for r in best_by_method(records)]  # fmt: skip


def headline_markdown(headline: list[dict[str, Any]], has_unseen: bool) -> str:
    columns = ["method", "learning_rate", "num_tasks", "trainable_params", "validation_rougeL", "seen_rougeL",
               "seen_exact_match", *(["unseen_rougeL", "unseen_exact_match"] if has_unseen else [])]  # fmt: skip
    headers = ["method", "lr", "tasks", "trainable params", "val ROUGE-L", "seen ROUGE-L", "seen EM",
               *(["unseen ROUGE-L", "unseen EM"] if has_unseen else [])]  # fmt: skip
    return to_markdown(headline, columns, headers)


def _summary(study: dict[str, Any], spec: dict[str, Any], records: list[dict[str, Any]], runs: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    data = spec["data"]
    source = (f"Super-NaturalInstructions at `{data['path']}`" if data["source"] == "superni"
              else f"the built-in task suite (seed {data['suite_seed']})")  # fmt: skip
    training = spec["training"]
    length = f"{training['max_steps']} steps" if training.get("max_steps") else f"{training['epochs']:g} epochs"
    compute = sum((r["wall_s"] or 0) / max(r["pack_size"] or 1, 1) for r in records)
    started = min((run["started"] for run in runs), default=None)
    lines = [
        f"- spec: `{spec['source']}`, profile `{spec.get('profile')}`; {spec.get('description', '')}".rstrip("; "),
        f"- model: {', '.join(sorted({r['model'] for r in records}))} ({spec['model']['dtype']}); data: {source}; "
        f"{data['train_instances']} training instances per task, {data['validation_instances']} validation, "
        f"{data['seen_instances']} seen-test per training task, {data['unseen_instances']} per unseen task",
        f"- training: {length}, batch {training['batch_size']}, {training['lr_scheduler']} schedule, warm-up "
        f"{training['warmup_ratio']:g}, weight decay {training['weight_decay']:g}; "
        f"{spec['evaluation']['evaluations']} validation evaluations per trial, best by "
        f"{spec['evaluation']['select_by']}",
        f"- trials: {len(records)} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); "
        f"{len(runs)} run(s) of `flora study run`"
        + (f", first started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}" if started else ""),
        f"- compute: {compute / 3600:.2f} h of trial wall time (a pack's wall time shared among its trials; it "
        f"includes any time the process was paused)",
    ]  # fmt: skip
    return "\n".join(lines)


def _loss_csv(rows: list[dict[str, Any]]) -> str:
    lines = ["id,method,size,learning_rate,step,loss"]
    for row in rows:
        for step, loss in enumerate(row.get("losses") or [], start=1):
            lines.append(f"{row['id']},{row['method']},{row['size'] if row['size'] is not None else ''},"
                         f"{row['learning_rate']},{step},{loss:.6g}")  # fmt: skip
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name.lower()).strip("-") or "experiment"
