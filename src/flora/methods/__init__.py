"""PEFT methods, one module each: its config (PEFT's JSON names) and its bank layer.

`METHODS` maps a ``peft_type`` to ``(config class, bank class)``.
"""

from flora.methods.base import AdapterConfig, Bank
from flora.methods.bitfit import BitFitBank, BitFitConfig
from flora.methods.bottleneck import BottleneckBank, BottleneckConfig
from flora.methods.flora import FloraBank, FloraConfig
from flora.methods.ia3 import Ia3Bank, Ia3Config
from flora.methods.lora import LoraBank, LoraConfig

METHODS: dict[str, tuple[type[AdapterConfig], type[Bank]]] = {
    "LORA": (LoraConfig, LoraBank),
    "FLORA": (FloraConfig, FloraBank),
    "IA3": (Ia3Config, Ia3Bank),
    "BITFIT": (BitFitConfig, BitFitBank),
    "BOTTLENECK": (BottleneckConfig, BottleneckBank),
}


def method_for(peft_type: str, source: str = "adapter_config.json") -> tuple[type[AdapterConfig], type[Bank]]:
    """The config and bank classes of ``peft_type``; a clear error for an unknown one."""
    try:
        return METHODS[str(peft_type).upper()]
    except KeyError:
        raise ValueError(
            f"{source}: peft_type {peft_type!r} is not supported (expected one of {', '.join(METHODS)})"
        ) from None


__all__ = [
    "METHODS", "AdapterConfig", "Bank", "BitFitBank", "BitFitConfig", "BottleneckBank", "BottleneckConfig",
    "FloraBank", "FloraConfig", "Ia3Bank", "Ia3Config", "LoraBank", "LoraConfig", "method_for",
]  # fmt: skip
