"""The data of a study: its training and test tasks, and the instances trials train and are scored on.

Two sources (``[data] source``):

- ``"suite"``: flora's built-in task suite (`flora.data.suite`). Training tasks: ``tasks`` (task
  names or categories; default: the default split's training tasks), test tasks: ``test_tasks``
  (default: the held-out categories' tasks). Trials train on the suite's training instances
  (``train_instances`` per task; ``tasks = "all"``: every suite task); validation and test
  instances come from its held-out instances
  (the first ``validation_instances``, then the next ``seen_instances`` / ``unseen_instances``),
  which never overlap the training ones.
- ``"superni"``: a Super-NaturalInstructions directory (``path``, with ``tasks/*.json`` and the
  split files ``train_split`` / ``test_split``, or ``tasks`` / ``test_tasks`` naming tasks).
  Per training task: the first ``train_instances`` instances train, the next
  ``validation_instances`` choose the checkpoint, the next ``seen_instances`` give the seen score;
  per test task the first ``unseen_instances`` give the unseen score (the official protocol
  scores a test task's first instances).

Training tasks are ordered by a shuffle seeded with ``task_order_seed``; a trial with
``num_tasks = n`` trains on the first n (so smaller task sets are subsets of larger ones).
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


@dataclass
class StudyData:
    """The resolved data of a study (`load_study_data`)."""

    source: str
    path: str | None
    train_tasks: list[str]
    test_tasks: list[str]
    categories: dict[str, str]
    validation: dict[str, list[Sample]]
    seen: dict[str, list[Sample]]
    unseen: dict[str, list[Sample]]
    spec: dict[str, Any]

    def tasks_for(self, num_tasks: int | None) -> list[str]:
        """The training tasks of a trial with ``num_tasks`` (None: all of them)."""
        if num_tasks is None:
            return list(self.train_tasks)
        if num_tasks > len(self.train_tasks):
            raise ValueError(f"num_tasks={num_tasks} is more than the {len(self.train_tasks)} training tasks of "
                             f"the data (expected at most {len(self.train_tasks)})")  # fmt: skip
        return self.train_tasks[:num_tasks]

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
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ValueError(f"data: tasks {overlap} are both training and test tasks (expected disjoint sets)")
    if not train:
        raise ValueError("data.tasks names no suite task (expected task names or categories)")
    needed = spec["validation_instances"] + max(spec["seen_instances"], spec["unseen_instances"])
    if needed > suite_module.DEFAULT_HELDOUT:
        raise ValueError(f"data: validation_instances + seen/unseen_instances = {needed} is more than the suite's "
                         f"{suite_module.DEFAULT_HELDOUT} held-out instances per task")  # fmt: skip
    suite = suite_module.build_suite(spec["suite_seed"], 0, suite_module.DEFAULT_HELDOUT, train + test)
    heldout = {task.name: task for task in suite.heldout}
    v = spec["validation_instances"]
    return StudyData(
        source="suite", path=None, train_tasks=_ordered(train, spec["task_order_seed"]), test_tasks=test,
        categories={t.name: t.category for t in suite.heldout},
        validation={t: _samples(heldout[t], 0, v) for t in train},
        seen={t: _samples(heldout[t], v, v + spec["seen_instances"]) for t in train},
        unseen={t: _samples(heldout[t], v, v + spec["unseen_instances"]) for t in test},
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
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ValueError(f"data: tasks {overlap} are both training and test tasks (expected disjoint sets)")
    loaded = {task.name: task for task in load_sni(task_dir, [*train, *test])}
    n, v, s = spec["train_instances"], spec["validation_instances"], spec["seen_instances"]
    short = [t for t in train if len(loaded[t].instances) < n + v]
    if short:
        counts = ", ".join(f"{t}: {len(loaded[t].instances)}" for t in short[:5])
        raise ValueError(f"data: training tasks need train_instances + validation_instances = {n + v} instances, "
                         f"these have fewer ({counts})")  # fmt: skip
    return StudyData(
        source="superni", path=str(root), train_tasks=_ordered(train, spec["task_order_seed"]), test_tasks=list(test),
        categories={name: task.category for name, task in loaded.items()},
        validation={t: _samples(loaded[t], n, n + v) for t in train},
        seen={t: _samples(loaded[t], n + v, n + v + s) for t in train},
        unseen={t: _samples(loaded[t], 0, spec["unseen_instances"]) for t in test},
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
