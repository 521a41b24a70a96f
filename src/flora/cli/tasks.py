"""``flora tasks list|show|export``: the built-in task suite (`flora.data.suite`)."""

from __future__ import annotations

import json

from flora.cli.options import split_names
from flora.data import suite as suite_module


def add_parser(subparsers) -> None:
    tasks = subparsers.add_parser("tasks", description=__doc__)
    actions = tasks.add_subparsers(dest="tasks_command", required=True)
    listing = actions.add_parser("list", help="every task with its category, metric and default split")
    listing.set_defaults(func=_tasks_list)
    show = actions.add_parser("show", help="one task: definition, examples and some held-out instances")
    show.add_argument("name", help="a task of `flora tasks list`")
    show.add_argument("--suite-seed", "--seed", dest="seed", type=int, default=0, help="seed of the built-in suite")
    show.add_argument("--instances", type=int, default=5, help="how many held-out instances to print")
    show.add_argument("--json", action="store_true", help="print the task as Super-NaturalInstructions JSON")
    show.set_defaults(func=_tasks_show)
    export = actions.add_parser("export", help="write the suite as Super-NaturalInstructions files")
    export.add_argument("directory", help="the directory to write (tasks/, splits/, suite.json)")
    export.add_argument("--suite-seed", "--seed", dest="seed", type=int, default=0, help="seed of the built-in suite")
    export.add_argument("--train", type=int, default=suite_module.DEFAULT_TRAIN, help="training instances per task")
    export.add_argument("--heldout", type=int, default=suite_module.DEFAULT_HELDOUT, help="held-out instances per task")
    export.add_argument("--tasks", help="comma-separated task names or categories (default: all)")
    export.set_defaults(func=_tasks_export)


def _tasks_list(args) -> int:
    train, _ = suite_module.default_split()
    width = max(len(s.name) for s in suite_module.SPECS)
    cat_width = max(len(c) for c in suite_module.CATEGORIES)
    print(f"{'task':<{width}}  {'category':<{cat_width}}  {'metric':<11}  split")
    for spec in suite_module.SPECS:
        split = "train (seen)" if spec.name in train else "test (unseen)"
        print(f"{spec.name:<{width}}  {spec.category:<{cat_width}}  {spec.metric:<11}  {split}")
    print(f"{len(suite_module.SPECS)} tasks in {len(suite_module.CATEGORIES)} categories; "
          f"unseen categories: {', '.join(suite_module.UNSEEN_CATEGORIES)}")  # fmt: skip
    return 0


def _tasks_show(args) -> int:
    if args.name not in suite_module.SPEC_BY_NAME:
        raise KeyError(f"unknown suite task {args.name!r} (see `flora tasks list`)")
    spec = suite_module.SPEC_BY_NAME[args.name]
    _, heldout = suite_module.generate_task(spec, args.seed, n_train=0, n_heldout=max(args.instances, 0))
    if args.json:
        print(json.dumps(heldout.to_json(), indent=1, ensure_ascii=False))
        return 0
    train, _ = suite_module.default_split()
    print(f"{spec.name}  [{spec.category}; {spec.metric}; {'seen' if spec.name in train else 'unseen'}]")
    print(f"Definition: {spec.definition}")
    for index, example in enumerate(heldout.positive_examples, start=1):
        print(f"Positive example {index}: {example.input!r} -> {example.output!r}")
    for example in heldout.negative_examples:
        print(f"Negative example: {example.input!r} -> {example.output!r} ({example.explanation})")
    for instance in heldout.instances:
        print(f"{instance.id}: {instance.input!r} -> {list(instance.references)!r}")
    return 0


def _tasks_export(args) -> int:
    suite = suite_module.build_suite(args.seed, args.train, args.heldout, split_names(args.tasks))
    directory = suite.export(args.directory)
    print(f"wrote {len(suite.train)} tasks ({args.train} training + {args.heldout} held-out instances each) "
          f"and the default split to {directory}")  # fmt: skip
    return 0
