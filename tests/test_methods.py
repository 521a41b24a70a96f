"""Every method is one entry of `flora.methods.METHODS`, which the library, training and studies read;
a new method is one module (its config and its bank) and that entry (``docs/architecture.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from conftest import VOCAB, tiny_model
from torch import nn

from flora import AdapterModel, LoraConfig
from flora.methods import METHODS, AdapterConfig, Bank, Method
from flora.model import STRATEGIES
from flora.study import tables
from flora.study.spec import SIZE_SETTINGS
from flora.training.hyperparameters import config_class, method_names


def test_the_library_training_and_studies_read_one_entry_per_method():
    assert list(METHODS) == [method.config.peft_type for method in METHODS.values()]
    assert method_names() == ["full", *(method.name for method in METHODS.values())]
    assert all(config_class(method.name) is method.config for method in METHODS.values())
    assert SIZE_SETTINGS == {method.name: method.size for method in METHODS.values() if method.size}
    assert STRATEGIES == ("auto", "bmm", "loop", "segmented", "stacked", "flora")
    for method in METHODS.values():  # the report's names, kept free of torch in flora.study.tables
        assert tables.METHOD_NAMES[method.name] == method.title
        assert tables.SIZE_NAMES.get(method.name) == method.size_label
        assert tables.SIZE_AXES.get(method.name) == method.size_axis
    assert {m.name for m in METHODS.values() if m.virtual} == {"prompt_tuning", "prefix_tuning"}


# The example of docs/architecture.md: a per-row output gain, ``y = (x W0ᵀ + b0) ∘ (1 + g)``.
@dataclass
class GainConfig(AdapterConfig):
    peft_type: ClassVar[str] = "GAIN"


class GainBank(Bank):
    method = "gain"
    strategies = ("gather",)
    param_names = ("gain",)

    def __init__(self, in_features, out_features, runtime) -> None:
        super().__init__(in_features, out_features, runtime)
        self.gain = nn.ParameterDict()

    def adapters(self) -> list[str]:
        return list(self.gain)

    @classmethod
    def shapes(cls, config, module_name, in_features, out_features):
        return {"gain": (out_features,)}

    def add(self, name, config, module_name, weights, like) -> None:
        gain = torch.zeros(self.out_features) if weights is None else weights["gain"]
        self.gain[name] = nn.Parameter(gain.to(like))

    def adapter_state(self, name):
        return {"gain": self.gain[name]}

    def merge_into(self, name, weight_oi, bias) -> None:
        weight_oi *= (1 + self.gain[name]).to(weight_oi)[:, None]
        if bias is not None:
            bias *= 1 + self.gain[name].to(bias)

    def output_step(self, batch, x, base):
        size = self.out_features
        gains = self.row_table(next(iter(self.gain.values())).new_zeros(size), self.gain.__getitem__)
        return lambda batch, x, out: (out.reshape(batch.batch_size, -1, size) * (1 + gains(batch)[:, None])).reshape(
            out.shape
        )


def test_a_new_method_is_one_bank_and_one_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, "GAIN", Method(GainConfig, GainBank, "Gain"))
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("g", GainConfig(target_modules=["o_proj", "down_proj"]))
    model.add_adapter("l", LoraConfig(r=2, target_modules=["o_proj"]))
    with torch.no_grad():
        for parameter in model.adapter_parameters("g").values():
            parameter.normal_(0, 0.3)
    model.save_adapter("g", tmp_path / "g")
    model.load_adapter(tmp_path / "g", adapter_name="g2")
    ids = torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    names = ["g", "l", None, "g2"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = (model.merge_adapter(name) if name else model.base_model)(ids[row : row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], alone, atol=2e-5, rtol=1e-4)
