"""flora: one base model, many parameter-efficient adapters, a different adapter for every row.

from flora import AdapterModel, LoraConfig
model = AdapterModel.from_pretrained("smollm2-135m")
model.add_adapter("x", LoraConfig(r=8, alpha=16))
ids = model.generate(input_ids, attention_mask=mask, adapter_names=["x", None], max_new_tokens=32)

Training (`flora.training`): ``flora.train(model=..., method="lora", settings={"r": 8}, ...)`` runs a
job (`flora.training.train`); ``flora train`` on the command line.
"""

from typing import Any

from flora.base import load_base
from flora.methods import BitFitConfig, BottleneckConfig, FloraConfig, Ia3Config, LoraConfig
from flora.methods.prefix import PrefixTuningConfig
from flora.methods.prompt import PromptTuningConfig
from flora.model import AdapterModel

__all__ = [
    "AdapterModel", "BitFitConfig", "BottleneckConfig", "FloraConfig", "Ia3Config", "LoraConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "load_base", "train",
]  # fmt: skip
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``flora.train`` is `flora.training.train`, imported on first use: ``import flora`` stays light
    # (no transformers.Trainer).
    if name == "train":
        from flora.training import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "train"})
