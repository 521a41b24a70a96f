"""Token ids: prompt and response tokenized apart, one BOS at most, -100 on the prompt, left padding."""

from __future__ import annotations

import pytest
import torch

from flora.data import (
    IGNORE_INDEX,
    LeftPadCollator,
    bos_prefix,
    collate_examples,
    collate_prompts,
    encode_example,
    encode_prompt,
)

from .tiny import tiny_tokenizer

PROMPT = "Definition: Reverse the words.\n\nNow complete the following example -\nInput: a b\nOutput: "


@pytest.mark.parametrize("add_bos", [False, True])
def test_example_is_prompt_ids_then_response_ids_then_eos(add_bos):
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    example = encode_example(tokenizer, PROMPT, "b a")
    prompt_ids = encode_prompt(tokenizer, PROMPT)
    response_ids = tokenizer("b a", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    # Generation starts from exactly the prompt ids used in training.
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    # One BOS, at the start, only where the tokenizer adds one; never before the response.
    bos = tokenizer.bos_token_id
    assert example["input_ids"].count(bos) == (1 if add_bos else 0)
    assert (prompt_ids[0] == bos) is add_bos
    assert bos_prefix(tokenizer) == ([bos] if add_bos else [])


def test_joint_tokenization_would_move_the_boundary():
    # Why the ids are concatenated: tokenized as one string, the trailing space of the prompt
    # merges into the answer ("Output: " + "b" -> "Output:" + " b").
    tokenizer = tiny_tokenizer()
    joint = tokenizer(PROMPT + "b a", add_special_tokens=False)["input_ids"]
    separate = encode_example(tokenizer, PROMPT, "b a")["input_ids"][:-1]
    assert joint != separate


def test_prompt_that_already_starts_with_bos_keeps_one():
    tokenizer = tiny_tokenizer(add_bos=True)
    ids = encode_prompt(tokenizer, "<s>user: hi\nbot: ")
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_max_length_cuts_from_the_right():
    tokenizer = tiny_tokenizer()
    full = encode_example(tokenizer, PROMPT, "b a")
    cut = encode_example(tokenizer, PROMPT, "b a", max_length=5)
    assert cut["input_ids"] == full["input_ids"][:5] and cut["labels"] == full["labels"][:5]


def test_left_padding_collator():
    tokenizer = tiny_tokenizer()
    pad = tokenizer.pad_token_id
    input_ids, mask = collate_prompts([[5, 6, 7], [8]], pad)
    assert input_ids.tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    batch = LeftPadCollator(tokenizer)([{"input_ids": [9, 10]}, [11, 12, 13]])
    assert batch["input_ids"].tolist() == [[pad, 9, 10], [11, 12, 13]]
    assert batch["attention_mask"].dtype == torch.long
    with pytest.raises(ValueError, match="no prompts"):
        collate_prompts([], pad)


def test_training_collator_pads_right_with_ignored_labels():
    batch = collate_examples(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="example 0: 2 input_ids but 1 labels"):
        collate_examples([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)
