"""``flora eval`` evaluates a model (``smollm2-135m``, a local directory or a Hugging Face id), with any
number of adapters routed per task or category, on the built-in suite's held-out instances or
on Super-NaturalInstructions / Alpaca / prompt-completion files; it prints a summary and the
time, and writes ``--json`` (scores and settings) and ``--predictions`` (JSONL).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flora.cli.options import MODEL_HELP, parse_adapters, parse_pairs, split_names
from flora.data import suite as suite_module
from flora.data.formats import detect_format, load_alpaca, load_prompt_completion, load_sni, read_task_names
from flora.data.templates import (
    TEMPLATE_NAMES,
    Sample,
    Template,
    samples_from_alpaca,
    samples_from_prompt_completion,
    samples_from_tasks,
)

DEFAULT_EVAL_INSTANCES = 20


def add_parser(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval", description="Greedy batched generation; each row uses the adapter routed to its task."
    )
    ev.add_argument("--model", required=True, help=MODEL_HELP)
    ev.add_argument("--data", default="suite",
                    help="'suite' (built-in, held-out instances), an SNI task file or directory, a directory "
                         "written by `flora tasks export`, or an Alpaca / prompt-completion JSON(L) file")  # fmt: skip
    ev.add_argument("--format", choices=("auto", "sni", "alpaca", "jsonl"), default="auto", help="format of --data")
    ev.add_argument("--split", help="split directory with train_tasks.txt / test_tasks.txt (seen / unseen tasks), "
                                    "or one split file: evaluate only the tasks it names")  # fmt: skip
    ev.add_argument("--tasks", help="comma-separated task names (or suite categories) to evaluate (default: all)")
    ev.add_argument("--suite-seed", type=int, default=0, help="seed of the built-in suite")
    ev.add_argument("--max-instances", type=int, default=DEFAULT_EVAL_INSTANCES,
                    help="instances per task (0: all)")  # fmt: skip
    ev.add_argument("--template", choices=TEMPLATE_NAMES, help="default: sni (alpaca / plain for those formats)")
    ev.add_argument("--pos-examples", type=int, default=0, help="positive examples in the SNI prompt (k-shot)")
    ev.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    ev.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="a PEFT adapter directory or Hugging Face id (repeatable); one alone, no --route: all "
                         "rows")  # fmt: skip
    ev.add_argument("--route", action="append", default=[], metavar="TASK_OR_CATEGORY=NAME",
                    help="rows of this task or category use adapter NAME ('*' = the rest; NAME 'none' = base "
                         "model); rows no route names use the base model")  # fmt: skip
    ev.add_argument("--batch-size", type=int, default=16, help="rows per generation batch")
    ev.add_argument("--max-new-tokens", type=int, help="fixed budget (default: per task, longest reference + margin)")
    ev.add_argument("--new-token-margin", type=int, default=8, help="new tokens beyond a task's longest reference")
    ev.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="model dtype")
    ev.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...)")
    ev.add_argument("--strategy", default="auto", help="per-row adapter strategy of flora.AdapterModel")
    ev.add_argument("--json", dest="json_path", metavar="PATH", help="write scores and settings as JSON")
    ev.add_argument("--predictions", metavar="PATH", help="write every prediction as JSONL")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=run)


def _split_dir(path: Path) -> tuple[list[str] | None, list[str] | None]:
    train = path / "train_tasks.txt"
    test = path / "test_tasks.txt"
    if not train.is_file() and not test.is_file():
        raise FileNotFoundError(f"split directory {str(path)!r} has neither train_tasks.txt nor test_tasks.txt")
    return (read_task_names(train) if train.is_file() else None, read_task_names(test) if test.is_file() else None)


def load_eval_samples(args) -> tuple[list[Sample], list[str] | None, dict[str, Any], str]:
    """``(samples, seen tasks or None, data settings, default template name)`` for ``flora eval``."""
    limit = args.max_instances if args.max_instances and args.max_instances > 0 else None
    wanted = split_names(args.tasks)
    if args.data == "suite":
        suite = suite_module.build_suite(args.suite_seed, n_train=0, n_heldout=limit or 100, tasks=wanted)
        samples = samples_from_tasks(suite.heldout, limit)
        info = {"data": "built-in suite (held-out instances)", "suite_seed": args.suite_seed}
        return samples, suite.train_tasks, info, "sni"
    path = Path(args.data)
    split: Path | None = Path(args.split) if args.split else None
    if path.is_dir() and (path / "suite.json").is_file() and (path / "heldout").is_dir():
        split = split or path / "splits" / "default"
        path = path / "heldout"
    fmt = detect_format(path) if args.format == "auto" else args.format
    info: dict[str, Any] = {"data": str(Path(args.data)), "format": fmt}
    if fmt != "sni":
        if split is not None:
            raise ValueError(f"--split applies to Super-NaturalInstructions data, not {fmt!r}")
        if fmt == "alpaca":
            samples = samples_from_alpaca(load_alpaca(path), Path(path).stem)
        else:
            samples = samples_from_prompt_completion(load_prompt_completion(path), Path(path).stem)
        if wanted:
            raise ValueError(f"--tasks applies to Super-NaturalInstructions data, not {fmt!r}")
        return samples[:limit] if limit else samples, None, info, "alpaca" if fmt == "alpaca" else "plain"
    seen: list[str] | None = None
    names: list[str] | None = None
    if split is not None:
        info["split"] = str(split)
        if split.is_dir():
            train, test = _split_dir(split)
            seen = train
            names = [*(train or []), *(test or [])]
        else:
            names = read_task_names(split)
    if wanted:
        missing = [n for n in wanted if names is not None and n not in names]
        if missing:
            raise KeyError(f"--tasks {', '.join(map(repr, missing))}: not in the split {str(split)!r}")
        names = wanted
    tasks = load_sni(path, names)
    return samples_from_tasks(tasks, limit), seen, info, "sni"


def run(args) -> int:
    started = time.perf_counter()
    adapters = parse_adapters(args.adapter)
    routes = parse_pairs(args.route, "--route")
    for key, name in routes.items():
        if name not in adapters and name.lower() not in ("none", "__base__", "base"):
            given = ", ".join(adapters) or "none"
            raise KeyError(f"--route {key}={name}: no --adapter named {name!r} (given: {given})")
    if len(adapters) > 1 and not routes:
        raise ValueError(
            f"{len(adapters)} adapters given but no --route: say which tasks or categories use which "
            f"(--route TASK_OR_CATEGORY=NAME, '*' for the rest)"
        )
    default = next(iter(adapters)) if len(adapters) == 1 and not routes else None
    samples, seen, data_info, default_template = load_eval_samples(args)
    if not samples:
        raise ValueError(f"no instances to evaluate in {args.data!r}")
    if args.pos_examples < 0:
        raise ValueError(f"--pos-examples {args.pos_examples}: expected a number >= 0")
    template = Template(args.template or default_template, args.pos_examples, args.chat)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected a number >= 1")

    import torch

    from flora import AdapterModel
    from flora.evaluate import evaluate

    dtype = getattr(torch, args.dtype)
    model = AdapterModel.from_pretrained(args.model, dtype=dtype, device=args.device, strategy=args.strategy)
    loaded = time.perf_counter()
    result = evaluate(
        model, samples, model.tokenizer,
        template=template, adapters=adapters, routes=routes or None, adapter=default, seen_tasks=seen,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, new_token_margin=args.new_token_margin,
        progress=not args.no_progress,
        settings={"model": args.model, "dtype": args.dtype, "max_instances_per_task": args.max_instances,
                  "strategy": args.strategy, **data_info},
    )  # fmt: skip
    total = time.perf_counter() - started
    result.settings["model_load_s"] = round(loaded - started, 3)
    result.settings["total_time_s"] = round(total, 3)
    written = []
    if args.json_path:
        written.append(f"scores and settings: {result.write_json(args.json_path)}")
    if args.predictions:
        written.append(f"predictions: {result.write_predictions(args.predictions)}")
    _print_summary(result.scores)
    print(f"time: {total:.1f} s in all ({result.time_s:.1f} s generating {len(samples)} instances, "
          f"{len(samples) / max(result.time_s, 1e-9):.2f} instances/s)")  # fmt: skip
    print("\n".join(written))
    return 0


def _line(label: str, scores: dict[str, Any]) -> str:
    return f"{label:<28} exact_match {scores['exact_match']:7.2f}   rougeL {scores['rougeL']:7.2f}   n {scores['n']}"


def _print_summary(scores: dict[str, Any]) -> None:
    for label in ("overall", "seen", "unseen"):
        if scores.get(label, {}).get("n"):  # a part with no instances has no scores
            print(_line(label, scores[label]))
    for category, values in scores["categories"].items():
        print(_line(f"  {category}", values))
    if len(scores["adapters"]) > 1:
        for name, values in scores["adapters"].items():
            print(_line(f"  adapter {name}", values))
