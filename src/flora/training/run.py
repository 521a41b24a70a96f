"""Running a training job: `train` (a whole job from a `TrainConfig`) and `train_adapters` (in memory).

Owns the order of a job (settings checked, data and adapters resolved before the model loads, the
output directory checked and prepared, model and adapters set up from the seed, Trainer run or a
finished run re-saved, adapters / model / ``train_result.json`` written), `TrainResult`, the batch
layout over processes (``batch_size`` = processes x micro-batch x accumulation) and the
``TrainingArguments`` a job's settings give.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainingArguments

from flora.model import AdapterModel
from flora.training.config import TrainConfig
from flora.training.data import (
    AdapterExample,
    EncodedExamples,
    MixedAdapterCollator,
    encode_training_examples,
    resolve_job_data,
)
from flora.training.hyperparameters import FULL
from flora.training.outputs import (
    ADAPTERS_DIR,
    LOG_FILE,
    MODEL_DIR,
    RESULT_FILE,
    check_output_dir,
    prepare_output_dir,
    trainer_state,
    write_config,
    write_json,
)
from flora.training.trainer import FloraTrainer
from flora.training.weights import load_checkpoint_weights, save_adapters, save_full_model


@dataclass
class TrainResult:
    """What `train` produced: output directory, adapter directories, metrics and the trained model."""

    output_dir: Path
    adapters: dict[str, Path]
    model_dir: Path | None
    metrics: dict[str, Any]
    global_step: int
    resumed_from: str | None
    model: AdapterModel = field(repr=False)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _batch_layout(config: TrainConfig, world: int) -> tuple[int, int]:
    """``(per-process micro-batch, gradient accumulation steps)`` giving ``config.batch_size`` per step."""
    if config.micro_batch_size is None:
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} does not split evenly over {world} processes "
                             f"(expected a multiple of {world})")  # fmt: skip
        return config.batch_size // world, 1
    per_step = config.micro_batch_size * world
    if config.batch_size % per_step:
        raise ValueError(f"batch_size {config.batch_size} is not a multiple of micro_batch_size "
                         f"{config.micro_batch_size} x {world} process(es) = {per_step}")  # fmt: skip
    return config.micro_batch_size, config.batch_size // per_step


def _say(message: str, args: TrainingArguments | None = None) -> None:
    if args is None or args.should_log:
        print(f"flora train: {message}", file=sys.stderr, flush=True)


def train(config: TrainConfig | Mapping[str, Any] | None = None, **overrides: Any) -> TrainResult:
    """Run a training job (see `TrainConfig` for every setting; keyword arguments override ``config``).

        import flora
        result = flora.train(model="smollm2-135m", method="lora", settings={"r": 8, "alpha": 16},
                             tasks=["Word Order"], adapter_per="task", max_steps=200, output_dir="runs/x")
        result.adapters  # {"reverse_words": Path("runs/x/adapters/reverse_words"), ...}

    Writes ``adapters/<name>/`` (PEFT format) or ``model/`` (full fine-tuning), ``train_config.json``,
    ``train_log.jsonl``, ``train_result.json`` and ``checkpoint-N/`` into ``output_dir``. Under
    ``torchrun`` every process runs this with the same settings (data parallelism).
    """
    if isinstance(config, Mapping):
        config = TrainConfig.from_dict(config)
    base = config or TrainConfig()
    problem = TrainConfig.unknown_settings(overrides)
    if problem:
        raise TypeError(f"train() got unknown setting {problem}")
    config = dataclasses.replace(base, **overrides).normalized()
    world = _world_size()
    micro_batch, accumulation = _batch_layout(config, world)

    # Data and adapters first: bad input fails before the model is loaded.
    loaded, adapter_of, groups, adapter_configs = resolve_job_data(config)

    args = training_arguments(config, micro_batch, accumulation, multiple=len(groups) > 1)
    if args.world_size != world:
        raise RuntimeError(f"WORLD_SIZE says {world} processes but the distributed state has {args.world_size}")
    mode, checkpoint = check_output_dir(config)
    out = Path(config.output_dir)
    _barrier()
    if args.should_save:
        prepare_output_dir(out, mode, checkpoint)
    _barrier()

    # The model, with its adapters initialised from the seed (identically on every process).
    import transformers

    model = AdapterModel.from_pretrained(config.model, dtype=getattr(torch, config.dtype), strategy=config.strategy)
    tokenizer = model.tokenizer
    transformers.set_seed(config.seed)
    if config.method == FULL:
        for parameter in model.base_model.parameters():
            parameter.requires_grad_(True)
    for name, adapter_config in adapter_configs.items():
        model.add_adapter(name, adapter_config)

    max_length = config.max_length or getattr(model.config, "max_position_embeddings", None)
    dataset, template_of, dropped = encode_training_examples(config, loaded, adapter_of, tokenizer, max_length)
    if dropped:
        _say(f"dropped {dropped} examples whose response max_length={max_length} cuts off", args)

    if args.should_save and mode != "resume":
        write_config(out, config, args, micro_batch, accumulation, groups, adapter_configs, dataset, template_of)
    steps = config.steps_for(len(dataset))
    _say(f"{len(dataset)} examples, {len(groups) or 'full model'}"
         f"{' adapters' if len(groups) > 1 else ' adapter' if groups else ''}, {steps} steps of {config.batch_size} "
         f"({world} process(es) x {micro_batch} x {accumulation} accumulation), method {config.method}"
         + (f"; resuming from {checkpoint}" if checkpoint else ""), args)  # fmt: skip
    if config.resume and mode != "resume":
        _say(f"nothing to resume in {out}: starting a new run", args)

    trainer = FloraTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=MixedAdapterCollator(tokenizer.pad_token_id),
        adapter_lr=config.adapter_lr,
        full=config.method == FULL,
        log_path=out / LOG_FILE,
    )
    state = trainer_state(checkpoint)
    if checkpoint and state.get("global_step", 0) >= state.get("max_steps", math.inf) > 0:
        # A finished run: Trainer would take one more step; load the checkpoint and save again.
        load_checkpoint_weights(model, checkpoint, config.method == FULL)
        previous = out / RESULT_FILE
        metrics = json.loads(previous.read_text()).get("metrics", {}) if previous.is_file() else {}
        global_step = int(state["global_step"])
    else:
        output = trainer.train(resume_from_checkpoint=checkpoint)
        metrics, global_step = dict(output.metrics), trainer.state.global_step
        losses = trainer.step_logger.losses
        if losses:  # Trainer's own figure is process 0's share under torchrun; this is over all processes
            metrics["train_loss"] = sum(losses) / len(losses)
    model.eval()

    adapters: dict[str, Path]
    model_dir = None
    if args.should_save:
        if config.method == FULL:
            model_dir = out / MODEL_DIR
            save_full_model(model, model_dir)
        adapters = save_adapters(model, groups, out)
        result = {"global_step": global_step, "metrics": metrics, "resumed_from": checkpoint,
                  "adapters": {k: str(v) for k, v in adapters.items()},
                  "model": str(model_dir) if model_dir else None}  # fmt: skip
        write_json(out / RESULT_FILE, result)
    else:
        adapters = {name: out / ADAPTERS_DIR / name for name in groups}
        model_dir = out / MODEL_DIR if config.method == FULL else None
    _barrier()
    return TrainResult(out, adapters, model_dir, metrics, global_step, checkpoint, model)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def training_arguments(config: TrainConfig, micro_batch: int, accumulation: int, multiple: bool) -> TrainingArguments:
    """The ``TrainingArguments`` of a job: its schedule and run settings, ``micro_batch`` examples per
    forward pass per process, ``accumulation`` micro-batches per step (``multiple``: several adapters)."""
    warmup: float = config.warmup_steps if config.warmup_steps is not None else config.warmup_ratio
    extra = dict(config.training_args)
    extra.setdefault("dataloader_pin_memory", torch.cuda.is_available() and config.device != "cpu")
    if _world_size() > 1 and config.method != FULL:
        extra.setdefault("ddp_find_unused_parameters", multiple)
    args = TrainingArguments(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        use_cpu=config.device == "cpu" or (_world_size() > 1 and not torch.cuda.is_available()),
        **extra,
    )
    args.world_size  # noqa: B018  (sets up the distributed state now)
    return args


# -- in-memory training of adapters already in a model -------------------------------------------


def train_adapters(
    model: AdapterModel,
    examples: Sequence[AdapterExample],
    output_dir: str | Path,
    *,
    learning_rate: float = 1e-3,
    max_steps: int = 100,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    warmup_ratio: float = 0.1,
    seed: int = 0,
    logging_steps: int = 10,
    adapter_lr: Mapping[str, float] | None = None,
    **training_arguments,
) -> dict:
    """Train every adapter named in ``examples`` (all must already be in ``model``) in one run.

    Returns Trainer's training metrics. Extra keyword arguments go to ``TrainingArguments``.
    """
    unknown = sorted({e.adapter for e in examples} - set(model.list_adapters()) - {None})
    if unknown:
        raise ValueError(f"examples name adapters {unknown} that the model lacks (loaded: {model.list_adapters()})")
    if not examples:
        raise ValueError("no training examples (expected at least one)")
    random.Random(seed).shuffle(examples := list(examples))
    training_arguments.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    args = TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=learning_rate,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        lr_scheduler_type="linear",
        warmup_steps=int(warmup_ratio * max_steps),
        seed=seed,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        **training_arguments,
    )
    trainer = FloraTrainer(
        model=model,
        args=args,
        train_dataset=EncodedExamples(examples, model.tokenizer),
        data_collator=MixedAdapterCollator(model.tokenizer.pad_token_id),
        adapter_lr=adapter_lr,
    )
    result = trainer.train()
    model.eval()
    return result.metrics
