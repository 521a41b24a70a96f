"""The loss on a row's response tokens: per row in a training step, and teacher-forced on held-out rows.

`response_losses` runs one forward pass and returns, per row, the sum of the cross-entropy over
its response tokens (the positions whose label is not ``IGNORE_INDEX``, after the causal shift)
and their number. The output layer is evaluated only at positions where some row has a label
(``logits_to_keep``, which counts real tokens also for rows with prompt-tuning's virtual tokens:
`flora.model.virtual_tokens`). `flora.training.packing.PackedTrainer` builds its per-member loss from it;
`validation_losses` scores held-out examples with it (no generation: what a learning curve needs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flora.data import IGNORE_INDEX, collate_examples


def response_losses(forward: Callable[..., Any], inputs: dict[str, Any], labels: Tensor) -> tuple[Tensor, Tensor, Any]:
    """``(loss sums [batch], response tokens [batch], outputs)`` of one forward pass.

    ``forward(**inputs, use_cache=False, logits_to_keep=...)`` is the model call; ``labels``
    ``[batch, tokens]`` are unshifted (-100 on the prompt and padding).
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    outputs = forward(**inputs, use_cache=False, logits_to_keep=keep)
    targets = targets[:, keep]
    logits = outputs.logits.float()
    targets = targets.to(logits.device)
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    sums = per_token.view(targets.shape).sum(dim=1)
    return sums, (targets != IGNORE_INDEX).sum(dim=1), outputs


def validation_losses(model, items: Sequence[dict[str, Any]], adapter_names: Sequence[str | None],
                      batch_size: int = 16) -> list[tuple[float, int]]:  # fmt: skip
    """Per item (`flora.data.encode_example` output: ``input_ids``, ``labels``), ``(mean loss over its
    response tokens, their number)``, teacher-forced, each row through ``adapter_names[i]``.

    Runs without gradients in the model's own dtype: the class's ``forward``, not the autocast
    wrapper that accelerate puts on the instance while Trainer trains in bfloat16. Leaves the model
    in eval mode (Trainer sets train mode again at its next step).
    """
    if len(items) != len(adapter_names):
        raise ValueError(f"{len(items)} examples but {len(adapter_names)} adapter names (expected one per example)")
    model.eval()
    forward = type(model).forward.__get__(model)
    pad = model.tokenizer.pad_token_id
    out: dict[int, tuple[float, int]] = {}
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))  # less padding
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate_examples([items[i] for i in rows], pad)
            inputs = {"input_ids": batch["input_ids"].to(model.device),
                      "attention_mask": batch["attention_mask"].to(model.device),
                      "adapter_names": [adapter_names[i] for i in rows]}  # fmt: skip
            sums, tokens, _ = response_losses(forward, inputs, batch["labels"])
            for i, total, count in zip(rows, sums.tolist(), tokens.tolist(), strict=True):
                out[i] = (total / max(count, 1), count)
    return [out[i] for i in range(len(items))]
