"""flora against Hugging Face PEFT: same logits for adapters made, saved and loaded by either."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TARGETS, batch, tiny_model
from peft import IA3Config as PeftIA3Config
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from flora import AdapterModel, Ia3Config, LoraConfig
from flora.model import STRATEGIES

TOL = 1e-4


def _randomize(model, pattern: str, mean: float = 0.0, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if pattern in name:
                parameter.copy_(mean + 0.2 * torch.randn(parameter.shape, generator=generator))


def _peft_lora_pair(arch: str, tmp_path):
    """A PEFT model with LoRA adapters 'one' (r=4) and 'two' (r=2, rsLoRA, other targets), saved to disk."""
    targets_a, targets_b, _, _ = TARGETS[arch]
    fan = arch == "gpt2"
    peft_model = get_peft_model(
        tiny_model(arch),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets_a, fan_in_fan_out=fan),
        adapter_name="one",
    )
    peft_model.add_adapter(
        "two", PeftLoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=targets_b, fan_in_fan_out=fan)
    )
    _randomize(peft_model, "lora_B", seed=1)
    _randomize(peft_model, "lora_A", seed=2)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft", selected_adapters=["one", "two"])
    return peft_model, tmp_path / "peft" / "one", tmp_path / "peft" / "two"


def _flora_with(arch: str, adapters: dict, **kwargs) -> AdapterModel:
    model = AdapterModel(tiny_model(arch), **kwargs)
    for name, path in adapters.items():
        model.load_adapter(path, adapter_name=name)
    return model


def test_lora_single_adapter_matches_peft(arch, tmp_path):
    peft_model, dir_a, dir_b = _peft_lora_pair(arch, tmp_path)
    model = _flora_with(arch, {"one": dir_a, "two": dir_b})
    ids, mask = batch()
    for name in ("one", "two"):
        peft_model.set_adapter(name)
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask, adapter_names=[name] * len(ids)).logits
        assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_mixed_batch_matches_peft_adapter_names(arch, tmp_path, strategy):
    peft_model, dir_a, dir_b = _peft_lora_pair(arch, tmp_path)
    model = _flora_with(arch, {"one": dir_a, "two": dir_b}, strategy=strategy)
    ids, mask = batch()
    names = ["one", "two", "__base__", "two", "one", "one"]
    expected = peft_model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    got = model(ids, attention_mask=mask, adapter_names=[None if n == "__base__" else n for n in names]).logits
    assert (got - expected).abs().max() <= TOL
    bare = tiny_model(arch)(input_ids=ids, attention_mask=mask).logits
    assert (got[2] - bare[2]).abs().max() <= TOL


def test_ia3_matches_peft_per_adapter_and_mixed(arch, tmp_path):
    _, _, targets, feedforward = TARGETS[arch]
    peft_model = get_peft_model(
        tiny_model(arch),
        PeftIA3Config(target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=arch == "gpt2"),
        adapter_name="x",
    )
    peft_model.add_adapter(
        "y", PeftIA3Config(target_modules=targets[:1], feedforward_modules=[], fan_in_fan_out=arch == "gpt2")
    )
    _randomize(peft_model, "ia3_l", mean=1.0, seed=3)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "ia3", selected_adapters=["x", "y"])
    model = _flora_with(arch, {"x": tmp_path / "ia3" / "x", "y": tmp_path / "ia3" / "y"})
    ids, mask = batch()
    expected = {}
    for name in ("x", "y"):
        peft_model.set_adapter(name)
        expected[name] = peft_model(input_ids=ids, attention_mask=mask).logits
    expected[None] = tiny_model(arch)(input_ids=ids, attention_mask=mask).logits
    names = ["x", "y", None, "x", "y", None]
    got = model(ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        assert (got[row] - expected[name][row]).abs().max() <= TOL


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_flora_saved_adapters_load_into_peft(arch, tmp_path, method):
    targets_a, _, ia3_targets, feedforward = TARGETS[arch]
    model = AdapterModel(tiny_model(arch))
    if method == "lora":
        model.add_adapter("mine", LoraConfig(r=3, alpha=6, target_modules=targets_a))
        _randomize(model, "lora_B", seed=4)
    else:
        model.add_adapter("mine", Ia3Config(target_modules=ia3_targets, feedforward_modules=feedforward))
        _randomize(model, "ia3_l", mean=1.0, seed=4)
    model.save_adapter("mine", tmp_path / "mine")
    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "mine").eval()
    ids, mask = batch()
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask, adapter_names=["mine"] * len(ids)).logits
    assert (got - expected).abs().max() <= TOL
    # and back: a round trip through flora keeps the tensors bit for bit
    again = AdapterModel(tiny_model(arch))
    again.load_adapter(tmp_path / "mine", adapter_name="mine")
    for key, tensor in model.adapter_parameters("mine").items():
        assert torch.equal(tensor, again.adapter_parameters("mine")[key])


def test_merge_adapter_gives_plain_model_with_same_logits(arch, tmp_path):
    peft_model, dir_a, dir_b = _peft_lora_pair(arch, tmp_path)
    model = _flora_with(arch, {"one": dir_a})
    merged = model.merge_adapter("one")
    assert type(merged) is type(tiny_model(arch))
    ids, mask = batch()
    peft_model.set_adapter("one")
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (merged(input_ids=ids, attention_mask=mask).logits - expected).abs().max() <= TOL
    assert copy.deepcopy(merged).state_dict().keys() == tiny_model(arch).state_dict().keys()
