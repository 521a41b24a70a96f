"""Training adapters with `transformers.Trainer`: one adapter, or many at once in one mixed batch.

Every example names the adapter it trains; a batch mixes examples of different adapters and each
row goes through its own adapter, so one run over one copy of the base model trains them all. The
loss is on the response tokens only (labels are -100 on the prompt and on padding). Trainer owns
the loop, the schedule (linear with warm-up), gradient accumulation, logging and multi-process.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from flora.data import collate_examples, encode_example
from flora.model import AdapterModel


@dataclass(frozen=True)
class AdapterExample:
    """One training example: the adapter it trains, the prompt and the expected response."""

    adapter: str
    prompt: str
    response: str


class EncodedExamples(Dataset):
    """Tokenized examples (`flora.data.encode_example`) with the adapter each one trains."""

    def __init__(self, examples: Sequence[AdapterExample], tokenizer, max_length: int | None = None) -> None:
        self.items = [
            {**encode_example(tokenizer, e.prompt, e.response, max_length), "adapter_name": e.adapter} for e in examples
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class MixedAdapterCollator:
    """`flora.data.collate_examples` (right padding, labels -100 on padding), plus
    ``adapter_names``: one per row, which `AdapterModel.forward` routes by."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_examples(items, self.pad_token_id)
        batch["adapter_names"] = [item["adapter_name"] for item in items]
        return batch


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
    **training_arguments,
) -> dict:
    """Train every adapter named in ``examples`` (all must already be in ``model``) in one run.

    Returns Trainer's training metrics. Extra keyword arguments go to ``TrainingArguments``.
    """
    unknown = sorted({e.adapter for e in examples} - set(model.list_adapters()))
    if unknown:
        raise ValueError(f"examples name adapters {unknown} that the model lacks (loaded: {model.list_adapters()})")
    if not examples:
        raise ValueError("no training examples (expected at least one)")
    random.Random(seed).shuffle(examples := list(examples))
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
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=EncodedExamples(examples, model.tokenizer),
        data_collator=MixedAdapterCollator(model.tokenizer.pad_token_id),
    )
    result = trainer.train()
    model.eval()
    return result.metrics
