"""Prompt templates, byte for byte, and what gets recorded about them."""

from __future__ import annotations

from pathlib import Path

import pytest

from flora.data import Template, load_sni_task, samples_from_alpaca, samples_from_tasks
from flora.data.formats import AlpacaRecord

from .tiny import tiny_tokenizer

SNI = Path(__file__).parent / "fixtures" / "sni"


@pytest.fixture
def sample():
    return samples_from_tasks([load_sni_task(SNI / "task901_antonyms.json")])[0]


def test_sni_definition_only_template_byte_for_byte(sample):
    expected = (
        "Definition: Given an adjective, generate its antonym. An antonym of a word is a word opposite in "
        "meaning to it.\n\nNow complete the following example -\nInput: fast\nOutput: "
    )
    assert Template("sni").render(sample) == expected
    assert Template().render(sample).encode() == expected.encode()


def test_sni_template_with_positive_examples(sample):
    expected = (
        "Definition: Given an adjective, generate its antonym. An antonym of a word is a word opposite in "
        "meaning to it.\n\n"
        "Positive Example 1 -\nInput: hot\nOutput: cold\n\n"
        "Positive Example 2 -\nInput: tall\nOutput: short\n\n"
        "Now complete the following example -\nInput: fast\nOutput: "
    )
    assert Template("sni", num_pos_examples=2).render(sample) == expected
    one = Template("sni", num_pos_examples=1).render(sample)
    assert "Positive Example 1 -" in one and "Positive Example 2" not in one
    with pytest.raises(ValueError, match="has 2 positive examples, fewer than num_pos_examples=3"):
        Template("sni", num_pos_examples=3).render(sample)


def test_alpaca_template_with_and_without_input():
    with_input, without = samples_from_alpaca(
        [AlpacaRecord("Give the capital.", "France", "Paris"), AlpacaRecord("Name a color.", "", "Red")], "alp"
    )
    assert Template("alpaca").render(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nGive the capital.\n\n### Input:\nFrance\n\n### Response:\n"
    )
    assert Template("alpaca").render(without) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert with_input.task == "alp" and with_input.id == "alp-0" and with_input.references == ("Paris",)


def test_chat_template_wraps_the_text(sample):
    tokenizer = tiny_tokenizer()
    text = Template("sni").render(sample)
    assert Template("sni", chat=True).render(sample, tokenizer) == f"<s>user: {text}\nbot: "
    description = Template("sni", chat=True).describe(tokenizer)
    assert description["chat"] is True and len(description["chat_template_sha256"]) == 64
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        Template("sni", chat=True).render(sample)


def test_description_records_the_exact_format():
    description = Template("sni").describe()
    assert description == {
        "name": "sni",
        "format": "Definition: {definition}\n\nNow complete the following example -\nInput: {input}\nOutput: ",
        "num_pos_examples": 0,
        "chat": False,
    }
    assert "example_format" in Template("sni", num_pos_examples=2).describe()


def test_bad_template_options():
    with pytest.raises(ValueError, match="template 'nope' is not known"):
        Template("nope")
    with pytest.raises(ValueError, match="needs the 'sni' template"):
        Template("alpaca", num_pos_examples=1)
