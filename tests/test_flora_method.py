"""FLoRA (multiplicative, per-row) against a dense float64 reference that builds W_i = ΔW_i ∘ W0."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, tiny_model
from transformers.pytorch_utils import Conv1D

from flora import AdapterModel, FloraConfig, LoraConfig
from flora.model import STRATEGIES


def _dense_reference(base, adapter: dict[str, torch.Tensor], ids, mask):
    """Logits of one row through a float64 copy of ``base`` whose targeted weights are replaced by
    ``(Bᵀ A / r) ∘ W0``, computed here from the raw tensors (``adapter``: parameter name -> tensor)."""
    model = copy.deepcopy(base).double()
    with torch.no_grad():
        for key, a in adapter.items():
            if not key.endswith("flora_A.weight"):
                continue
            module_name = key.removesuffix(".flora_A.weight")
            b = adapter[module_name + ".flora_B.weight"].double()
            a = a.double()
            delta_in_out = torch.einsum("ri,ro->io", b, a) / a.shape[0]  # ΔW: [in, out], the paper's d x k
            module = model.get_submodule(module_name)
            if isinstance(module, Conv1D):  # weight is [in, out]
                module.weight.mul_(delta_in_out)
            else:  # weight is [out, in]
                module.weight.mul_(delta_in_out.T)
    return model(input_ids=ids, attention_mask=mask).logits


def _random_flora(model: AdapterModel, name: str, config: FloraConfig, seed: int) -> None:
    model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_parameters(name).values():
            parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_flora_mixed_batch_equals_dense_float64_reference(arch, strategy):
    base = tiny_model(arch)
    model = AdapterModel(tiny_model(arch), strategy=strategy)
    targets = {
        "llama": ["q_proj", "k_proj", "down_proj"],
        "qwen2": ["q_proj", "k_proj", "down_proj"],
        "gpt2": ["c_attn", "c_fc"],
    }[arch]
    _random_flora(model, "r1", FloraConfig(r=1, target_modules=targets), seed=1)
    _random_flora(model, "r3", FloraConfig(r=3, target_modules=targets[:2]), seed=2)
    ids, mask = batch()
    names = ["r1", "r3", None, "r3", "r1", None]
    got = model(ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        adapter = {k: v.detach() for k, v in model.adapter_parameters(name).items()} if name else {}
        expected = _dense_reference(base, adapter, ids[row : row + 1], mask[row : row + 1])[0]
        assert (got[row].double() - expected).abs().max() <= 1e-4


def test_new_flora_adapter_is_the_identity(arch):
    base = tiny_model(arch)
    model = AdapterModel(tiny_model(arch))
    model.add_adapter("fresh", FloraConfig(r=2))
    ids, mask = batch()
    got = model(ids, attention_mask=mask, adapter_names=["fresh"] * len(ids)).logits
    assert (got - base(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-5


def test_flora_lora_and_base_rows_mix_in_one_layer(arch):
    """One layer holding a LoRA and a FLoRA bank: each row equals that adapter run alone."""
    model = AdapterModel(tiny_model(arch))
    _random_flora(model, "mul", FloraConfig(r=2), seed=5)
    model.add_adapter("add", LoraConfig(r=4, alpha=4))
    with torch.no_grad():
        for key, parameter in model.adapter_parameters("add").items():
            if "lora_B" in key:
                parameter.normal_(0, 0.2)
    ids, mask = batch()
    names = ["mul", "add", None, "add", "mul", None]
    got = model(ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        alone = model(ids[row : row + 1], attention_mask=mask[row : row + 1], adapter_names=[name]).logits[0]
        assert (got[row] - alone).abs().max() <= 1e-5


def test_generate_mixed_batch_equals_each_adapter_alone():
    model = AdapterModel(tiny_model("llama"))
    _random_flora(model, "mul", FloraConfig(r=1), seed=7)
    model.add_adapter("add", LoraConfig(r=4, alpha=16))
    with torch.no_grad():
        for key, parameter in model.adapter_parameters("add").items():
            if "lora_B" in key:
                parameter.normal_(0, 0.5)
    ids, mask = batch(rows=4)
    names = ["mul", "add", None, "add"]
    together = model.generate(
        ids, attention_mask=mask, adapter_names=names, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    for row, name in enumerate(names):
        alone = model.generate(
            ids[row : row + 1],
            attention_mask=mask[row : row + 1],
            adapter_names=[name],
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
        assert torch.equal(together[row, ids.shape[1] :], alone[0, ids.shape[1] :])
    assert not torch.equal(together[0], together[2]) or not torch.equal(together[1], together[2])
