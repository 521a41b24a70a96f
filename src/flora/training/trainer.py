"""`FloraTrainer`: `transformers.Trainer` for an `AdapterModel`.

Owns what flora changes in Trainer: one optimizer parameter group per adapter (per-adapter
learning rates), checkpoints that hold only the adapters (or the base model for full fine-tuning)
and are written atomically (staging directory, fsync, rename), no key/value cache in the training
forward pass, and the per-step statistics that `StepLogCallback` logs and checks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from flora.model import AdapterModel
from flora.training.outputs import STAGING_PREFIX, TRAINER_STATE_FILE
from flora.training.step_log import StepLogCallback, StepStats
from flora.training.weights import load_checkpoint_weights, save_checkpoint_weights


class FloraTrainer(Trainer):
    """`transformers.Trainer` for an `AdapterModel`.

    - Per-adapter learning rates: one optimizer parameter group per adapter (``adapter_lr``).
    - Checkpoints hold each adapter in PEFT format (``checkpoint-N/adapters/<name>/``), or the base
      model for full fine-tuning, plus Trainer's optimizer, scheduler, RNG and state files; never the
      frozen base weights. A checkpoint is written into ``.staging-checkpoint-N`` and renamed into
      place once complete, so a killed run never leaves a partial ``checkpoint-N``.
    - A NaN or infinite loss or gradient stops the run (`TrainingDivergedError`) before the step's
      update; the checkpoints already written are kept.
    - After `train` the model's ``forward`` is its class's again: under ``bf16``/``fp16`` accelerate
      wraps it in autocast for training and Trainer leaves the wrapper on, so everything run on the
      model afterwards (generation, scoring) would run under autocast too; it runs in the model's
      dtype instead.
    """

    def __init__(self, *args, adapter_lr: Mapping[str, float] | None = None, full: bool = False,
                 log_path: str | os.PathLike | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.adapter_lr = dict(adapter_lr or {})
        self.full = full
        self._loss_shifts_labels = True  # a causal LM: count the label tokens after the shift
        adapters = [] if full else self._adapter_model().list_adapters()
        self.step_stats = StepStats(adapters)
        self.step_logger = StepLogCallback(self, log_path)
        self.add_callback(self.step_logger)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)  # drops the autocast wrapper

    def _adapter_model(self) -> AdapterModel:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, AdapterModel):
            raise TypeError(f"FloraTrainer trains a flora.AdapterModel, got {type(model).__name__}")
        return model

    # -- optimizer: one parameter group per adapter ---------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.full or not self.adapter_lr:
            return super().create_optimizer(model)
        adapter_model = self._adapter_model()
        decay = set(self.get_decay_parameter_names(adapter_model))
        names_of = {id(p): n for n, p in adapter_model.named_parameters()}
        groups, grouped = [], set()
        for adapter in adapter_model.list_adapters():
            params = [p for p in adapter_model.adapter_parameters(adapter).values() if p.requires_grad]
            grouped |= {id(p) for p in params}
            lr = self.adapter_lr.get(adapter, self.args.learning_rate)
            for with_decay in (True, False):
                chosen = [p for p in params if (names_of[id(p)] in decay) == with_decay]
                if chosen:
                    wd = self.args.weight_decay if with_decay else 0.0
                    groups.append({"params": chosen, "lr": lr, "weight_decay": wd, "adapter": adapter})
        other = [p for p in adapter_model.parameters() if p.requires_grad and id(p) not in grouped]
        if other:
            groups.append({"params": other, "weight_decay": self.args.weight_decay})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, adapter_model)
        if not isinstance(optimizer_cls, type) or any(k in optimizer_kwargs for k in ("params", "model")):
            raise ValueError(f"per-adapter learning rates need a plain torch optimizer (optim={self.args.optim!r})")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, *args, **kwargs):
        # No key/value cache in training: it would only hold memory.
        return super().compute_loss(model, {**inputs, "use_cache": False}, *args, **kwargs)

    # -- per-step statistics --------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        view = {"attention_mask": inputs.get("attention_mask"), "adapter_names": inputs.get("adapter_names")}
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_stats.add(loss, view)
        return loss

    # -- checkpoints: adapters only, written atomically -----------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_checkpoint_weights(self._adapter_model(), output_dir, self.full)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_checkpoint_weights(self._adapter_model(), resume_from_checkpoint, self.full)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.store_flos()
        self.save_model(staging, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if self.args.should_save:
            for callback in [*self.callback_handler.callbacks, self.control]:
                if isinstance(callback, ExportableState):
                    key = callback.__class__.__name__
                    if isinstance(self.state.stateful_callbacks.get(key), list):
                        self.state.stateful_callbacks[key].append(callback.state())
                    else:
                        self.state.stateful_callbacks[key] = callback.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_FILE))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _fsync_tree(staging)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(run_dir)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
