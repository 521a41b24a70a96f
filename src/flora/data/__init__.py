"""Instruction data: loaders (Super-NaturalInstructions, Alpaca, prompt/completion JSONL), prompt
templates, the built-in synthetic task suite, and token-id encoding/collation for training and
generation.

    from flora.data import load_sni, samples_from_tasks, Template, encode_prompt, encode_example
    tasks = load_sni("data/tasks", "data/splits/default/test_tasks.txt")
    samples = samples_from_tasks(tasks, max_instances=100)
    prompt = Template("sni").render(samples[0])
"""

from flora.data.encoding import (
    IGNORE_INDEX,
    LeftPadCollator,
    bos_prefix,
    collate_examples,
    collate_prompts,
    encode_example,
    encode_prompt,
)
from flora.data.formats import (
    AlpacaRecord,
    DataFormatError,
    Example,
    Instance,
    PromptCompletion,
    Task,
    detect_format,
    load_alpaca,
    load_prompt_completion,
    load_sni,
    load_sni_task,
    parse_sni_task,
    read_task_names,
    write_sni_task,
)
from flora.data.suite import SPECS, Suite, TaskSpec, build_suite, default_split
from flora.data.templates import (
    ALPACA_TEMPLATE,
    SNI_TEMPLATE,
    Sample,
    Template,
    samples_from_alpaca,
    samples_from_prompt_completion,
    samples_from_tasks,
)

__all__ = [
    "ALPACA_TEMPLATE", "IGNORE_INDEX", "SNI_TEMPLATE", "SPECS", "AlpacaRecord", "DataFormatError", "Example",
    "Instance", "LeftPadCollator", "PromptCompletion", "Sample", "Suite", "Task", "TaskSpec", "Template",
    "bos_prefix", "build_suite", "collate_examples", "collate_prompts", "default_split", "detect_format",
    "encode_example", "encode_prompt", "load_alpaca", "load_prompt_completion", "load_sni", "load_sni_task",
    "parse_sni_task", "read_task_names", "samples_from_alpaca", "samples_from_prompt_completion",
    "samples_from_tasks", "write_sni_task",
]  # fmt: skip
