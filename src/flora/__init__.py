"""flora: one base model, many parameter-efficient adapters, a different adapter for every row.

from flora import AdapterModel, LoraConfig
model = AdapterModel.from_pretrained("smollm2-135m")
model.add_adapter("x", LoraConfig(r=8, alpha=16))
ids = model.generate(input_ids, attention_mask=mask, adapter_names=["x", None], max_new_tokens=32)
"""

from flora.base import load_base
from flora.methods import BitFitConfig, BottleneckConfig, FloraConfig, Ia3Config, LoraConfig
from flora.methods.prefix import PrefixTuningConfig
from flora.methods.prompt import PromptTuningConfig
from flora.model import AdapterModel

__all__ = [
    "AdapterModel", "BitFitConfig", "BottleneckConfig", "FloraConfig", "Ia3Config", "LoraConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "load_base",
]  # fmt: skip
__version__ = "0.1.0"
