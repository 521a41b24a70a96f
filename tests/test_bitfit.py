"""BitFit (a per-adapter bias delta on each targeted layer's output) as a per-row bank."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import adam_losses, batch, tiny_model

from flora import AdapterModel, BitFitConfig
from flora.methods import METHODS, BitFitBank
from flora.model import STRATEGIES

TARGETS_B = {"llama": ["q_proj", "down_proj"], "qwen2": ["v_proj", "up_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}


def _random_bitfit(model: AdapterModel, name: str, config: BitFitConfig, seed: int) -> None:
    model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_parameters(name).values():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def _reference(base, adapter: dict[str, torch.Tensor], ids, mask) -> torch.Tensor:
    """Float64 logits of ``base`` with ``y + Δb`` hooked onto every module of ``adapter``
    (``"<module>.bitfit_bias" -> Δb``), written from the formula."""
    model = copy.deepcopy(base).double()
    for key, delta in adapter.items():
        module = model.get_submodule(key.removesuffix(".bitfit_bias"))
        delta = delta.detach().double()
        module.register_forward_hook(lambda m, args, out, d=delta: out + d)
    return model(input_ids=ids, attention_mask=mask).logits


def _mixed_model(arch: str, strategy: str = "auto") -> AdapterModel:
    model = AdapterModel(tiny_model(arch), strategy=strategy)
    _random_bitfit(model, "a", BitFitConfig(), seed=1)
    _random_bitfit(model, "b", BitFitConfig(target_modules=TARGETS_B[arch]), seed=2)
    return model


def test_bitfit_is_registered_and_exported():
    assert METHODS["BITFIT"].config is BitFitConfig and METHODS["BITFIT"].bank is BitFitBank
    assert BitFitConfig().target_modules == "all-linear"


def test_new_bitfit_adapter_is_the_identity(arch):
    base = tiny_model(arch)
    model = AdapterModel(tiny_model(arch))
    model.add_adapter("fresh", BitFitConfig())
    ids, mask = batch()
    got = model(ids, attention_mask=mask, adapter_names=["fresh"] * len(ids)).logits
    assert torch.equal(got, base(input_ids=ids, attention_mask=mask).logits)
    assert all(p.abs().sum() == 0 for p in model.adapter_parameters("fresh").values())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bitfit_mixed_batch_equals_rows_alone_and_float64_reference(arch, strategy):
    base = tiny_model(arch)
    model = _mixed_model(arch, strategy)
    ids, mask = batch(rows=4)
    names = ["a", None, "b", "a"]
    got = model(ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        one = ids[row : row + 1], mask[row : row + 1]
        alone = model(one[0], attention_mask=one[1], adapter_names=[name]).logits[0]
        assert (got[row] - alone).abs().max() <= 1e-5, (row, name)
        adapter = model.adapter_parameters(name) if name else {}
        expected = _reference(base, adapter, *one)[0]
        assert (got[row].double() - expected).abs().max() <= 1e-4, (row, name)
    bare = base(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got[1], bare[1])
    assert (got[0] - bare[0]).abs().max() > 1e-3  # the adapters do something


def test_bitfit_save_then_load_gives_identical_logits(arch, tmp_path):
    model = _mixed_model(arch)
    path = model.save_adapter("b", tmp_path / "b")
    data = json.loads((path / "adapter_config.json").read_text())
    assert data["peft_type"] == "BITFIT" and data["target_modules"] == TARGETS_B[arch]
    again = AdapterModel(tiny_model(arch))
    again.load_adapter(path, adapter_name="b")
    assert again.adapter_parameters("b").keys() == model.adapter_parameters("b").keys()
    assert all(k.endswith(".bitfit_bias") for k in again.adapter_parameters("b"))
    ids, mask = batch()
    names = ["b", None] * 3
    expected = model(ids, attention_mask=mask, adapter_names=names).logits
    assert torch.equal(again(ids, attention_mask=mask, adapter_names=names).logits, expected)


def test_bitfit_gradients_reach_only_the_adapters_in_the_batch():
    model = _mixed_model("llama")
    _random_bitfit(model, "unused", BitFitConfig(), seed=3)
    model.train()
    ids, mask = batch(rows=4)
    names = ["a", None, "b", "a"]
    loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), adapter_names=names).loss
    loss.backward()
    for name in ("a", "b"):
        for key, parameter in model.adapter_parameters(name).items():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, (name, key)
    assert all(p.grad is None for p in model.adapter_parameters("unused").values())
    assert all(p.grad is None for p in model.base_model.parameters() if not p.requires_grad)


def test_bitfit_training_lowers_the_loss():
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("t", BitFitConfig())
    model.train()
    ids, mask = batch(rows=4)
    labels = ids.masked_fill(mask == 0, -100)
    losses = adam_losses(model, ids, mask, labels, ["t"] * len(ids), lr=1e-2, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bitfit_merge_adds_the_delta_to_the_bias(arch):
    """Llama projections have no bias: merging creates one; GPT-2's Conv1D biases are added to.
    (Qwen2 has no config option for biases on o_proj and the MLP: test_merge.py tests the refusal.)"""
    model = _mixed_model(arch)
    merged = model.merge_adapter("a")
    assert type(merged) is type(tiny_model(arch))
    ids, mask = batch()
    expected = model(ids, attention_mask=mask, adapter_names=["a"] * len(ids)).logits
    assert (merged(input_ids=ids, attention_mask=mask).logits - expected).abs().max() <= 1e-5
    # the AdapterModel's own base layers are untouched
    bare = tiny_model(arch)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(model(ids, attention_mask=mask).logits, bare)


def test_bitfit_load_rejects_a_wrong_shape(tmp_path):
    model = _mixed_model("llama")
    path = model.save_adapter("b", tmp_path / "b")
    other = AdapterModel(tiny_model("gpt2"))
    with pytest.raises(ValueError, match="not a Linear/Conv1D layer"):
        other.load_adapter(path, adapter_name="b")
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3)
    save_file(tensors, path / "adapter_model.safetensors")
    fresh = AdapterModel(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"bitfit_bias has shape \(3,\)"):
        fresh.load_adapter(path, adapter_name="b")
    assert fresh.list_adapters() == []
