"""PEFT methods, one module each, and `METHODS`: every method registered once, by its ``peft_type``.

A `Method` is all that the rest of flora knows of a method: its config class (PEFT's JSON names),
the bank that holds its adapters in a layer (``None`` for the virtual-token methods, which
`flora.model.virtual_tokens` applies), the strategies that bank has, and how studies size and
name it. Adding a method is one module (its config and its bank, see ``docs/architecture.md``)
and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from flora.methods.base import AdapterConfig, Bank
from flora.methods.bitfit import BitFitBank, BitFitConfig
from flora.methods.bottleneck import BottleneckBank, BottleneckConfig
from flora.methods.flora import FloraBank, FloraConfig
from flora.methods.ia3 import Ia3Bank, Ia3Config
from flora.methods.lora import LoraBank, LoraConfig
from flora.methods.prefix import PrefixTuningConfig
from flora.methods.prompt import PromptLearningConfig, PromptTuningConfig


@dataclass(frozen=True)
class Method:
    """One method. ``config``: its config class (``config.peft_type`` is its file's ``peft_type``);
    ``bank``: its `Bank` class, ``None`` for a virtual-token method; ``title``: its name in reports;
    ``size``: the config field a study's ``size`` sets (``None``: it has none), ``size_label`` and
    ``size_axis`` its names in tables and on figure axes."""

    config: type[AdapterConfig] | type[PromptLearningConfig]
    bank: type[Bank] | None
    title: str
    size: str | None = None
    size_label: str | None = None
    size_axis: str | None = None

    @property
    def name(self) -> str:
        """What ``method=`` calls it: ``"lora"``, ``"prompt_tuning"``, ..."""
        return self.config.peft_type.lower()

    @property
    def virtual(self) -> bool:
        """Whether it adds virtual tokens (prompt or prefix tuning) rather than changing layers."""
        return self.bank is None

    @property
    def strategies(self) -> tuple[str, ...]:
        return () if self.bank is None else self.bank.strategies


METHODS: dict[str, Method] = {method.config.peft_type: method for method in (
    Method(LoraConfig, LoraBank, "LoRA", "r", "r", "rank"),
    Method(FloraConfig, FloraBank, "FLoRA", "r", "r", "rank"),
    Method(Ia3Config, Ia3Bank, "IA3"),
    Method(BitFitConfig, BitFitBank, "BitFit"),
    Method(BottleneckConfig, BottleneckBank, "Adapter", "size", "size", "adapter size"),
    Method(PromptTuningConfig, None, "Prompt tuning", "num_virtual_tokens", "tokens", "virtual tokens"),
    Method(PrefixTuningConfig, None, "Prefix tuning", "num_virtual_tokens", "tokens", "virtual tokens"),
)}  # fmt: skip


def method_for(peft_type: object, source: str = "adapter_config.json") -> Method:
    """The method of ``peft_type`` (any case); a clear error for an unknown one."""
    try:
        return METHODS[str(peft_type).upper()]
    except KeyError:
        raise ValueError(
            f"{source}: peft_type {peft_type!r} is not supported (expected one of {', '.join(METHODS)})"
        ) from None


__all__ = [
    "METHODS", "AdapterConfig", "Bank", "BitFitBank", "BitFitConfig", "BottleneckBank", "BottleneckConfig",
    "FloraBank", "FloraConfig", "Ia3Bank", "Ia3Config", "LoraBank", "LoraConfig", "Method", "PrefixTuningConfig",
    "PromptTuningConfig", "method_for",
]  # fmt: skip
