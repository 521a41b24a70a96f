"""Prompt templates: turn a `Sample` (definition, input, demonstrations) into the text a model sees.

- ``"sni"``: the Super-NaturalInstructions definition-only template used by the PEFT study
  (`SNI_TEMPLATE`), optionally with the task's first k positive examples between the definition
  and the instance (`SNI_EXAMPLE`, modelled on Tk-Instruct's layout without its leading spaces
  and appended periods, which would change the expected outputs).
- ``"alpaca"``: the Stanford Alpaca template (with and without an input).
- ``"plain"``: the input verbatim (prompt/completion data).

Any of them can be wrapped in the model's own chat template (``chat=True``: one user turn, then
the generation prompt). `Template.describe` is what gets recorded with every result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flora.data.formats import UNCATEGORIZED, AlpacaRecord, Example, PromptCompletion, Task

SNI_TEMPLATE = "Definition: {definition}\n\nNow complete the following example -\nInput: {input}\nOutput: "
SNI_EXAMPLE = "Positive Example {index} -\nInput: {input}\nOutput: {output}\n\n"
SNI_WITH_EXAMPLES = (
    "Definition: {definition}\n\n{examples}Now complete the following example -\nInput: {input}\nOutput: "
)
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PLAIN_TEMPLATE = "{input}"
TEMPLATE_NAMES = ("sni", "alpaca", "plain")


@dataclass(frozen=True)
class Sample:
    """One row to prompt with: a task's definition, an instance's input and its references."""

    task: str
    id: str
    definition: str
    input: str
    references: tuple[str, ...]
    category: str = UNCATEGORIZED
    metric: str = "rougeL"
    examples: tuple[Example, ...] = field(default=(), repr=False)


def samples_from_tasks(tasks: Sequence[Task], max_instances: int | None = None) -> list[Sample]:
    """One `Sample` per instance (the first ``max_instances`` of each task when given)."""
    samples = []
    for task in tasks:
        instances = task.instances if max_instances is None else task.instances[:max_instances]
        for instance in instances:
            samples.append(
                Sample(task.name, instance.id, task.definition, instance.input, instance.references,
                       task.category, task.primary_metric, tuple(task.positive_examples))
            )  # fmt: skip
    return samples


def samples_from_alpaca(records: Sequence[AlpacaRecord], task: str, metric: str = "rougeL") -> list[Sample]:
    """Alpaca records as samples of one pseudo-task ``task`` (ids ``"<task>-<index>"``)."""
    return [
        Sample(task, f"{task}-{index}", r.instruction, r.input, (r.output,), task, metric)
        for index, r in enumerate(records)
    ]


def samples_from_prompt_completion(
    records: Sequence[PromptCompletion], task: str, metric: str = "rougeL"
) -> list[Sample]:
    """Prompt/completion records as samples (use them with the ``"plain"`` template)."""
    return [
        Sample(task, f"{task}-{index}", "", r.prompt, (r.completion,), task, metric) for index, r in enumerate(records)
    ]


@dataclass(frozen=True)
class Template:
    """How a sample becomes a prompt.

    Args:
        name: ``"sni"``, ``"alpaca"`` or ``"plain"``.
        num_pos_examples: (``"sni"`` only) how many of the task's positive examples to show.
        chat: wrap the text in the tokenizer's chat template as one user turn.
    """

    name: str = "sni"
    num_pos_examples: int = 0
    chat: bool = False

    def __post_init__(self) -> None:
        if self.name not in TEMPLATE_NAMES:
            raise ValueError(f"template {self.name!r} is not known (expected one of {', '.join(TEMPLATE_NAMES)})")
        if self.num_pos_examples < 0:
            raise ValueError(f"num_pos_examples={self.num_pos_examples}: expected a number >= 0")
        if self.num_pos_examples and self.name != "sni":
            raise ValueError(f"num_pos_examples={self.num_pos_examples} needs the 'sni' template (got {self.name!r})")

    def text(self, sample: Sample) -> str:
        """The prompt text before any chat wrapping."""
        if self.name == "plain":
            return PLAIN_TEMPLATE.format(input=sample.input)
        if self.name == "alpaca":
            if sample.input.strip():
                return ALPACA_TEMPLATE.format(instruction=sample.definition.strip(), input=sample.input.strip())
            return ALPACA_TEMPLATE_NO_INPUT.format(instruction=sample.definition.strip())
        if self.num_pos_examples == 0:
            return SNI_TEMPLATE.format(definition=sample.definition.strip(), input=sample.input.strip())
        if len(sample.examples) < self.num_pos_examples:
            raise ValueError(
                f"task {sample.task!r} has {len(sample.examples)} positive examples, "
                f"fewer than num_pos_examples={self.num_pos_examples}"
            )
        examples = "".join(
            SNI_EXAMPLE.format(index=index, input=example.input.strip(), output=example.output.strip())
            for index, example in enumerate(sample.examples[: self.num_pos_examples], start=1)
        )
        return SNI_WITH_EXAMPLES.format(
            definition=sample.definition.strip(), examples=examples, input=sample.input.strip()
        )

    def render(self, sample: Sample, tokenizer: Any = None) -> str:
        """The full prompt string; with ``chat=True`` it needs the tokenizer (its chat template)."""
        text = self.text(sample)
        if not self.chat:
            return text
        return apply_chat_template(tokenizer, text)

    def describe(self, tokenizer: Any = None) -> dict[str, Any]:
        """What is recorded with a result: the template's name, options and exact format strings."""
        if self.name == "sni":
            template = SNI_TEMPLATE if self.num_pos_examples == 0 else SNI_WITH_EXAMPLES
        elif self.name == "alpaca":
            template = {"with_input": ALPACA_TEMPLATE, "without_input": ALPACA_TEMPLATE_NO_INPUT}
        else:
            template = PLAIN_TEMPLATE
        description: dict[str, Any] = {"name": self.name, "format": template, "num_pos_examples": self.num_pos_examples}
        if self.num_pos_examples:
            description["example_format"] = SNI_EXAMPLE
        description["chat"] = self.chat
        if self.chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            source = tokenizer.chat_template
            description["chat_template_sha256"] = hashlib.sha256(str(source).encode()).hexdigest()
        return description


def apply_chat_template(tokenizer: Any, text: str) -> str:
    """``text`` as one user turn in the tokenizer's chat template, ending with the generation prompt."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template (this tokenizer has none)")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
