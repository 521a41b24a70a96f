"""The model: `AdapterModel` (`flora.model.adapter_model`) with its adapted layers (`flora.model.layer`),
its prompt- and prefix-tuning rows (`flora.model.virtual_tokens`) and merging (`flora.model.merge`)."""

from flora.model.adapter_model import BASE_NAME, STRATEGIES, AdapterModel, StepOutput

__all__ = ["BASE_NAME", "STRATEGIES", "AdapterModel", "StepOutput"]
