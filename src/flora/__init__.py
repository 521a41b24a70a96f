"""flora: one base model, many parameter-efficient adapters, a different adapter for every row.

from flora import AdapterModel, LoraConfig
model = AdapterModel.from_pretrained("smollm2-135m")
model.add_adapter("x", LoraConfig(r=8, alpha=16))
ids = model.generate(input_ids, attention_mask=mask, adapter_names=["x", None], max_new_tokens=32)

Training (`flora.training`): ``flora.train(model=..., method="lora", settings={"r": 8}, ...)`` runs a
job (`flora.training.train`); ``flora train`` on the command line.

Every public name is imported on first use (PEP 562): ``import flora`` loads neither torch nor
transformers, so the command line (``flora --help``, ``flora --version``) answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "AdapterModel": "flora.model", "BitFitConfig": "flora.methods", "BottleneckConfig": "flora.methods",
    "FloraConfig": "flora.methods", "Ia3Config": "flora.methods", "LoraConfig": "flora.methods",
    "PrefixTuningConfig": "flora.methods.prefix", "PromptTuningConfig": "flora.methods.prompt",
    "load_base": "flora.base", "train": "flora.training",
}  # fmt: skip
__all__ = [
    "AdapterModel", "BitFitConfig", "BottleneckConfig", "FloraConfig", "Ia3Config", "LoraConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "load_base", "train",
]  # fmt: skip

if TYPE_CHECKING:
    from flora.base import load_base
    from flora.methods import BitFitConfig, BottleneckConfig, FloraConfig, Ia3Config, LoraConfig
    from flora.methods.prefix import PrefixTuningConfig
    from flora.methods.prompt import PromptTuningConfig
    from flora.model import AdapterModel
    from flora.training import train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
