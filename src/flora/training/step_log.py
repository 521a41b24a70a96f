"""The per-step record of a training run and the stop on a NaN or infinite loss or gradient.

Owns `StepStats` (what the micro-batches of one optimizer step saw on this process: loss, tokens,
rows per adapter), `StepLogCallback` (sums those over all processes once per optimizer step,
writes one record to ``train_log.jsonl``, and checks the loss and gradients before the update)
and `TrainingDivergedError`, which that check raises.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

if TYPE_CHECKING:
    from flora.training.trainer import FloraTrainer


class TrainingDivergedError(FloatingPointError):
    """The loss or a gradient became NaN or infinite; training stopped before that step's update."""


class StepStats:
    """What the micro-batches of one optimizer step saw, on this process."""

    def __init__(self, adapters: Sequence[str]) -> None:
        self.adapters = list(adapters)
        self.reset()

    def reset(self) -> None:
        self.loss: torch.Tensor | float = 0.0
        self.tokens: torch.Tensor | int = 0
        self.rows = [0] * len(self.adapters)
        self.micro_batches = 0

    def add(self, loss: torch.Tensor, inputs: Mapping[str, Any]) -> None:
        self.loss = self.loss + loss.detach().to(torch.float64)
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.tokens = self.tokens + mask.sum()
        index = {name: i for i, name in enumerate(self.adapters)}
        for name in inputs.get("adapter_names") or ():
            if name in index:
                self.rows[index[name]] += 1
        self.micro_batches += 1


class StepLogCallback(TrainerCallback):
    """One JSON record per optimizer step (``train_log.jsonl``) and the NaN/Inf guard.

    Record: ``step``, ``epoch``, ``loss`` (mean over the step's response tokens, all processes),
    ``learning_rate`` (used by this step), ``tokens`` (non-padding, all processes), ``tokens_per_s``,
    ``examples``, ``adapters`` (examples per adapter, when there are several), ``learning_rates``
    (per adapter, when they differ). Before each update the loss and the gradients are checked: a
    NaN or infinite value stops the run with `TrainingDivergedError`, on every process at once.
    """

    def __init__(self, trainer: FloraTrainer, path: str | os.PathLike | None) -> None:
        self.trainer = trainer
        self.path = Path(path) if path is not None else None
        self.started = time.perf_counter()
        self.record: dict[str, Any] | None = None
        self.losses: list[float] = []  # this session's step losses (all processes)

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        stats = self.trainer.step_stats
        seconds = time.perf_counter() - self.started
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        bad_grads = torch.stack([~torch.isfinite(g).all() for g in grads]).any() if grads else torch.tensor(False)
        loss = torch.as_tensor(stats.loss, dtype=torch.float64, device=args.device)
        values = torch.stack([
            torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0),
            (~torch.isfinite(loss)).to(torch.float64) + bad_grads.to(args.device, torch.float64),
            torch.as_tensor(stats.tokens, dtype=torch.float64, device=args.device),
            torch.tensor(float(stats.micro_batches), dtype=torch.float64, device=args.device),
        ] + [torch.tensor(float(n), dtype=torch.float64, device=args.device) for n in stats.rows])  # fmt: skip
        if args.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
        values = values.tolist()
        stats.reset()
        step = state.global_step + 1
        rows = [int(n) for n in values[4:]]
        record: dict[str, Any] = {"step": step, "epoch": None, "loss": values[0] / max(args.world_size, 1)}
        groups = optimizer.param_groups if optimizer is not None else []
        factor = next((g["lr"] / g["initial_lr"] for g in groups if g.get("initial_lr")), None)
        record["learning_rate"] = args.learning_rate * factor if factor is not None else None
        adapter_lrs = {g["adapter"]: g["lr"] for g in groups if "adapter" in g}
        if adapter_lrs:
            record["learning_rates"] = adapter_lrs
        record["tokens"] = int(values[2])
        record["tokens_per_s"] = round(values[2] / seconds, 1) if seconds > 0 else None
        record["examples"] = sum(rows) if rows else None
        if len(stats.adapters) > 1:
            record["adapters"] = dict(zip(stats.adapters, rows, strict=True))
        if values[1] > 0:
            record.update(loss=None, nonfinite=True)
            self._write(args, record)
            last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
            raise TrainingDivergedError(
                f"the loss or a gradient became NaN or infinite at step {step} (learning rate "
                f"{record['learning_rate']}); training stopped before that step's update. "
                + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written yet. ")
                + "Lower the learning rate and start again (--overwrite), or resume from that checkpoint."
            )
        self.losses.append(record["loss"])
        self.record = record

    def on_step_end(self, args, state, control, **kwargs):
        if self.record is not None:
            self.record["epoch"] = round(state.epoch, 4) if state.epoch is not None else None
            self._write(args, self.record)
            self.record = None

    def _write(self, args, record: dict[str, Any]) -> None:
        if self.path is None or not args.should_save:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
