"""A real client: lm-evaluation-harness's ``local-completions`` model against `flora serve` serving a
PEFT adapter scores the same as lm-eval's ``hf`` model with ``peft=`` that adapter, on local task
files (a multiple-choice task scored by log likelihood, through ``echo`` and ``logprobs``, and a
generation task with a stop sequence). Nothing is downloaded."""

from __future__ import annotations

import json

import pytest
from data.tiny import tiny_llama

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("Which word is a colour?", ["red", "dog", "seven"], 0),
    ("Which is a number?", ["apple", "twelve", "blue"], 1),
    ("Which is an animal?", ["green", "four", "cat"], 2),
    ("Which word is a fruit?", ["pear", "run", "fast"], 0),
    ("Which is a verb?", ["table", "jump", "small"], 1),
    ("Which is a day?", ["sock", "river", "monday"], 2),
]
WORDS = ["red green blue", "pear apple fig", "one two three", "sun moon star", "cat dog", "up down"]


def write_tasks(directory) -> list[str]:
    """Two lm-eval tasks in lm-eval's YAML format over local JSON lines files; their names."""
    (directory / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                                for q, c, a in QUESTIONS))  # fmt: skip
    (directory / "gen.jsonl").write_text("".join(json.dumps({"text": w, "target": w.split()[0]}) + "\n" for w in WORDS))
    (directory / "flora_mc.yaml").write_text(f"""task: flora_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (directory / "flora_gen.yaml").write_text(f"""task: flora_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "First word of: {{{{text}}}}\\nAnswer:"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", "e"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return ["flora_mc", "flora_gen"]


def _evaluate(model: str, model_args: dict, tasks: list[str], include: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include)
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, batch_size=1,
                           log_samples=True, bootstrap_iters=0)  # fmt: skip


def test_lm_eval_through_the_server_scores_as_lm_eval_with_the_adapter_in_transformers(
    server, tokenizer, adapter_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer).save_pretrained(model_dir)  # the server's base model: the same seed, the same weights
    tokenizer.save_pretrained(model_dir)
    tasks = write_tasks(tmp_path)
    client = {"base_url": f"{server.url}/v1/completions", "model": "lora4", "tokenizer_backend": "remote",
              "max_retries": 1}  # fmt: skip
    served = _evaluate("local-completions", client, tasks, str(tmp_path))
    hf = {"pretrained": str(model_dir), "peft": str(adapter_dir / "lora4"), "dtype": "float64", "device": "cpu"}
    local = _evaluate("hf", hf, tasks, str(tmp_path))
    for task, metric in (("flora_mc", "acc,none"), ("flora_gen", "exact_match,none")):
        assert served["results"][task][metric] == local["results"][task][metric], task
    mc = [s["resps"] for s in served["samples"]["flora_mc"]], [s["resps"] for s in local["samples"]["flora_mc"]]
    for ours, theirs in zip(*mc, strict=True):
        for (value, greedy), (reference, reference_greedy) in zip(
            [r[0] for r in ours], [r[0] for r in theirs], strict=True
        ):
            assert abs(value - reference) < 1e-6 and greedy == reference_greedy
    generated = [[s["resps"] for s in result["samples"]["flora_gen"]] for result in (served, local)]
    assert generated[0] == generated[1]
