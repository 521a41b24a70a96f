"""`flora.evaluate` and `flora eval`: per-row routing, per-row decoding, files a reader can re-score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data.tiny import tiny_llama, tiny_tokenizer
from rouge_score import rouge_scorer

from flora import AdapterModel, LoraConfig
from flora.cli import main
from flora.data import Template, build_suite, encode_prompt, samples_from_tasks
from flora.evaluate import RowStop, evaluate, generate_texts, resolve_routes

FIXTURES = Path(__file__).parent / "data" / "fixtures"
TASKS = ["add_numbers", "reverse_words", "rot13", "atbash", "larger_number"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def samples():
    suite = build_suite(seed=0, n_train=0, n_heldout=3, tasks=TASKS)
    return samples_from_tasks(suite.heldout)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tokenizer):
    """Two random LoRA adapters (different layers) saved in PEFT format."""
    model = AdapterModel(tiny_llama(tokenizer), tokenizer)
    dirs = {}
    for seed, (name, targets) in enumerate([("a", ["q_proj", "v_proj"]), ("b", ["o_proj", "down_proj"])]):
        model.add_adapter(name, LoraConfig(r=2, alpha=4, target_modules=targets))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.adapter_parameters(name).values():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        dirs[name] = model.save_adapter(name, tmp_path_factory.mktemp("adapters") / name)
    return dirs


def fresh_model(tokenizer, adapter_dirs=None) -> AdapterModel:
    model = AdapterModel(tiny_llama(tokenizer), tokenizer)
    for name, path in (adapter_dirs or {}).items():
        model.load_adapter(path, adapter_name=name)
    return model


# -- routing ------------------------------------------------------------------------------------


def test_routes_by_task_then_category_then_default(samples):
    names = resolve_routes(samples, {"rot13": "b", "Ciphers": "a", "*": "c"}, available=["a", "b", "c"])
    by_task = {s.task: n for s, n in zip(samples, names, strict=True)}
    assert by_task == {"add_numbers": "c", "reverse_words": "c", "rot13": "b", "atbash": "a", "larger_number": "c"}
    names = resolve_routes(samples, {"Ciphers": "a", "atbash": "none"}, adapter=None)
    assert {s.task: n for s, n in zip(samples, names, strict=True)}["atbash"] is None
    assert resolve_routes(samples, None, adapter="a") == ["a"] * len(samples)
    with pytest.raises(KeyError, match="route key\\(s\\) 'Cipher' name no task or category"):
        resolve_routes(samples, {"Cipher": "a"})
    with pytest.raises(KeyError, match="adapter\\(s\\) 'z' are routed to but not loaded"):
        resolve_routes(samples, {"rot13": "z"}, available=["a"])


# -- decoding -----------------------------------------------------------------------------------


def greedy_alone(model, tokenizer, ids, adapter, budget, stop_at_newline) -> str:
    """Reference: one row, no batch, no padding, no cache, a plain greedy loop."""
    ids = list(ids)
    new: list[int] = []
    for _ in range(budget):
        with torch.no_grad():
            logits = model(torch.tensor([ids + new]), adapter_names=[adapter]).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    text = tokenizer.decode(new, skip_special_tokens=True)
    return (text.split("\n", 1)[0] if stop_at_newline else text).strip()


def test_batched_generation_equals_each_row_alone(tokenizer, samples, adapter_dirs):
    model = fresh_model(tokenizer, adapter_dirs)
    prompts = [encode_prompt(tokenizer, Template().render(s)) for s in samples]
    adapters = ["a", None, "b"] * (len(samples) // 3)
    budgets = [3 + i % 5 for i in range(len(samples))]
    newline = [i % 2 == 0 for i in range(len(samples))]
    batched = generate_texts(model, tokenizer, prompts, adapters, budgets, newline, batch_size=4, progress=False)
    for i in range(len(samples)):
        assert batched[i] == greedy_alone(model, tokenizer, prompts[i], adapters[i], budgets[i], newline[i]), i


class ScriptedModel:
    """Stands in for a model: every row 'generates' the same scripted text, up to max_new_tokens."""

    def __init__(self, tokenizer, text: str):
        self.script = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * 3
        self.device = torch.device("cpu")

    def generate(self, input_ids, max_new_tokens, **kwargs):
        new = torch.tensor(self.script[:max_new_tokens]).repeat(input_ids.shape[0], 1)
        return torch.cat([input_ids, new], dim=1)


def test_rows_stop_at_eos_newline_and_budget(tokenizer):
    model = ScriptedModel(tokenizer, "abc def\nghi")
    prompts = [[5, 6], [7], [8, 9, 10]]
    long = len(model.script)
    out = generate_texts(model, tokenizer, prompts, None, [long, long, 1], [True, False, False], progress=False)
    first_token = tokenizer.decode(model.script[:1]).strip()
    assert out == ["abc def", "abc def\nghi", first_token]


def test_row_stop_criterion_is_per_row(tokenizer):
    newline = torch.zeros(len(tokenizer), dtype=torch.bool)
    newline[7] = True
    stop = RowStop(prompt_width=2, budgets=[3, 1, 5], at_newline=[True, False, False], newline=newline)
    ids = torch.tensor([[1, 1, 7], [1, 1, 7], [1, 1, 4]])
    assert stop(ids, None).tolist() == [True, True, False]  # newline row 0; budget row 1; row 2 goes on


# -- routing in one mixed batch -----------------------------------------------------------------


def test_mixed_routing_equals_each_task_alone_with_its_adapter(tokenizer, samples, adapter_dirs):
    model = fresh_model(tokenizer)
    routes = {"add_numbers": "a", "Ciphers": "b", "rot13": "a"}
    mixed = evaluate(model, samples, tokenizer, adapters=adapter_dirs, routes=routes, batch_size=16, progress=False)
    assert {r.adapter for r in mixed.rows} == {"a", "b", None}  # one batch holds all three
    by_row = {(r.task, r.id): r for r in mixed.rows}
    for task in TASKS:
        alone_samples = [s for s in samples if s.task == task]
        adapter = by_row[(task, alone_samples[0].id)].adapter
        alone = evaluate(model, alone_samples, tokenizer, adapter=adapter, batch_size=2, progress=False)
        for row in alone.rows:
            assert row.prediction == by_row[(row.task, row.id)].prediction, (task, row.id)
            assert row.adapter == adapter
    base = evaluate(model, samples, tokenizer, batch_size=16, progress=False)
    changed = [r.prediction != b.prediction for r, b in zip(mixed.rows, base.rows, strict=True) if r.adapter]
    assert any(changed)  # the adapters do change predictions: the comparison above means something
    assert mixed.scores["adapters"].keys() == {"a", "b", "__base__"}
    assert mixed.scores["tasks"]["atbash"]["adapter"] == "b" and mixed.scores["tasks"]["rot13"]["adapter"] == "a"


def test_result_structure(tokenizer, samples):
    result = evaluate(fresh_model(tokenizer), samples, tokenizer, seen_tasks=["add_numbers", "rot13"], progress=False)
    scores = result.scores
    assert scores["overall"]["n"] == len(samples)
    assert scores["seen"]["tasks"] == 2 and scores["unseen"]["tasks"] == 3
    assert scores["seen"]["n"] + scores["unseen"]["n"] == len(samples)
    assert set(scores["categories"]) == {s.category for s in samples}
    task = scores["tasks"]["add_numbers"]
    assert task["metric"] == "exact_match" and task["seen"] is True and task["n"] == 3
    assert task["max_new_tokens"] == max(len(tokenizer(s.references[0])["input_ids"]) for s in samples
                                         if s.task == "add_numbers") + 8  # fmt: skip
    assert task["stop_at_newline"] is True
    assert result.settings["template"]["format"].startswith("Definition: {definition}")


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_cli_eval_on_handmade_sni_files_and_rescoring_predictions(model_dir, tmp_path, capsys):
    scores_path, predictions_path = tmp_path / "scores.json", tmp_path / "predictions.jsonl"
    rc = main(["eval", "--model", str(model_dir), "--data", str(FIXTURES / "sni"),
               "--split", str(FIXTURES / "sni" / "splits"), "--json", str(scores_path),
               "--predictions", str(predictions_path), "--no-progress", "--batch-size", "4"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "overall" in out and "time:" in out
    result = json.loads(scores_path.read_text())
    rows = [json.loads(line) for line in predictions_path.read_text().splitlines()]
    assert len(rows) == 5 + 4 + 6 == result["scores"]["overall"]["n"]
    for row in rows:
        assert {"task", "id", "adapter", "prompt", "prediction", "references"} <= row.keys()
    assert result["scores"]["seen"]["tasks"] == 2 and result["scores"]["unseen"]["tasks"] == 1
    assert result["scores"]["tasks"]["task901_antonyms"]["metric"] == "exact_match"
    assert result["settings"]["template"]["name"] == "sni" and result["settings"]["model"] == str(model_dir)
    # A reader re-scores the predictions file with rouge_score itself and gets the same numbers.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [max(scorer.score(ref, row["prediction"])["rougeL"].fmeasure for ref in row["references"]) for row in rows]
    assert result["scores"]["overall"]["rougeL"] == pytest.approx(100 * sum(rouge) / len(rows), abs=1e-4)
    title = [r for row, r in zip(rows, rouge, strict=True) if row["task"] == "task902_title_generation"]
    assert result["scores"]["tasks"]["task902_title_generation"]["rougeL"] == pytest.approx(
        100 * sum(title) / len(title), abs=1e-4
    )
    assert rows[0]["prompt"].startswith("Definition: ") and rows[0]["prompt"].endswith("\nOutput: ")


def test_cli_eval_on_exported_suite_with_adapters_routed(model_dir, tmp_path, capsys):
    export = tmp_path / "suite"
    assert main(["tasks", "export", str(export), "--train", "2", "--heldout", "3",
                 "--tasks", "add_numbers,rot13,larger_number"]) == 0  # fmt: skip
    assert sorted(p.name for p in (export / "heldout").iterdir()) == [
        "add_numbers.json", "larger_number.json", "rot13.json"
    ]  # fmt: skip
    assert (export / "splits" / "default" / "test_tasks.txt").read_text() == "larger_number\n"
    # Adapters for this model (saved by flora in PEFT format).
    model = AdapterModel.from_pretrained(model_dir)
    model.add_adapter("x", LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_adapter("x", tmp_path / "x")
    scores_path = tmp_path / "scores.json"
    rc = main(["eval", "--model", str(model_dir), "--data", str(export), "--adapter", f"x={tmp_path / 'x'}",
               "--route", "Arithmetic=x", "--json", str(scores_path), "--no-progress"])  # fmt: skip
    assert rc == 0
    result = json.loads(scores_path.read_text())
    assert result["scores"]["tasks"]["add_numbers"]["adapter"] == "x"
    assert result["scores"]["tasks"]["rot13"]["adapter"] is None
    assert result["scores"]["seen"]["tasks"] == 2 and result["scores"]["unseen"]["tasks"] == 1
    assert result["settings"]["routes"] == {"Arithmetic": "x"}


def test_cli_eval_alpaca_and_errors(model_dir, capsys):
    assert main(["eval", "--model", str(model_dir), "--data", str(FIXTURES / "alpaca.json"), "--no-progress"]) == 0
    assert "n 3" in capsys.readouterr().out
    rc = main(["eval", "--model", str(model_dir), "--tasks", "add_numbers", "--route", "add_numbers=nope"])
    assert rc == 2 and "no --adapter named 'nope'" in capsys.readouterr().err
    rc = main(["eval", "--model", str(model_dir), "--data", str(FIXTURES / "missing")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["eval", "--model", str(model_dir), "--tasks", "nope"])
    assert rc == 2 and "unknown suite task or category 'nope'" in capsys.readouterr().err


def test_cli_eval_of_seen_tasks_only_writes_and_prints_without_unseen_scores(model_dir, tmp_path, capsys):
    scores_path = tmp_path / "scores.json"
    rc = main(["eval", "--model", str(model_dir), "--tasks", "add_numbers", "--max-instances", "2", "--no-progress",
               "--json", str(scores_path)])  # fmt: skip
    assert rc == 0
    scores = json.loads(scores_path.read_text())["scores"]
    assert scores["seen"]["n"] == 2 and scores["unseen"] == {"exact_match": None, "rougeL": None, "n": 0, "tasks": 0}
    out = capsys.readouterr().out
    assert "seen " in out and "unseen" not in out


def test_cli_tasks_list_and_show(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert "pig_latin" in out and "test (unseen)" in out
    assert main(["tasks", "show", "rot13", "--instances", "2"]) == 0
    assert "Definition: Encode the text with ROT13" in capsys.readouterr().out
    assert main(["tasks", "show", "rot13", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["Categories"] == ["Ciphers"]
    assert main(["tasks", "show", "nope"]) == 2


# -- the real model -----------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_eval_runs_and_records_everything(tmp_path, capsys):
    scores_path, predictions_path = tmp_path / "scores.json", tmp_path / "predictions.jsonl"
    rc = main(["eval", "--model", "smollm2-135m", "--tasks", "add_numbers,even_or_odd,compare_numbers",
               "--max-instances", "4", "--json", str(scores_path), "--predictions", str(predictions_path),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    result = json.loads(scores_path.read_text())
    assert result["scores"]["overall"]["n"] == 12
    assert result["scores"]["unseen"]["tasks"] == 1 and result["scores"]["seen"]["tasks"] == 2
    assert result["settings"]["bos_token_added"] is False  # SmolLM2's tokenizer adds no BOS
    rows = [json.loads(line) for line in predictions_path.read_text().splitlines()]
    assert all("\n" not in row["prediction"] for row in rows)


@pytest.mark.real_model
def test_real_model_mixed_routing_equals_each_task_alone(tmp_path):
    model = AdapterModel.from_pretrained("smollm2-135m")
    tokenizer = model.tokenizer
    for seed, name in enumerate(["a", "b"]):
        model.add_adapter(name, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.adapter_parameters(name).values():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    suite = build_suite(seed=0, n_train=0, n_heldout=4, tasks=["add_numbers", "reverse_words", "even_or_odd"])
    samples = samples_from_tasks(suite.heldout)
    routes = {"add_numbers": "a", "reverse_words": "b"}
    mixed = evaluate(model, samples, tokenizer, routes=routes, batch_size=12, progress=False)
    by_row = {r.id: r for r in mixed.rows}
    for task, adapter in [("add_numbers", "a"), ("reverse_words", "b"), ("even_or_odd", None)]:
        alone = evaluate(model, [s for s in samples if s.task == task], tokenizer, adapter=adapter, progress=False)
        assert [r.prediction for r in alone.rows] == [by_row[r.id].prediction for r in alone.rows], task
