"""The data of a study: its training, validation and test tasks, and the instances of each split.

Four evaluation splits, each a set of instances (`SPLITS`):

- ``validation``: held-out instances of every training task (``validation_instances`` per task):
  learning rates for the seen-task scores are chosen on them;
- ``validation_tasks``: instances of the validation tasks (``validation_task_instances`` per
  task), tasks held out of training altogether (the last ``validation_tasks`` of the shuffled
  training-task order): learning rates for the unseen-task scores are chosen on them;
- ``seen``: further held-out instances of every training task (``seen_instances`` per task);
- ``unseen``: instances of the test tasks (``unseen_instances`` per task).

Test scores (``seen``, ``unseen``) never choose anything. Two sources (``[data] source``):

- ``"suite"``: flora's built-in task suite (`flora.data.suite`). Training tasks: ``tasks`` (task
  names or categories; default: the default split's training tasks), test tasks: ``test_tasks``
  (default: the held-out categories' tasks). Trials train on the suite's training instances
  (``train_instances`` per task; ``tasks = "all"``: every suite task); the evaluation splits come
  from its held-out instances (of a training task: the first ``validation_instances``, then the
  next ``seen_instances``; of a validation or test task: the first ones), which never overlap the
  training ones.
- ``"superni"``: a Super-NaturalInstructions directory (``path``, with ``tasks/*.json`` and the
  split files ``train_split`` / ``test_split``, or ``tasks`` / ``test_tasks`` naming tasks).
  Per training task, in the task file's order: the first ``train_instances`` instances train, the
  next ``validation_instances`` validate, the next ``seen_instances`` are its seen test; per
  validation or test task the first instances (the official protocol scores a test task's first
  instances). A task with too few instances for its part is refused.

Training-split tasks are ordered by a shuffle seeded with ``task_order_seed``; the last
``validation_tasks`` of that order become validation tasks, and a trial with ``num_tasks = n``
trains on the first n of the others (so smaller task sets are subsets of larger ones). The split
is deterministic; `StudyData.split_record` is what the study store keeps of it (and the report shows).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from flora.data import suite as suite_module
from flora.data.formats import Task, load_sni, read_task_names
from flora.data.templates import Sample, samples_from_tasks

SPLITS = ("validation", "validation_tasks", "seen", "unseen")
VALIDATION_SPLITS = ("validation", "validation_tasks")  # the only scores that choose anything
TEST_SPLITS = ("seen", "unseen")
SELECTED_ON = {"seen": "validation", "unseen": "validation_tasks"}  # test split -> the split that selects for it


@dataclass
class StudyData:
    """The resolved data of a study (`load_study_data`): the tasks by role and each split's instances."""

    source: str
    path: str | None
    train_tasks: list[str]
    validation_tasks: list[str]
    test_tasks: list[str]
    categories: dict[str, str]
    metrics: dict[str, str]
    splits: dict[str, dict[str, list[Sample]]]  # split -> task -> samples
    spec: dict[str, Any]

    def tasks_for(self, num_tasks: int | None) -> list[str]:
        """The training tasks of a trial with ``num_tasks`` (None: all of them)."""
        if num_tasks is None:
            return list(self.train_tasks)
        if num_tasks > len(self.train_tasks):
            raise ValueError(f"num_tasks={num_tasks} is more than the {len(self.train_tasks)} training tasks of "
                             f"the data (expected at most {len(self.train_tasks)})")  # fmt: skip
        return self.train_tasks[:num_tasks]

    def samples(self, split: str, num_tasks: int | None) -> list[Sample]:
        """The instances of ``split`` that a trial training on ``num_tasks`` tasks is scored on (the
        seen splits: its own training tasks'; the others: every validation / test task's)."""
        tasks = self.tasks_for(num_tasks) if split in ("validation", "seen") else list(self.splits[split])
        return [sample for task in tasks for sample in self.splits[split][task]]

    def train_fields(self, num_tasks: int | None) -> dict[str, Any]:
        """The `flora.training.TrainConfig` fields that select a trial's training instances."""
        tasks = self.tasks_for(num_tasks)
        fields: dict[str, Any] = {"tasks": tasks, "template": self.spec["template"],
                                  "max_length": self.spec["max_length"]}  # fmt: skip
        if self.source == "suite":
            fields.update(data=[], suite_seed=self.spec["suite_seed"], suite_train=self.spec["train_instances"])
        else:
            fields.update(data=[self.path], max_instances=self.spec["train_instances"])
        return fields

    def split_record(self) -> dict[str, Any]:
        """Every task with its role (train, validation, test), its place in the study's order
        (``order``: training tasks in the order ``num_tasks`` takes them), category, primary metric,
        number of training instances, and the ids of its instances in each evaluation split."""
        roles = [(t, "train") for t in self.train_tasks] + [(t, "validation") for t in self.validation_tasks] + [
            (t, "test") for t in self.test_tasks]  # fmt: skip
        return {task: {"role": role, "order": order, "category": self.categories[task], "metric": self.metrics[task],
                       "train": self.spec["train_instances"] if role == "train" else 0,
                       "splits": {split: [s.id for s in self.splits[split][task]] for split in SPLITS
                                  if task in self.splits[split]}}
                for order, (task, role) in enumerate(roles)}  # fmt: skip


def load_study_data(spec: dict[str, Any]) -> StudyData:
    """The data that the ``[data]`` section ``spec`` names, checked (paths, tasks, instance counts)."""
    return _load(json.dumps(spec, sort_keys=True))


@lru_cache(maxsize=4)
def _load(key: str) -> StudyData:
    spec = json.loads(key)
    if spec["source"] == "suite":
        return _suite(spec)
    return _superni(spec)


def _ordered(tasks: list[str], seed: int) -> list[str]:
    order = list(tasks)
    random.Random(seed).shuffle(order)
    return order


def _roles(train: list[str], test: list[str], spec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(training tasks in order, validation tasks)``: the shuffled order's last ``validation_tasks`` validate."""
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ValueError(f"data: tasks {overlap} are both training and test tasks (expected disjoint sets)")
    order = _ordered(train, spec["task_order_seed"])
    held = spec["validation_tasks"]
    if held >= len(order):
        raise ValueError(f"data.validation_tasks={held} leaves no training task (the data has {len(order)} training "
                         f"tasks; expected fewer validation tasks)")  # fmt: skip
    if test and not held:
        raise ValueError("data.validation_tasks is 0 but the study has test tasks: learning rates for the unseen-task "
                         "scores are chosen on validation tasks (expected data.validation_tasks >= 1)")  # fmt: skip
    return order[: len(order) - held], order[len(order) - held :]


def _suite(spec: dict[str, Any]) -> StudyData:
    if spec.get("path"):
        raise ValueError("data.path is set but data.source is 'suite' (set source = 'superni' to use the files)")
    default_train, default_test = suite_module.default_split()
    if spec["tasks"] == ["all"]:
        train = [s.name for s in suite_module.SPECS]
    else:
        train = [s.name for s in suite_module.select_specs(spec["tasks"])] if spec["tasks"] else default_train
    test = [s.name for s in suite_module.select_specs(spec["test_tasks"])] if spec["test_tasks"] is not None else (
        [t for t in default_test if t not in train])  # fmt: skip
    if not train:
        raise ValueError("data.tasks names no suite task (expected task names or categories)")
    train, held = _roles(train, test, spec)
    v, s = spec["validation_instances"], spec["seen_instances"]
    needs = (
        ("validation_instances + seen_instances", v + s),
        ("unseen_instances", spec["unseen_instances"]),
        ("validation_task_instances", spec["validation_task_instances"] if held else 0),
    )
    for name, needed in needs:
        if needed > suite_module.DEFAULT_HELDOUT:
            raise ValueError(f"data: {name} = {needed} is more than the suite's {suite_module.DEFAULT_HELDOUT} "
                             f"held-out instances per task")  # fmt: skip
    suite = suite_module.build_suite(spec["suite_seed"], 0, suite_module.DEFAULT_HELDOUT, train + held + test)
    heldout = {task.name: task for task in suite.heldout}
    return StudyData(
        source="suite", path=None, train_tasks=train, validation_tasks=held, test_tasks=test,
        categories={t.name: t.category for t in suite.heldout},
        metrics={t.name: t.primary_metric for t in suite.heldout},
        splits={"validation": {t: _samples(heldout[t], 0, v) for t in train},
                "validation_tasks": {t: _samples(heldout[t], 0, spec["validation_task_instances"]) for t in held},
                "seen": {t: _samples(heldout[t], v, v + s) for t in train},
                "unseen": {t: _samples(heldout[t], 0, spec["unseen_instances"]) for t in test}},
        spec=spec,
    )  # fmt: skip


def _superni(spec: dict[str, Any]) -> StudyData:
    if not spec.get("path"):
        raise ValueError("data.path is not set: a Super-NaturalInstructions study needs the data set's directory "
                         "(pass --data DIR, a directory with tasks/*.json and splits/)")  # fmt: skip
    root = Path(spec["path"])
    if not root.is_dir():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist (expected a Super-NaturalInstructions "
                                f"directory with tasks/*.json and splits/)")  # fmt: skip
    task_dir = root / "tasks" if (root / "tasks").is_dir() else root
    if not any(task_dir.glob("*.json")):
        raise FileNotFoundError(f"data path {str(root)!r} holds no Super-NaturalInstructions tasks "
                                f"(expected task files {task_dir}/*.json)")  # fmt: skip
    train = spec["tasks"] or read_task_names(_split(root, spec["train_split"], "train_split"))
    test = spec["test_tasks"] if spec["test_tasks"] is not None else read_task_names(
        _split(root, spec["test_split"], "test_split"))  # fmt: skip
    train, held = _roles(train, test, spec)
    loaded = {task.name: task for task in load_sni(task_dir, [*train, *held, *test])}
    n, v, s = spec["train_instances"], spec["validation_instances"], spec["seen_instances"]
    needs = [(train, n + v + s, "train_instances + validation_instances + seen_instances"),
             (held, spec["validation_task_instances"], "validation_task_instances"),
             (test, spec["unseen_instances"], "unseen_instances")]  # fmt: skip
    for tasks, needed, what in needs:
        short = [t for t in tasks if len(loaded[t].instances) < needed]
        if short:
            counts = ", ".join(f"{t}: {len(loaded[t].instances)}" for t in short[:5])
            raise ValueError(f"data: {what} = {needed} instances per task, but these tasks have fewer ({counts})")
    return StudyData(
        source="superni", path=str(root), train_tasks=train, validation_tasks=held, test_tasks=list(test),
        categories={name: task.category for name, task in loaded.items()},
        metrics={name: task.primary_metric for name, task in loaded.items()},
        splits={"validation": {t: _samples(loaded[t], n, n + v) for t in train},
                "validation_tasks": {t: _samples(loaded[t], 0, spec["validation_task_instances"]) for t in held},
                "seen": {t: _samples(loaded[t], n + v, n + v + s) for t in train},
                "unseen": {t: _samples(loaded[t], 0, spec["unseen_instances"]) for t in test}},
        spec=spec,
    )  # fmt: skip


def _split(root: Path, name: str, key: str) -> Path:
    path = root / name
    if not path.is_file():
        names = "tasks" if key == "train_split" else "test_tasks"
        raise FileNotFoundError(f"data.{key}: {str(path)!r} does not exist (expected a file with one task name "
                                f"per line, or give data.{names})")  # fmt: skip
    return path


def _samples(task: Task, start: int, stop: int) -> list[Sample]:
    return samples_from_tasks([task.with_instances(task.instances[start:stop])])
