"""The output directory of a training job: what a run writes there, and what a new run does with it.

Owns the names of the files and folders a run writes (``train_config.json``, ``train_log.jsonl``,
``train_result.json``, ``adapters/``, ``model/``, ``checkpoint-N/``, ``.staging-*``), the decision
for an existing directory (`check_output_dir`: new run, overwrite, or resume, refusing a different
run), the clean-up before a run starts (`prepare_output_dir`: staging leftovers, overwritten
artifacts, log records after the resumed checkpoint), and the JSON files a run writes atomically
(`write_config`, `write_json`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from flora.data.formats import write_text_atomic
from flora.training.config import CONFIG_FILE, TrainConfig
from flora.training.hyperparameters import FULL

LOG_FILE = "train_log.jsonl"
RESULT_FILE = "train_result.json"
ADAPTERS_DIR = "adapters"
MODEL_DIR = "model"
STAGING_PREFIX = ".staging-"
TRAINER_STATE_FILE = "trainer_state.json"


def artifacts(directory: Path) -> list[Path]:
    """What a flora training run writes into its output directory."""
    fixed = [directory / n for n in (CONFIG_FILE, LOG_FILE, RESULT_FILE, ADAPTERS_DIR, MODEL_DIR)]
    checkpoints = [p for p in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
    staging = list(directory.glob(f"{STAGING_PREFIX}*"))
    return [p for p in fixed if p.exists()] + checkpoints + staging


def remove(path: Path) -> None:
    """Delete ``path``: a directory tree, or a file or link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_output_dir(config: TrainConfig) -> tuple[str, str | None]:
    """What to do with ``config.output_dir``: ``("new" | "overwrite" | "resume", checkpoint or None)``.

    Raises when it holds a different run (unless ``overwrite``), or this run without ``resume``.
    Reads only: safe on every process.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output dir {str(out)!r} is a file")
    entries = [p for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX)] if out.is_dir() else []
    if not entries:
        return "new", None
    if config.overwrite:
        return "overwrite", None
    if not (out / CONFIG_FILE).is_file():
        raise ValueError(f"output dir {str(out)!r} is not empty and holds no flora training run "
                         f"({', '.join(sorted(p.name for p in entries)[:5])}); choose another directory "
                         f"or pass --overwrite (it removes only flora's own files)")  # fmt: skip
    stored = TrainConfig.load(out).normalized().identity()
    current = config.identity()
    differences = [f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now"
                   for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]  # fmt: skip
    if differences:
        raise ValueError(f"output dir {str(out)!r} holds a different run ({'; '.join(differences[:6])}); "
                         f"pass --overwrite to replace it, or choose another --output-dir")  # fmt: skip
    checkpoint = get_last_checkpoint(str(out))
    if not config.resume:
        where = f"last checkpoint {Path(checkpoint).name}" if checkpoint else "no checkpoint yet"
        done = " (finished)" if (out / RESULT_FILE).is_file() else ""
        raise ValueError(f"output dir {str(out)!r} already holds this run{done} ({where}); pass --resume to "
                         f"continue it or --overwrite to start over")  # fmt: skip
    return "resume", checkpoint


def trainer_state(checkpoint: str | None) -> dict[str, Any]:
    """Trainer's state stored in ``checkpoint`` (``trainer_state.json``); ``{}`` without a checkpoint."""
    return json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text()) if checkpoint else {}


def prepare_output_dir(out: Path, mode: str, checkpoint: str | None) -> None:
    """Ready ``out`` for a run in ``mode`` (`check_output_dir`); the process that saves calls this.

    Removes staging leftovers of a killed run, flora's own files for ``"overwrite"``, and the log:
    all of it, unless the run resumes from ``checkpoint`` (then the records after it).
    """
    out.mkdir(parents=True, exist_ok=True)
    for path in out.glob(f"{STAGING_PREFIX}*"):
        remove(path)
    if mode == "overwrite":
        for path in artifacts(out):
            remove(path)
    if mode == "resume" and checkpoint is not None:
        truncate_log(out / LOG_FILE, int(trainer_state(checkpoint)["global_step"]))
    if mode != "resume" or checkpoint is None:
        (out / LOG_FILE).unlink(missing_ok=True)


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the log records of steps up to ``last_step`` (those the checkpoint holds)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def write_json(path: Path, data: Any, default: Any = None) -> None:
    """``data`` as indented JSON, written atomically (``default``: as for `json.dumps`)."""
    write_text_atomic(path, json.dumps(data, indent=1, default=default) + "\n")


def write_config(out, config, args, micro_batch, accumulation, groups, adapter_configs, dataset, template_of) -> None:
    """``train_config.json``: the settings, and what they resolved to (adapters, batch layout, templates, versions)."""
    import transformers

    from flora import __version__

    counts: dict[str, int] = {}
    for item in dataset.items:
        counts[item["adapter_name"] or FULL] = counts.get(item["adapter_name"] or FULL, 0) + 1
    adapters = {
        name: {"tasks": tasks, "examples": counts.get(name, 0),
               "learning_rate": config.adapter_lr.get(name, config.learning_rate),
               "config": adapter_configs[name].to_peft_dict()}
        for name, tasks in groups.items()
    }  # fmt: skip
    templates = {name: template.describe() for name, template in template_of.items() if config.template in (None, name)}
    data = {
        "config": config.to_dict(),
        "resolved": {
            "adapters": adapters, "examples": len(dataset), "world_size": args.world_size,
            "per_device_batch_size": micro_batch, "gradient_accumulation_steps": accumulation,
            "templates": templates,
            "versions": {"flora": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        },
    }  # fmt: skip
    write_json(out / CONFIG_FILE, data, default=str)
