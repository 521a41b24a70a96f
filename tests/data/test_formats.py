"""Loaders read good files exactly and reject broken ones naming the file, the record and the field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flora.data import (
    DataFormatError,
    detect_format,
    load_alpaca,
    load_prompt_completion,
    load_sni,
    load_sni_task,
    read_task_names,
    write_sni_task,
)

FIXTURES = Path(__file__).parent / "fixtures"
SNI = FIXTURES / "sni"


def test_sni_task_file_is_read_field_by_field():
    task = load_sni_task(SNI / "task901_antonyms.json")
    assert task.name == "task901_antonyms"
    assert task.definition.startswith("Given an adjective, generate its antonym.")
    assert task.categories == ["Word Analogy"] and task.category == "Word Analogy"
    assert task.primary_metric == "exact_match"  # an official exact-match category
    assert [(e.input, e.output) for e in task.positive_examples] == [("hot", "cold"), ("tall", "short")]
    assert task.positive_examples[0].explanation == "Hot and cold are opposite temperatures."
    assert task.negative_examples[0].output == "glad"
    assert [i.id for i in task.instances] == [f"task901-{n}" for n in range(1, 6)]
    assert task.instances[1].input == "big" and task.instances[1].references == ("small", "little")
    assert task.extra["Domains"] == ["Dictionaries"]
    assert load_sni_task(SNI / "task902_title_generation.json").primary_metric == "rougeL"


def test_sni_directory_and_split_files(tmp_path):
    assert [t.name for t in load_sni(SNI)] == ["task901_antonyms", "task902_title_generation", "task903_sentiment"]
    assert read_task_names(SNI / "splits" / "test_tasks.txt") == ["task902_title_generation"]
    assert [t.name for t in load_sni(SNI, SNI / "splits" / "train_tasks.txt")] == [
        "task901_antonyms",
        "task903_sentiment",
    ]
    assert [t.name for t in load_sni(SNI, ["task903_sentiment"])] == ["task903_sentiment"]
    assert len(load_sni(SNI / "task903_sentiment.json")) == 1
    # The official layout: a directory holding tasks/ and splits/.
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task903_sentiment.json").write_text((SNI / "task903_sentiment.json").read_text())
    assert [t.name for t in load_sni(tmp_path)] == ["task903_sentiment"]


def test_sni_round_trip(tmp_path):
    task = load_sni_task(SNI / "task902_title_generation.json")
    written = write_sni_task(task, tmp_path / "task902_title_generation.json")
    again = load_sni_task(written)
    assert again.to_json() == task.to_json()
    assert [p.name for p in tmp_path.iterdir()] == ["task902_title_generation.json"]  # no staging file left
    umask = os.umask(0)
    os.umask(umask)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's mode, not the staging file's 0o600


def _task_json(**changes):
    data = json.loads((SNI / "task903_sentiment.json").read_text())
    data.update(changes)
    return data


def _write(tmp_path, data, name="task999_broken.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("Definition"), r"task999_broken\.json: missing field 'Definition'"),
        (lambda d: d.pop("Instances"), r"task999_broken\.json: missing field 'Instances'"),
        (lambda d: d.update(Definition=[]), r"field 'Definition' is empty"),
        (lambda d: d.update(Definition=3), r"field 'Definition' must be a list of strings, got int"),
        (lambda d: d.update(Categories="Sentiment"), r"field 'Categories' must be a list of strings, got str"),
        (lambda d: d["Instances"][2].pop("id"), r"Instances\[2\]: missing field 'id'"),
        (lambda d: d["Instances"][1].pop("input"), r"Instances\[1\] \(id 'task903-2'\): missing field 'input'"),
        (
            lambda d: d["Instances"][3].update(output="negative"),
            r"Instances\[3\] \(id 'task903-4'\): field 'output' must be a list of strings, got str",
        ),
        (
            lambda d: d["Instances"][0].update(output=[]),
            r"Instances\[0\] \(id 'task903-1'\): field 'output' is an empty list",
        ),
        (lambda d: d["Instances"][4].update(id="task903-1"), r"Instances\[4\] \(id 'task903-1'\): duplicate id"),
        (
            lambda d: d["Positive Examples"][1].pop("output"),
            r"task999_broken\.json: Positive Examples\[1\]: missing field 'output'",
        ),
        (lambda d: d.update({"Negative Examples": {}}), r"field 'Negative Examples' must be a list, got dict"),
        (lambda d: d.update(Metric="bleu"), r"field 'Metric' is 'bleu', expected one of exact_match, rougeL"),
    ],
)
def test_broken_sni_files_name_file_record_and_field(tmp_path, change, message):
    data = _task_json()
    change(data)
    with pytest.raises(DataFormatError, match=message):
        load_sni_task(_write(tmp_path, data))


def test_sni_invalid_json_and_missing_files(tmp_path):
    with pytest.raises(DataFormatError, match=r"task999_broken\.json: not valid JSON .* line 2"):
        load_sni_task(_write(tmp_path, '{"Definition": ["x"],\n "Instances": [}'))
    with pytest.raises(DataFormatError, match=r"expected a JSON object .* got list"):
        load_sni_task(_write(tmp_path, "[]"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sni(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"no task file for 'task000_missing'"):
        load_sni(SNI, ["task901_antonyms", "task000_missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no Super-NaturalInstructions task files"):
        load_sni(empty)


def test_alpaca_json_and_jsonl():
    records = load_alpaca(FIXTURES / "alpaca.json")
    assert [(r.instruction, r.input, r.output) for r in records] == [
        ("Give the capital of the country.", "France", "Paris"),
        ("Name a primary color.", "", "Red"),
        ("Translate to French.", "cat", "chat"),
    ]
    records = load_alpaca(FIXTURES / "alpaca.jsonl")
    assert [(r.input, r.output) for r in records] == [("Italy", "Rome"), ("", "Mars")]  # input is optional


def test_prompt_completion_jsonl():
    records = load_prompt_completion(FIXTURES / "plain.jsonl")  # a blank line is skipped
    assert [(r.prompt, r.completion) for r in records] == [("2 + 2 =", " 4"), ("The opposite of up is", " down")]


@pytest.mark.parametrize(
    ("loader", "text", "message"),
    [
        (load_alpaca, '{"instruction": "a", "output": "b"}\n{"input": "c", "output": "d"}\n',
         r"data\.jsonl: line 2: missing field 'instruction'"),
        (load_alpaca, '{"instruction": "a", "output": 7}\n', r"data\.jsonl: line 1: field 'output' must be a string"),
        (load_alpaca, '{"instruction": "a", "output": "b"}\n{"instruction": \n',
         r"data\.jsonl: line 2: not valid JSON"),
        (load_alpaca, '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
         r"data\.jsonl: record 1: missing field 'output'"),
        (load_alpaca, '["just a string"]', r"data\.jsonl: record 0: expected a JSON object, got str"),
        (load_prompt_completion, '{"prompt": "a"}\n', r"data\.jsonl: line 1: missing field 'completion'"),
        (load_prompt_completion, '{"prompt": ["a"], "completion": "b"}\n', r"line 1: field 'prompt' must be a string"),
    ],
)  # fmt: skip
def test_broken_alpaca_and_jsonl(tmp_path, loader, text, message):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=message):
        loader(path)


def test_detect_format(tmp_path):
    assert detect_format(SNI) == "sni"
    assert detect_format(SNI / "task901_antonyms.json") == "sni"
    assert detect_format(FIXTURES / "alpaca.json") == "alpaca"
    assert detect_format(FIXTURES / "alpaca.jsonl") == "alpaca"
    assert detect_format(FIXTURES / "plain.jsonl") == "jsonl"
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "a"}\n')
    with pytest.raises(DataFormatError, match=r"odd\.jsonl: line 1: cannot tell the format"):
        detect_format(odd)
