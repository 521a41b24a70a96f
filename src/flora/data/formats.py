"""Instruction data formats, read and written: Super-NaturalInstructions, Alpaca, prompt/completion JSONL.

- Super-NaturalInstructions (SNI): one JSON object per task with ``Definition`` (a list of strings),
  ``Categories``, ``Positive Examples`` / ``Negative Examples`` (``input``, ``output``,
  ``explanation``) and ``Instances`` (``id``, ``input``, ``output``: a list of reference strings).
  `load_sni` reads a single file or a directory of them, optionally restricted by a split file
  (one task name per line, as the official ``splits/default/{train,test}_tasks.txt``).
- Alpaca: records with ``instruction``, ``input`` (optional) and ``output``, as a JSON list or JSONL.
- Plain JSONL: records with ``prompt`` and ``completion``.

Every loader validates as it reads: an error names the file, the record and the missing or
malformed field. Writers are atomic (a temporary file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora.io import atomic_write

# Official Tk-Instruct evaluation scores these categories by exact match, all others by ROUGE-L.
EXACT_MATCH_CATEGORIES = frozenset(
    {
        "Textual Entailment",
        "Cause Effect Classification",
        "Coreference Resolution",
        "Dialogue Act Recognition",
        "Answerability Classification",
        "Word Analogy",
    }
)
METRICS = ("exact_match", "rougeL")
UNCATEGORIZED = "Uncategorized"


class DataFormatError(ValueError):
    """A data file that does not have the expected shape; the message names file, record and field."""


@dataclass(frozen=True)
class Example:
    """A demonstration (a positive or negative example of an SNI task)."""

    input: str
    output: str
    explanation: str = ""


@dataclass(frozen=True)
class Instance:
    """One instance of a task: an input and one or more reference outputs."""

    id: str
    input: str
    references: tuple[str, ...]


@dataclass
class Task:
    """A Super-NaturalInstructions task.

    ``metric`` is the primary metric ("exact_match" or "rougeL"); both are always reported. When a
    file does not say (the ``Metric`` key is a flora extension), it follows the official
    evaluation: exact match for its classification categories, ROUGE-L otherwise.
    """

    name: str
    definition: str
    categories: list[str] = field(default_factory=list)
    positive_examples: list[Example] = field(default_factory=list)
    negative_examples: list[Example] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    metric: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @property
    def category(self) -> str:
        return self.categories[0] if self.categories else UNCATEGORIZED

    @property
    def primary_metric(self) -> str:
        if self.metric is not None:
            return self.metric
        return "exact_match" if self.category in EXACT_MATCH_CATEGORIES else "rougeL"

    def with_instances(self, instances: Sequence[Instance]) -> Task:
        """A copy of this task holding ``instances`` instead of its own."""
        return Task(
            name=self.name,
            definition=self.definition,
            categories=list(self.categories),
            positive_examples=list(self.positive_examples),
            negative_examples=list(self.negative_examples),
            instances=list(instances),
            metric=self.metric,
            extra=dict(self.extra),
            source=self.source,
        )

    def to_json(self) -> dict[str, Any]:
        """The task as an SNI JSON object (``Definition`` as a one-element list, as the official files)."""
        data: dict[str, Any] = dict(self.extra)
        data.update(
            {
                "Categories": list(self.categories),
                "Definition": [self.definition],
                "Positive Examples": [_example_json(e) for e in self.positive_examples],
                "Negative Examples": [_example_json(e) for e in self.negative_examples],
                "Instances": [{"id": i.id, "input": i.input, "output": list(i.references)} for i in self.instances],
            }
        )
        if self.metric is not None:
            data["Metric"] = self.metric
        return data


@dataclass(frozen=True)
class AlpacaRecord:
    """One Alpaca record (``input`` may be empty)."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class PromptCompletion:
    """One plain JSONL record: the prompt is used verbatim."""

    prompt: str
    completion: str


def _example_json(example: Example) -> dict[str, str]:
    return {"input": example.input, "output": example.output, "explanation": example.explanation}


# -- Super-NaturalInstructions ------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def _string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _field(record: Any, key: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataFormatError(f"{where}: missing field {key!r} (has {', '.join(map(repr, record)) or 'no fields'})")
    return record[key]


def _string_list(value: Any, where: str, name: str, allow_string: bool = False) -> list[str]:
    if allow_string and isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(
            f"{where}: field {name!r} must be a list of strings, got {type(value).__name__} {value!r:.60}"
        )
    return value


def _examples(data: dict, key: str, where: str) -> list[Example]:
    raw = data.get(key, [])
    if not isinstance(raw, list):
        raise DataFormatError(f"{where}: field {key!r} must be a list, got {type(raw).__name__}")
    examples = []
    for index, record in enumerate(raw):
        at = f"{where}: {key}[{index}]"
        examples.append(
            Example(
                input=_string(_field(record, "input", at), at, "input"),
                output=_string(_field(record, "output", at), at, "output"),
                explanation=_string(record.get("explanation", ""), at, "explanation"),
            )
        )
    return examples


def parse_sni_task(data: Any, name: str, source: str = "<memory>") -> Task:
    """A `Task` from an SNI JSON object; errors name ``source`` and the bad record and field."""
    if not isinstance(data, dict):
        raise DataFormatError(f"{source}: expected a JSON object (one Super-NaturalInstructions task), "
                              f"got {type(data).__name__}")  # fmt: skip
    definition = _string_list(_field(data, "Definition", source), source, "Definition", allow_string=True)
    if not definition:
        raise DataFormatError(f"{source}: field 'Definition' is empty (expected at least one string)")
    categories = _string_list(data.get("Categories", []), source, "Categories")
    raw_instances = _field(data, "Instances", source)
    if not isinstance(raw_instances, list):
        raise DataFormatError(f"{source}: field 'Instances' must be a list, got {type(raw_instances).__name__}")
    instances = []
    seen: set[str] = set()
    for index, record in enumerate(raw_instances):
        at = f"{source}: Instances[{index}]"
        instance_id = _field(record, "id", at)
        if not isinstance(instance_id, str | int) or isinstance(instance_id, bool):
            raise DataFormatError(f"{at}: field 'id' must be a string, got {type(instance_id).__name__}")
        instance_id = str(instance_id)
        at = f"{source}: Instances[{index}] (id {instance_id!r})"
        if instance_id in seen:
            raise DataFormatError(f"{at}: duplicate id {instance_id!r} (expected unique instance ids)")
        seen.add(instance_id)
        references = _string_list(_field(record, "output", at), at, "output")
        if not references:
            raise DataFormatError(f"{at}: field 'output' is an empty list (expected at least one reference)")
        instances.append(Instance(instance_id, _string(_field(record, "input", at), at, "input"), tuple(references)))
    metric = data.get("Metric")
    if metric is not None and metric not in METRICS:
        raise DataFormatError(f"{source}: field 'Metric' is {metric!r}, expected one of {', '.join(METRICS)}")
    known = {"Definition", "Categories", "Positive Examples", "Negative Examples", "Instances", "Metric"}
    return Task(
        name=name,
        definition=definition[0],
        categories=categories,
        positive_examples=_examples(data, "Positive Examples", source),
        negative_examples=_examples(data, "Negative Examples", source),
        instances=instances,
        metric=metric,
        extra={k: v for k, v in data.items() if k not in known},
        source=source,
    )


def load_sni_task(path: str | os.PathLike) -> Task:
    """One SNI task file; the task's name is the file name without ``.json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Super-NaturalInstructions task file {str(path)!r} does not exist")
    return parse_sni_task(_read_json(path), path.stem, str(path))


def read_task_names(path: str | os.PathLike) -> list[str]:
    """Task names from a split file: one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {str(path)!r} does not exist (expected one task name per line)")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name.removesuffix(".json"))
    return names


def load_sni(path: str | os.PathLike, tasks: str | os.PathLike | Iterable[str] | None = None) -> list[Task]:
    """SNI tasks from a file or a directory of ``*.json`` task files (sorted by name).

    Args:
        path: one task file, or a directory (its ``*.json`` files; a ``tasks/`` sub-directory
            is used when the directory itself has none, as in the official repository layout).
        tasks: only these tasks, in this order: a split file (one name per line) or names.
            A named task that is not there is an error.
    """
    path = Path(path)
    if path.is_file():
        found = {path.stem: path}
    elif path.is_dir():
        directory = path if any(path.glob("*.json")) or not (path / "tasks").is_dir() else path / "tasks"
        found = {p.stem: p for p in sorted(directory.glob("*.json"))}
        if not found:
            raise FileNotFoundError(f"{path}: no Super-NaturalInstructions task files (*.json)")
    else:
        raise FileNotFoundError(f"Super-NaturalInstructions data {str(path)!r} does not exist")
    if tasks is None:
        names = list(found)
    elif isinstance(tasks, str | os.PathLike):
        names = read_task_names(tasks)
    else:
        names = list(tasks)
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(
            f"{path}: no task file for {', '.join(map(repr, missing[:5]))}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''} named in the split "
            f"({len(found)} task files there)"
        )
    return [load_sni_task(found[n]) for n in names]


def write_sni_task(task: Task, path: str | os.PathLike) -> Path:
    """Write ``task`` as an SNI JSON file, atomically."""
    return write_text_atomic(path, json.dumps(task.to_json(), indent=1, ensure_ascii=False) + "\n")


# -- Alpaca and plain JSONL ---------------------------------------------------------------------


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` from a JSON list or a JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err})") from None
    if text.lstrip().startswith("["):
        data = _read_json(path)
        return [(f"{path}: record {index}", record) for index, record in enumerate(data)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}: line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
    return records


def load_alpaca(path: str | os.PathLike) -> list[AlpacaRecord]:
    """Alpaca records (``instruction``, optional ``input``, ``output``) from a JSON list or JSONL."""
    records = []
    for where, record in _read_records(Path(path)):
        records.append(
            AlpacaRecord(
                instruction=_string(_field(record, "instruction", where), where, "instruction"),
                input=_string(record.get("input", "") if isinstance(record, dict) else None, where, "input"),
                output=_string(_field(record, "output", where), where, "output"),
            )
        )
    return records


def load_prompt_completion(path: str | os.PathLike) -> list[PromptCompletion]:
    """Plain records (``prompt``, ``completion``) from JSONL (or a JSON list)."""
    return [
        PromptCompletion(
            prompt=_string(_field(record, "prompt", where), where, "prompt"),
            completion=_string(_field(record, "completion", where), where, "completion"),
        )
        for where, record in _read_records(Path(path))
    ]


def detect_format(path: str | os.PathLike) -> str:
    """``"sni"``, ``"alpaca"`` or ``"jsonl"`` (prompt/completion), from the path and its first record."""
    path = Path(path)
    if path.is_dir():
        return "sni"
    if not path.is_file():
        raise FileNotFoundError(f"data {str(path)!r} does not exist")
    records = _read_records(path) if not _looks_like_sni(path) else []
    if not records:
        return "sni"
    first = records[0][1]
    if isinstance(first, dict) and "instruction" in first:
        return "alpaca"
    if isinstance(first, dict) and "prompt" in first:
        return "jsonl"
    raise DataFormatError(
        f"{records[0][0]}: cannot tell the format (expected Alpaca fields 'instruction'/'input'/'output' "
        f"or 'prompt'/'completion')"
    )


def _looks_like_sni(path: Path) -> bool:
    head = path.read_text(encoding="utf-8", errors="replace")[:4096].lstrip()
    return head.startswith("{") and ('"Definition"' in head or '"Instances"' in head)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda staging: Path(staging).write_text(text, encoding="utf-8"))
    return path
