"""lm-evaluation-harness through `flora serve` against lm-eval with the adapter in transformers, on
the real model: the same scores?

`flora serve` (a subprocess) serves the base model with one PEFT adapter (by default the demo's
``reverse_words``: run ``make demo`` first); lm-eval's ``local-completions`` model asks it (remote
tokenizer: ``/tokenize``), and lm-eval's ``hf`` model loads the same base model with ``peft=`` that
adapter. Two local tasks from the built-in suite's held-out ``reverse_words`` instances, in
lm-eval's YAML format (nothing downloaded):

- ``reverse_mc``: multiple choice by log likelihood (the reversed words, the words as given, and
  another order): `echo` and `logprobs` over HTTP;
- ``reverse_gen``: greedy generation until a newline, exact match.

Written: both runs' scores, the largest difference between their per-choice log likelihoods, how
many generations are the same, and each run's seconds. Usage:

    python benchmarks/lm_eval_parity.py --json benchmarks/results/lm_eval_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from harness import write_json
from serve_servers import REPO, Server, ServerSpec

from flora.base import resolve_model_dir
from flora.data import Template, build_suite, samples_from_tasks


def write_tasks(directory: Path, instances: int) -> list[str]:
    """The two tasks (see the module docstring) under ``directory``; their names."""
    task = build_suite(seed=0, n_train=0, n_heldout=instances, tasks=["reverse_words"]).heldout[0]
    template, rng = Template("sni"), random.Random(0)
    rows = []
    for sample in samples_from_tasks([task]):
        words = sample.input.split()
        shuffled = words[:]
        while shuffled in (words, words[::-1]) and len(words) > 2:
            rng.shuffle(shuffled)
        choices = [" ".join(words[::-1]), sample.input, " ".join(shuffled)]
        rows.append({"prompt": template.render(sample), "target": sample.references[0], "choices": choices})
    (directory / "reverse.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'reverse.jsonl'}\n"
    common += 'test_split: test\ndoc_to_text: "{{prompt}}"\n'
    (directory / "reverse_mc.yaml").write_text(
        "task: reverse_mc\n" + common + 'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n"
    )
    (directory / "reverse_gen.yaml").write_text(
        "task: reverse_gen\n" + common + 'output_type: generate_until\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 32\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return ["reverse_mc", "reverse_gen"]


def evaluate(model: str, model_args: dict, tasks: list[str], include: Path) -> tuple[dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    result = simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=1, log_samples=True,
                             task_manager=TaskManager(include_path=str(include)), bootstrap_iters=0)  # fmt: skip
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", type=Path, default=REPO / "runs" / "demo" / "reverse_words")
    parser.add_argument("--instances", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.adapter / "adapter_config.json").is_file():
        raise SystemExit(f"--adapter {args.adapter}: not a PEFT adapter directory (run `make demo` first)")
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    base_dir = resolve_model_dir(args.model)
    name = args.adapter.name
    with tempfile.TemporaryDirectory() as scratch:
        tasks = write_tasks(Path(scratch), args.instances)
        command = (sys.executable, "-m", "flora", "serve", "--model", args.model, "--adapter", f"{name}={args.adapter}",
                   "--host", "127.0.0.1", "--port", "{port}")  # fmt: skip
        with Server(ServerSpec("flora", command), REPO / "runs" / "lm_eval_parity.log") as url:
            client = {"base_url": f"{url}/v1/completions", "model": name, "tokenizer_backend": "remote",
                      "max_retries": 1, "max_length": 2048}  # fmt: skip
            served, served_s = evaluate("local-completions", client, tasks, Path(scratch))
        hf = {"pretrained": str(base_dir), "peft": str(args.adapter), "dtype": "float32", "device": "cpu"}
        local, local_s = evaluate("hf", hf, tasks, Path(scratch))
    scores = {}
    for task, metric in (("reverse_mc", "acc,none"), ("reverse_gen", "exact_match,none")):
        scores[task] = {"flora serve": served["results"][task][metric], "hf + peft": local["results"][task][metric]}
    pairs = zip(served["samples"]["reverse_mc"], local["samples"]["reverse_mc"], strict=True)
    choices = [{"doc": x["doc_id"], "choice": i, "flora serve": a[0][0], "hf + peft": b[0][0],
                "difference": abs(a[0][0] - b[0][0])}
               for x, y in pairs for i, (a, b) in enumerate(zip(x["resps"], y["resps"], strict=True))]  # fmt: skip
    differences = sorted(c["difference"] for c in choices)
    generations = [[s["resps"][0][0] for s in r["samples"]["reverse_gen"]] for r in (served, local)]
    result = {
        "benchmark": "lm_eval_parity", "model": args.model, "adapter": name, "instances": args.instances,
        "platform": platform.platform(), "scores": scores,
        "max_abs_loglikelihood_difference": differences[-1],
        "median_abs_loglikelihood_difference": differences[len(differences) // 2],
        "choices_within_1e-4": sum(d <= 1e-4 for d in differences), "choices": len(differences),
        "largest_differences": sorted(choices, key=lambda c: -c["difference"])[:5],
        "same_generations": sum(a == b for a, b in zip(*generations, strict=True)), "generations": len(generations[0]),
        "seconds": {"flora serve": round(served_s, 1), "hf + peft": round(local_s, 1)},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
