"""``flora train``: train one adapter, many adapters at once, or the whole model (`flora.training.train`).

Every option maps to a field of `flora.training.TrainConfig`. With ``--resume`` the settings stored in
``<output-dir>/train_config.json`` are the defaults, so ``flora train --output-dir DIR --resume``
continues a run; options given must agree with the stored run. Under ``torchrun`` every process
runs the same command (data parallelism).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from flora.cli.options import MODEL_HELP, parse_pairs

_EPILOG = """examples:
  flora train --output-dir runs/lora --method lora --set r=8 --set alpha=16 --tasks "Word Order" --max-steps 200
  flora train --output-dir runs/many --adapter-per task --tasks reverse_words,sort_words --adapter-lr sort_words=2e-3
  flora train --output-dir runs/groups --adapter words=reverse_words,sort_words --adapter rest='*' --data DIR
  flora train --output-dir runs/lora --resume
  torchrun --nproc_per_node 2 -m flora train --output-dir runs/ddp ...   (data parallelism)
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    p.add_argument("--output-dir", required=True, help="where adapters, checkpoints, config and log go")
    m = p.add_argument_group("model and method")
    m.add_argument("--model", help=f"{MODEL_HELP} (default: smollm2-135m)")
    m.add_argument("--method", help="full, or an adapter method: lora (default), flora, ia3, ...")
    m.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE",
                   help="a hyperparameter of the method's config (repeatable), e.g. r=8, alpha=16, "
                        "target_modules=q_proj,v_proj (default: the config's defaults)")  # fmt: skip
    d = p.add_argument_group("data")
    d.add_argument("--data", action="append", metavar="PATH",
                   help="SNI task file or directory (or `flora tasks export` output), Alpaca JSON(L) or "
                        "prompt/completion JSONL (repeatable); default: the built-in suite")  # fmt: skip
    d.add_argument("--format", dest="data_format", choices=("auto", "sni", "alpaca", "jsonl"),
                   help="format of --data (default: auto)")  # fmt: skip
    d.add_argument("--tasks", help="comma-separated task names or categories (suite default: its seen tasks)")
    d.add_argument("--split", help="SNI split directory (its train_tasks.txt) or split file (default: none)")
    d.add_argument("--max-instances", type=int, help="training instances per task (default: all)")
    d.add_argument("--suite-seed", type=int, help="seed of the built-in suite (default 0)")
    d.add_argument("--suite-train", type=int, help="built-in suite: training instances per task (default 100)")
    d.add_argument("--template", choices=("sni", "alpaca", "plain"), help="default: sni (alpaca / plain for those)")
    d.add_argument("--pos-examples", type=int, help="positive examples in the SNI prompt (default 0)")
    d.add_argument("--chat", action="store_true", default=None, help="wrap prompts in the model's chat template")
    d.add_argument("--max-length", type=int, help="cut examples to this many tokens (default: the model's maximum)")
    a = p.add_argument_group("adapters")
    a.add_argument("--adapter-name", help="name of the adapter when there is one (default: default)")
    a.add_argument("--adapter-per", choices=("task", "category"),
                   help="one adapter per task or per category (default: one adapter for all)")  # fmt: skip
    a.add_argument("--adapter", dest="adapters", action="append", metavar="NAME=TASK,TASK",
                   help="an adapter trained on these tasks or categories ('*': the rest); repeatable")  # fmt: skip
    a.add_argument("--adapter-lr", action="append", metavar="NAME=LR",
                   help="learning rate of one adapter (default: --learning-rate)")  # fmt: skip
    a.add_argument("--adapter-set", action="append", metavar="NAME:KEY=VALUE",
                   help="a hyperparameter of one adapter, e.g. sort_words:r=4 (default: --set)")  # fmt: skip
    s = p.add_argument_group("schedule")
    s.add_argument("--epochs", type=float, help="passes over the data (default 1; --max-steps wins)")
    s.add_argument("--max-steps", type=int, help="optimizer steps (default: from --epochs)")
    s.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float,
                   help="default per method: lora 1e-3, flora 8e-3, ia3 5e-3, full 2e-5")  # fmt: skip
    s.add_argument("--lr-scheduler", help="a transformers SchedulerType: linear (default), cosine, constant, ...")
    s.add_argument("--warmup-ratio", type=float, help="fraction of the steps spent warming up (default 0.1)")
    s.add_argument("--warmup-steps", type=int, help="warm-up steps (overrides --warmup-ratio)")
    s.add_argument("--weight-decay", type=float, help="AdamW's weight decay (default 0.0)")
    s.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0; 0: off)")
    s.add_argument("--batch-size", type=int, help="examples per optimizer step over all processes (default 8)")
    s.add_argument("--micro-batch-size", type=int,
                   help="examples per forward pass per process; the rest is gradient accumulation (default: "
                        "the whole share)")  # fmt: skip
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, help="the adapters' initialisation and the data order (default 0)")
    r.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 100; 0: none)")
    r.add_argument("--save-total-limit", type=int, help="checkpoints kept (default 3)")
    r.add_argument("--logging-steps", type=int, help="progress-bar log every N steps (default 10)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), help="default: float32")
    r.add_argument("--device", choices=("auto", "cpu"), help="auto: a GPU when there is one (default: auto)")
    r.add_argument("--strategy", help="per-row adapter strategy of flora.AdapterModel (default auto)")
    r.add_argument("--training-arg", dest="training_args", action="append", metavar="KEY=VALUE",
                   help="another transformers.TrainingArguments field, e.g. bf16=true, optim=adamw_torch "
                        "(default: none)")  # fmt: skip
    r.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")
    r.add_argument("--overwrite", action="store_true", default=None, help="replace a run in --output-dir")
    r.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The `TrainConfig` these options describe (on top of the stored run's settings with --resume)."""
    from flora.training import CONFIG_FILE, TrainConfig, parse_assignments

    given: dict[str, Any] = {}
    for key in ("output_dir", "model", "method", "data_format", "split", "max_instances", "suite_seed", "suite_train",
                "template", "pos_examples", "chat", "max_length", "adapter_name", "adapter_per", "epochs",
                "max_steps", "learning_rate", "lr_scheduler", "warmup_ratio", "warmup_steps", "weight_decay",
                "max_grad_norm", "batch_size", "micro_batch_size", "seed", "save_steps", "save_total_limit",
                "logging_steps", "dtype", "device", "strategy", "resume", "overwrite", "progress"):  # fmt: skip
        value = getattr(args, key, None)
        if value is not None:
            given[key] = value
    if args.settings is not None:
        given["settings"] = parse_assignments(args.settings)
    if args.data is not None:
        given["data"] = args.data
    if args.tasks is not None:
        given["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.adapters is not None:
        given["adapters"] = {
            k: [t.strip() for t in v.split(",")] for k, v in parse_pairs(args.adapters, "--adapter").items()
        }
    if args.adapter_lr is not None:
        given["adapter_lr"] = parse_pairs(args.adapter_lr, "--adapter-lr")
    if args.adapter_set is not None:
        per: dict[str, dict[str, str]] = {}
        for name, assignment in parse_pairs(args.adapter_set, "--adapter-set", ":").items():
            per.setdefault(name, {}).update(parse_assignments([assignment], "--adapter-set"))
        given["adapter_settings"] = per
    if args.training_args is not None:
        given["training_args"] = parse_assignments(args.training_args, "--training-arg")
    stored = Path(args.output_dir) / CONFIG_FILE
    base = TrainConfig.load(args.output_dir) if args.resume and stored.is_file() else TrainConfig()
    known = {f: getattr(base, f) for f in base.__dataclass_fields__}
    known.update(given)
    return TrainConfig.from_dict(known)


def run(args) -> int:
    from flora.training import TrainingDivergedError, train

    config = config_from_args(args)
    try:
        result = train(config)
    except TrainingDivergedError as err:
        print(f"flora: error: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0" and (result.adapters or result.model_dir):
        where = ", ".join(str(p) for p in result.adapters.values()) or str(result.model_dir)
        print(f"trained {result.global_step} steps; saved {where}")
    return 0
