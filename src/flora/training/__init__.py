"""Training: one adapter, many adapters at once in one mixed batch, or the whole model.

Two entry points:

- `train` (also ``flora.train(...)``, and ``flora train`` on the command line) runs a whole
  training job from a `TrainConfig`: base model, method and hyperparameters, data (built-in suite
  tasks or categories, Super-NaturalInstructions / Alpaca / prompt-completion files), one adapter or
  one per task / category / explicit group, schedule, checkpoints, resume. It writes
  ``<output_dir>/adapters/<name>/`` (Hugging Face PEFT format; ``model/`` for full fine-tuning),
  ``train_config.json`` (every setting), ``train_log.jsonl`` (one record per optimizer step) and
  ``train_result.json``.
- `train_adapters` trains adapters already added to an in-memory `AdapterModel` on a list of
  `AdapterExample` (no files but Trainer's own).

Every example names the adapter it trains; a batch mixes examples of different adapters and each
row goes through its own adapter, so one run over one copy of the base model trains them all. The
loss is on the response tokens only (labels are -100 on the prompt and on padding) and is averaged
over the response tokens of the whole optimizer step (all micro-batches, all processes).
`transformers.Trainer` owns the loop, the schedule, gradient accumulation, logging, the progress
bar and data parallelism (``torchrun``); `FloraTrainer` adds per-adapter learning rates (optimizer
parameter groups), checkpoints that hold only the adapters (plus optimizer, scheduler and RNG
state) written atomically, and a stop with a clear error when the loss or a gradient is not finite.

Modules:

- `hyperparameters`: the methods ``method=`` accepts and their settings, converted to their types.
- `config`: `TrainConfig`, every setting of a job, and its validation.
- `data`: the training examples a job selects, and the adapter each one trains.
- `outputs`: the output directory: file names, new / overwrite / resume, clean-up, JSON files.
- `weights`: the weights a checkpoint holds, written and loaded back.
- `step_log`: the per-step log record and the NaN/Inf stop (`TrainingDivergedError`).
- `trainer`: `FloraTrainer`, the `transformers.Trainer` subclass.
- `run`: `train`, `TrainResult` and `train_adapters`.
"""

from flora.training.config import CONFIG_FILE, TrainConfig
from flora.training.data import (
    AdapterExample,
    EncodedExamples,
    MixedAdapterCollator,
    assign_adapters,
    load_training_samples,
    safe_adapter_name,
)
from flora.training.hyperparameters import (
    FULL,
    build_adapter_config,
    coerce_settings,
    coerce_value,
    config_class,
    method_names,
    parse_assignments,
    setting_types,
)
from flora.training.outputs import ADAPTERS_DIR, LOG_FILE, MODEL_DIR, RESULT_FILE, check_output_dir
from flora.training.run import TrainResult, train, train_adapters
from flora.training.step_log import StepLogCallback, StepStats, TrainingDivergedError
from flora.training.trainer import FloraTrainer
from flora.training.weights import load_adapter_weights, load_checkpoint_weights, load_model_weights

__all__ = [
    "ADAPTERS_DIR", "CONFIG_FILE", "FULL", "LOG_FILE", "MODEL_DIR", "RESULT_FILE",
    "AdapterExample", "EncodedExamples", "FloraTrainer", "MixedAdapterCollator", "StepLogCallback", "StepStats",
    "TrainConfig", "TrainResult", "TrainingDivergedError",
    "assign_adapters", "build_adapter_config", "check_output_dir", "coerce_settings", "coerce_value", "config_class",
    "load_adapter_weights", "load_checkpoint_weights", "load_model_weights", "load_training_samples",
    "method_names", "parse_assignments", "safe_adapter_name", "setting_types", "train", "train_adapters",
]  # fmt: skip
