"""``flora study report``: ``report.md``, its figures (``figures/*.png``) and tables (``tables/*.csv``).

Everything comes from the study store (`flora.study.store`): the spec, the data split, the trials
of its plan, their per-instance scores and learning curves (`flora.study.results`). The report
holds, in order: what was run (model, dtype as run, data split, schedule, how scores are selected
and how intervals are computed, trials, the runs and their hours); the headline (the zero-shot base
model and each method at its setting chosen on validation, every score with its 95 % interval);
one figure and table per experiment; learning curves (validation loss) and training loss;
score against trainable parameters; for one-adapter-per-category studies the category x method
table; learning-rate grids whose chosen rate is unbracketed; the papers' findings one by one, each
with its rule; and a closing note (each finding's verdict and interval, the hours each run took).
Every figure is drawn from the table written beside it, and its caption names the trials, the
metric and the step it plots. Files of ``figures/`` and ``tables/`` that this report did not
write (left by an earlier design) are removed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flora.data.formats import write_text_atomic
from flora.study import figures
from flora.study.data import SPLITS
from flora.study.findings import Finding, flora_domains, peft_instruction, test_split
from flora.study.results import CellKey, StudyResults
from flora.study.stats import BOOTSTRAP_SEED, REPLICATES
from flora.study.store import StudyStore
from flora.study.tables import (
    RECORD_COLUMNS,
    category_table,
    cell_table,
    experiment_axis,
    fmt,
    fmt_estimate,
    format_rate,
    headline_rows,
    method_label,
    to_csv,
    to_markdown,
    trial_records,
)

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
TABLES_DIR = "tables"
METRIC_NAMES = {"rougeL": "ROUGE-L", "exact_match": "exact match", "primary": "score (each task's metric)"}
SPLIT_TITLES = {"validation": "validation (training tasks)", "validation_tasks": "validation tasks",
                "seen": "seen tasks (held-out instances)", "unseen": "unseen tasks"}  # fmt: skip


class _Writer:
    """The files of one report, remembered so that stale ones can be removed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written: set[Path] = set()

    def table(self, name: str, text: str) -> str:
        path = write_text_atomic(self.directory / TABLES_DIR / name, text)
        self.written.add(Path(path))
        return f"{TABLES_DIR}/{name}"

    def figure(self, name: str) -> Path:
        path = self.directory / FIGURES_DIR / name
        self.written.add(path)
        return path

    def remove_stale(self) -> None:
        for folder, suffix in ((FIGURES_DIR, ".png"), (TABLES_DIR, ".csv")):
            for path in (self.directory / folder).glob(f"*{suffix}"):
                if path not in self.written:
                    path.unlink()


def write_report(directory: str | Path) -> Path:
    """Write the report of the study in ``directory``; returns the path of ``report.md``."""
    directory = Path(directory)
    store = StudyStore.open(directory)
    try:
        study, runs = store.spec(), store.runs()
        results = StudyResults.load(store)
    finally:
        store.connection.close()
    spec = study["spec"]
    files = _Writer(directory)
    records = trial_records(results.rows)
    files.table("trials.csv", to_csv(records, RECORD_COLUMNS))
    if results.split:
        files.table("split.csv", to_csv(_split_rows(results.split)))
    metric = METRIC_NAMES[results.metric]
    splits = [s for s in ("seen", "unseen") if results.has(s)]
    out: list[str] = [f"# Study `{study['name']}`", "", _summary(study, spec, results, runs, metric), ""]
    if not splits:
        out += ["No trial has finished yet.", ""]
        files.remove_stale()
        return write_text_atomic(directory / REPORT_FILE, "\n".join(out).rstrip() + "\n")
    n = _n(results, splits)
    step = _final_step(results)

    headline = headline_rows(results, splits)
    columns = ["series", "learning_rate", "num_tasks", "trainable_params", "seeds", "validation",
               *(["validation_tasks"] if "unseen" in splits else []), *splits, "chosen", "edge"]  # fmt: skip
    headers = ["method", "lr", "tasks", "trainable params", "seeds", "val", *(["val tasks"] if "unseen" in splits
               else []), *[SPLIT_TITLES[s] for s in splits], "chosen for", "unbracketed"]  # fmt: skip
    out += ["## Headline", "",
            f"The zero-shot base model, then each method at the learning rate of its sweep with the best mean "
            f"validation {metric}: "
            + ("on the validation tasks for the unseen-task score, on the training tasks' validation instances for "
               "the seen-task score (`chosen for`). " if "unseen" in splits else
               "on the training tasks' validation instances. ")
            + f"Scores 0-100 at the final step (step {step}), mean over seeds, with their 95 % intervals ({n}). "
            f"Validation columns are the points selection reads. `unbracketed`: the chosen learning rate is an end "
            f"of its grid (or never swept).", "",
            to_markdown(headline, columns, headers), "",
            f"Table: `{files.table('headline.csv', to_csv(headline))}`.", ""]  # fmt: skip
    baseline = {s: next((r[s] for r in headline if r["method"] == "zero_shot"), None) for s in splits}
    panels = [(s, f"{SPLIT_TITLES[s]}: {metric}") for s in splits]

    out += ["## Experiments", ""]
    figure_number = 0
    for experiment in spec["experiments"]:
        cells = [c for c in results.cells if experiment["name"] in results.cells[c].experiments]
        if not any(results.cells[c].done for c in cells):
            continue
        members = [r for r in records if experiment["name"] in r["experiments"].split(";")]
        axis = experiment_axis(experiment, members)
        cells = sorted(cells, key=lambda c: (c.series.sort_key(), c.learning_rate))
        rows = cell_table(results, cells, splits)
        experiment_panels = list(panels)
        if axis == "num_tasks" and "seen" in splits:  # seen scores compare only on the tasks every trial trained on
            common = results.training_tasks()[: min(c.series.num_tasks for c in cells)]
            for row, cell in zip(rows, cells, strict=True):
                estimate = results.score(cell, "seen", common) if results.cells[cell].done else None
                for suffix, value in (("", "value"), ("_low", "low"), ("_high", "high")):
                    row[f"seen_common{suffix}"] = getattr(estimate, value) if estimate else None
            experiment_panels = [(c, t) for c, t in panels if c != "seen"] + [
                ("seen_common", f"seen, the {len(common)} tasks all trained on: {metric}")]  # fmt: skip
            baseline["seen_common"] = results.score(results.zero_shot.key, "seen", common).value if (
                results.zero_shot and results.zero_shot.done) else None  # fmt: skip
        slug = _slug(experiment["name"])
        figure_number += 1
        figure_n = n
        if axis == "num_tasks" and "seen" in splits:
            layout, _ = results.layout("seen", common)
            figure_n = "; ".join(filter(None, [_n(results, [s for s in splits if s != "seen"]),
                                               f"seen on the common tasks: n = {len(layout.tasks)} tasks x "
                                               f"{layout.per_task} instances"]))  # fmt: skip
        figures.experiment_figure(rows, axis, experiment_panels, files.figure(f"{slug}.png"),
                                  f"{experiment['name']}: {metric} against {figures.AXIS_LABELS[axis]}", baseline,
                                  figure_n)  # fmt: skip
        table_columns = ["series", axis if axis not in ("method", "learning_rate") else "num_tasks", "learning_rate",
                         "seeds", "unstable", "trainable_params", "validation",
                         *(["validation_tasks"] if "unseen" in splits else []),
                         *[c for c, _ in experiment_panels], "chosen", "edge"]  # fmt: skip
        out += [f"### {experiment['name']} (x: {figures.AXIS_LABELS[axis]})", "",
                f"![{experiment['name']}]({FIGURES_DIR}/{slug}.png)", "",
                f"*Figure {figure_number}.* Trials: {_cells_text(cells)}. Metric: {metric} (95 % intervals: "
                f"{figure_n}); every trial at its final step (step {step}); dashed grey: the zero-shot base model."
                + (" Sizes of different kinds (rank, adapter size, virtual tokens) in separate panels."
                   if axis == "size" else "")
                + (" The seen panel scores only the tasks every trial trained on; a trial's own seen score "
                   "(on its own tasks) is in the table's `seen` column." if axis == "num_tasks" else ""), "",
                to_markdown(rows, list(dict.fromkeys(table_columns))), "",
                f"`chosen`: the learning rate its series chooses on validation for that split. Table: "
                f"`{files.table(f'{slug}.csv', to_csv(rows))}`.", ""]  # fmt: skip

    figure_number = _curves(out, files, results, figure_number)
    chosen_rows = [r for r in headline if r["method"] != "zero_shot"]
    if chosen_rows:
        figure_number += 1
        main = splits[-1]
        figures.params_figure(chosen_rows, main, f"{SPLIT_TITLES[main]}: {metric}", files.figure("params.png"),
                              baseline.get(main), _n(results, [main]))  # fmt: skip
        out += ["## Score against trainable parameters", "", f"![params]({FIGURES_DIR}/params.png)", "",
                f"*Figure {figure_number}.* Trials: the headline's settings (each method chosen on validation). "
                f"Metric: {SPLIT_TITLES[main]} {metric} at the final step (step {step}), 95 % intervals "
                f"({_n(results, [main])}); "
                f"dashed grey: the zero-shot base model.", ""]  # fmt: skip

    if spec["training"].get("adapter_per") == "category":
        split = test_split(results)
        cells = [results.choose(series, split).cell for series in results.series().values()]
        columns, table = category_table(results, cells, split)
        figure_number += 1
        figures.category_figure(columns, table, files.figure("categories.png"), f"{SPLIT_TITLES[split]}: {metric}")
        out += ["## Category x method", "",
                "One adapter per category, trained together; at evaluation every row is routed to its category's "
                "adapter in one mixed batch. Each method and rank at its learning rate chosen on validation.", "",
                f"![categories]({FIGURES_DIR}/categories.png)", "",
                f"*Figure {figure_number}.* Trials: {_cells_text(cells)}. Metric: {SPLIT_TITLES[split]} {metric}, "
                f"per category the macro mean over its tasks, at the final step (step {step}); the 95 % intervals "
                f"are in the table.", "", to_markdown(table, ["category", *columns]), "",
                f"Table: `{files.table('categories.csv', to_csv(table))}`.", ""]  # fmt: skip

    out += _grids(results, splits)
    findings = _findings(spec, results)
    if findings:
        out += ["## The papers' findings, one by one", "",
                f"Each finding states its rule. Scores at the final step; settings chosen on validation only; "
                f"intervals: 95 %, hierarchical bootstrap ({REPLICATES} replicates, seed {BOOTSTRAP_SEED}). "
                f"Non-inferiority margin: {spec['report']['margin']:g} points.", ""]  # fmt: skip
        for number, finding in enumerate(findings, start=1):
            out += [f"{number}. **{finding.claim}**: {finding.verdict}.", f"   - paper: {finding.paper}",
                    f"   - rule: {finding.rule}", f"   - ours: {finding.ours}"]  # fmt: skip
            if finding.verdict == "cannot tell" and finding.to_decide:
                out.append(f"   - what would decide it: {'; '.join(finding.to_decide)}")
            out.append("")
    out += _closing(findings, results, runs)
    failed = [r for r in records if r["status"] in ("failed", "unstable")]
    if failed:
        columns = ["id", "method", "learning_rate", "size", "seed", "status", "error"]
        out += ["## Failed and unstable trials", "", to_markdown(failed, columns), ""]
    files.remove_stale()
    return write_text_atomic(directory / REPORT_FILE, "\n".join(out).rstrip() + "\n")


def _findings(spec: dict[str, Any], results: StudyResults) -> list[Finding]:
    margin = spec["report"]["margin"]
    if spec["report"]["findings"] == "peft-instruction":
        return peft_instruction(results, margin)
    if spec["report"]["findings"] == "flora-domains":
        return flora_domains(results, margin)
    return []


def _n(results: StudyResults, splits: Sequence[str]) -> str:
    """What the intervals are over, per test split (seen: the most training tasks any trial has)."""
    seeds = sorted({len(c.done) for c in results.cells.values() if c.done and c.key.method != "zero_shot"})
    per_seed = (f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}") if seeds else "0"
    parts = []
    for split in splits:
        tasks = results.training_tasks() if split == "seen" else results.tasks_with(split)
        layout, _ = results.layout(split, tasks)
        parts.append(f"{split}: n = {len(layout.tasks)} tasks x {layout.per_task} instances, {per_seed} seed(s)")
    return "; ".join(parts)


def _final_step(results: StudyResults) -> str:
    steps = sorted({r["best_step"] for r in results.rows if r["status"] == "done" and r["best_step"]})
    return ", ".join(map(str, steps)) or "-"


def _cells_text(cells: Sequence[CellKey]) -> str:
    return "; ".join(
        f"{method_label(c.method, c.series.size)} lr {format_rate(c.learning_rate)}"
        + (f" ({c.series.num_tasks} tasks)" if c.method != "zero_shot" else "")
        for c in cells
    )


def _curves(out: list[str], files: _Writer, results: StudyResults, figure_number: int) -> int:
    """The learning curves (validation loss) and the training loss, per method."""
    series, losses, seeds = {}, {}, {}
    for method in results.methods():
        for key, cells in results.series(method).items():
            if key.num_tasks != max(c.series.num_tasks for c in results.most_tasks(method)):
                continue
            for cell in cells:
                if not results.cells[cell].done:
                    continue
                label = f"{method_label(cell.method, cell.series.size)} lr {format_rate(cell.learning_rate)}"
                panel = method_label(method)
                if len(results.curve_steps(cell)) > 1:
                    series.setdefault(panel, {})[label] = results.curve_band(cell, "validation")
                if results.training_loss(cell):
                    losses.setdefault(panel, {})[label] = results.training_loss(cell)
                seeds[label] = len(results.cells[cell].done)
    trials = "every cell on the most training tasks, per method (the lines)"
    if series:
        figure_number += 1
        figures.curve_figure(series, files.figure("learning_curves.png"), "validation loss (training tasks)",
                             "validation instances of the training tasks")  # fmt: skip
        out += ["## Learning curves", "", f"![learning curves]({FIGURES_DIR}/learning_curves.png)", "",
                f"*Figure {figure_number}.* Trials: {trials}. Metric: teacher-forced loss on the response tokens of "
                f"the training tasks' validation instances (mean over instances, then tasks, then seeds), at step 0 "
                f"and the measured steps; bars: 95 % intervals over tasks, instances and seeds. The \"learns "
                f"slower\" finding reads these curves.", ""]  # fmt: skip
    if losses:
        figure_number += 1
        figures.loss_figure(losses, files.figure("loss_curves.png"), seeds)
        out += ["## Training loss", "", f"![loss curves]({FIGURES_DIR}/loss_curves.png)", "",
                f"*Figure {figure_number}.* Trials: {trials}. Metric: the training loss of each optimizer step (mean "
                f"over the step's response tokens), mean over seeds; bold: exponential moving average (span a tenth "
                f"of the steps), faint: the raw loss. Per step in `{files.table('losses.csv', _loss_csv(results.rows))}"
                f"`.", ""]  # fmt: skip
    return figure_number


def _grids(results: StudyResults, splits: Sequence[str]) -> list[str]:
    """The series whose learning rate chosen on validation is an end of its grid."""
    rows = []
    for key, cells in results.series().items():
        done = [c for c in cells if results.cells[c].done]
        if len(done) < 2:
            continue
        for split in splits:
            choice = results.choose(done, split)
            if not choice.bracketed:
                rows.append({"series": f"{method_label(key.method, key.size)}, {key.num_tasks} tasks",
                             "split": split, "grid": ", ".join(format_rate(c.learning_rate) for c in done),
                             "chosen": format_rate(choice.cell.learning_rate), "edge": choice.edge})  # fmt: skip
    if not rows:
        return ["## Learning-rate grids", "", "Every swept series' learning rate chosen on validation lies inside its "
                "grid (bracketed).", ""]  # fmt: skip
    return ["## Learning-rate grids", "",
            "Series whose learning rate chosen on validation is an end of the grid: the optimum may lie outside it, "
            "and every finding that rests on it says cannot tell.", "",
            to_markdown(rows, ["series", "split", "grid", "chosen", "edge"]), ""]  # fmt: skip


def _closing(findings: Sequence[Finding], results: StudyResults, runs: Sequence[dict[str, Any]]) -> list[str]:
    out = ["## Closing note", ""]
    if findings:
        rows = [{"finding": f.claim, "verdict": f.verdict,
                 "estimates": "; ".join(f"{p.label}: {fmt_estimate(p.estimate, signed=True)}" if p.estimate
                                        else f"{p.label}: {p.verdict}" for p in f.parts) or f.ours}
                for f in findings]  # fmt: skip
        out += ["Each finding with its verdict and the interval(s) it rests on (95 %):", "",
                to_markdown(rows, ["finding", "verdict", "estimates"]), ""]  # fmt: skip
    ids = {r["id"] for r in results.rows}
    packs: dict[tuple[int | None, str | None], float] = {}
    for row in results.rows:
        if row["status"] in ("done", "unstable") and row["wall_s"]:
            packs[(row["run"], row["pack"])] = row["wall_s"]
    lines = []
    for run in runs:
        mine = [r for r in results.rows if r["run"] == run["id"] and r["id"] in ids and r["status"] != "pending"]
        if not mine:
            continue
        hours = ((run["finished"] or max((r["finished"] or run["started"]) for r in mine)) - run["started"]) / 3600
        trained = sum(w for (r, _), w in packs.items() if r == run["id"]) / 3600
        lines.append(
            {
                "run": run["id"],
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run["started"])),
                "hours": hours,
                "pack_hours": trained,
                "trials": len(mine),
                "outcome": run["outcome"] or "-",
            }
        )
    if lines:
        total = sum(line["pack_hours"] for line in lines)
        out += [f"Runs of `flora study run` that produced this plan's trials ({fmt(total, 2)} h of pack wall time in "
                f"all; `hours`: the run from start to end, `pack_hours`: its packs' wall time):", "",
                to_markdown(lines, ["run", "started", "hours", "pack_hours", "trials", "outcome"]), ""]  # fmt: skip
    return out


def _summary(study: dict[str, Any], spec: dict[str, Any], results: StudyResults, runs: list[dict], metric: str) -> str:
    counts: dict[str, int] = {}
    for r in results.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    data, training, evaluation = spec["data"], spec["training"], spec["evaluation"]
    source = "Super-NaturalInstructions" if data["source"] == "superni" else \
        f"the built-in task suite (seed {data['suite_seed']})"  # fmt: skip
    length = f"{training['max_steps']} steps" if training.get("max_steps") else f"{training['epochs']:g} epochs"
    roles: dict[str, int] = {}
    for entry in results.split.values():
        roles[entry["role"]] = roles.get(entry["role"], 0) + 1
    bf16 = bool((training.get("training_args") or {}).get("bf16"))
    dtype = spec["model"]["dtype"]
    models = sorted({r["model"] for r in results.rows})
    lines = [
        f"- spec: `{spec['source']}`, profile `{spec.get('profile')}`; {spec.get('description', '')}".rstrip("; "),
        f"- model: {', '.join(models)}" + (" (the model-size axis is untested: only this model is available offline)"
                                           if len(models) == 1 else ""),
        f"- dtype as run: {dtype} weights; training "
        + (f"under bfloat16 autocast (`training_args.bf16`), adapters and optimizer state in {dtype}" if bf16
           else f"in {dtype}") + f"; evaluation (validation loss, generation) in {dtype}",
        f"- data: {source}; {roles.get('train', 0)} training tasks, {roles.get('validation', 0)} validation tasks "
        f"(held out of training), {roles.get('test', 0)} unseen test tasks. Per training task: "
        f"{data['train_instances']} training instances (the first), {data['validation_instances']} validation, "
        f"{data['seen_instances']} seen-test; per validation task {data['validation_task_instances']}; per test task "
        f"{data['unseen_instances']}. Every task, its role and instance ids: `tables/split.csv`",
        f"- training: {length}, batch {training['batch_size']}, {training['lr_scheduler']} schedule, warm-up "
        f"{training['warmup_ratio']:g}, weight decay {training['weight_decay']:g}",
        f"- evaluation: validation loss (teacher-forced) at step 0 and {evaluation['evaluations']} evenly spaced "
        f"steps; greedy generation of every split at the final step, where every trial is reported",
        f"- selection: each method's learning rate by its mean validation {metric}: "
        f"validation tasks for unseen scores, the training tasks' validation instances for seen scores; never a "
        f"test score",
        f"- intervals: 95 %, hierarchical bootstrap ({REPLICATES} replicates, seed {BOOTSTRAP_SEED}): tasks, then "
        f"instances within each task, then seeds (per arm); paired (the same task and instance draws) for "
        f"differences; a score is the mean over seeds of the macro mean over tasks",
        f"- trials: {len(results.rows)} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); "
        f"{len(runs)} run(s) of `flora study run`",
    ]  # fmt: skip
    return "\n".join(lines)


def _split_rows(split: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task, entry in split.items():
        row = {"task": task, "role": entry["role"], "category": entry["category"], "metric": entry["metric"],
               "train": entry["train"]}  # fmt: skip
        for name in SPLITS:
            ids = entry["splits"].get(name)
            row[name] = len(ids) if ids is not None else 0
            row[f"{name}_ids"] = " ".join(ids or [])
        rows.append(row)
    return rows


def _loss_csv(rows: list[dict[str, Any]]) -> str:
    lines = ["id,method,size,learning_rate,num_tasks,seed,step,loss"]
    for row in rows:
        for step, loss in enumerate(row.get("losses") or [], start=1):
            lines.append(f"{row['id']},{row['method']},{row['size'] if row['size'] is not None else ''},"
                         f"{row['learning_rate']},{row['num_tasks']},{row['seed']},{step},{loss!r}")  # fmt: skip
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name.lower()).strip("-") or "experiment"
