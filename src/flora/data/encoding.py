"""Token ids for training and generation, with one prompt/response boundary for both.

The prompt and the response are tokenized separately and their ids concatenated
(prompt ids + response ids + EOS); generation starts from exactly the prompt ids. Tokenizing
``prompt + response`` as one string would merge the template's trailing space into the first
answer token, and training and generation would see different boundaries.

A tokenizer that adds a BOS token (e.g. Llama's) gets it once, at the start of the prompt,
and never in front of the response; one that adds none (SmolLM2) gets none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer adds a BOS token by default, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if len(with_special) > len(without) and with_special[0] == bos else []


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt``: its text ids, after the BOS token when the tokenizer adds one.

    A prompt that already starts with the BOS token (a chat template that writes it) keeps one.
    """
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    prefix = bos_prefix(tokenizer)
    if prefix and ids[:1] != prefix:
        ids = prefix + ids
    return ids


def encode_example(tokenizer: Any, prompt: str, response: str, max_length: int | None = None) -> dict[str, list[int]]:
    """Ids of prompt + response + EOS and labels that are -100 on the prompt.

    Returns ``{"input_ids": [n], "labels": [n]}`` (lists of ints, n = prompt + response + 1);
    ``max_length`` cuts both from the right.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token (expected one to end each response)")
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token id, else its EOS token id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad prompt ids for generation.

    Returns ``(input_ids, attention_mask)``, both LongTensor ``[batch, longest prompt]``, the
    padding on the left (mask 0) so that every row's next token comes at the same position.
    """
    if not prompts:
        raise ValueError("collate_prompts got no prompts (expected at least one list of token ids)")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if len(ids):
            input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
            mask[row, width - len(ids) :] = 1
    return input_ids, mask


class LeftPadCollator:
    """Batches prompts for generation: ``collator([ids, ...]) -> {"input_ids", "attention_mask"}``.

    Each item is a list of ids (from `encode_prompt`) or a dict with ``"input_ids"``; tensors are
    ``[batch, longest]``, padded on the left with the tokenizer's pad token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.pad_id = pad_token_id(tokenizer)

    def __call__(self, items: Sequence[Sequence[int] | dict[str, Sequence[int]]]) -> dict[str, Tensor]:
        prompts = [item["input_ids"] if isinstance(item, dict) else item for item in items]
        input_ids, mask = collate_prompts(prompts, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": mask}


def collate_examples(examples: Sequence[dict[str, Sequence[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad `encode_example` outputs for training.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (padding labelled -100), each
    LongTensor ``[batch, longest]``.
    """
    if not examples:
        raise ValueError("collate_examples got no examples")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        if len(example["labels"]) != n:
            raise ValueError(f"example {row}: {n} input_ids but {len(example['labels'])} labels (expected equal)")
        input_ids[row, :n] = torch.as_tensor(list(example["input_ids"]), dtype=torch.long)
        labels[row, :n] = torch.as_tensor(list(example["labels"]), dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
