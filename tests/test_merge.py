"""Merged models keep what they merged: `merge_adapter` -> ``save_pretrained`` -> ``from_pretrained``
gives the logits of the adapter, for every mergeable method on tiny Llama, Qwen2 and GPT-2; where the
config cannot declare what the merge adds, a clear refusal instead of a model that loses it."""

from __future__ import annotations

import pytest
import torch
from conftest import TARGETS, batch, tiny_model
from transformers import AutoModelForCausalLM

from flora import AdapterModel, BitFitConfig, FloraConfig, Ia3Config, LoraConfig

ATOL = 1e-5
QWEN2_BIASED = ["q_proj", "k_proj", "v_proj"]  # Qwen2's only Linear layers with a bias


def _config(method: str, arch: str):
    _, _, ia3_targets, feedforward = TARGETS[arch]
    return {
        "lora": LoraConfig(r=4, alpha=8),
        "ia3": Ia3Config(target_modules=ia3_targets, feedforward_modules=feedforward),
        "flora": FloraConfig(r=2),
        "bitfit": BitFitConfig(target_modules=QWEN2_BIASED if arch == "qwen2" else "all-linear"),
    }[method]


def _with_random_adapter(arch: str, config, name: str = "a") -> AdapterModel:
    """An AdapterModel with adapter ``name`` moved well away from its identity initialisation."""
    model = AdapterModel(tiny_model(arch))
    model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.adapter_parameters(name).values():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def _reloaded(merged, directory):
    """``merged`` saved and loaded back as a plain transformers model; asserts nothing was left out."""
    merged.save_pretrained(directory)
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _logits(model, ids, mask, adapter: str | None = None):
    if isinstance(model, AdapterModel):
        return model(ids, attention_mask=mask, adapter_names=[adapter] * len(ids)).logits
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", ["lora", "ia3", "flora", "bitfit"])
def test_merged_model_reloads_with_the_adapters_logits(method, arch, tmp_path):
    model = _with_random_adapter(arch, _config(method, arch))
    ids, mask = batch()
    expected = _logits(model, ids, mask, "a")
    assert (expected - _logits(model, ids, mask)).abs().max() > 1e-2  # a dropped weight would show
    reloaded = _reloaded(model.merge_adapter("a"), tmp_path / "merged")
    assert type(reloaded) is type(tiny_model(arch))
    assert (_logits(reloaded, ids, mask) - expected).abs().max() <= ATOL


def test_bitfit_merge_on_llama_declares_the_biases_it_adds(tmp_path):
    """A bias on q_proj only: the config gains ``attention_bias`` (k/v/o_proj get zero biases), not ``mlp_bias``."""
    model = _with_random_adapter("llama", BitFitConfig(target_modules=["q_proj"]))
    merged = model.merge_adapter("a")
    assert (merged.config.attention_bias, merged.config.mlp_bias) == (True, False)
    assert (model.config.attention_bias, model.config.mlp_bias) == (False, False)  # the base model is untouched
    reloaded = _reloaded(merged, tmp_path / "merged")
    attention = reloaded.model.layers[1].self_attn
    delta = model.adapter_parameters("a")["model.layers.1.self_attn.q_proj.bitfit_bias"]
    assert torch.equal(attention.q_proj.bias, delta)
    for layer in (attention.k_proj, attention.v_proj, attention.o_proj):
        assert torch.equal(layer.bias, torch.zeros(layer.out_features))
    assert reloaded.model.layers[1].mlp.up_proj.bias is None


def test_bitfit_merge_refuses_biases_the_config_cannot_declare():
    """Qwen2's o_proj and MLP layers have no bias and no config option for one: merging them is refused."""
    model = _with_random_adapter("qwen2", BitFitConfig())
    ids, mask = batch()
    before = _logits(model, ids, mask, "a")
    with pytest.raises(ValueError) as error:
        model.merge_adapter("a")
    message = str(error.value)
    assert message.startswith("cannot merge adapter 'a' (BITFIT) into Qwen2ForCausalLM: the merge adds biases to ")
    for layer in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"model.layers.*.{layer}" in message.split("which")[0]
    assert "Qwen2Config has no option to declare, so save_pretrained + from_pretrained would drop them" in message
    assert "with a bias of their own: model.layers.*.self_attn.k_proj, model.layers.*.self_attn.q_proj" in message
    # nothing is lost: the adapter still runs unmerged
    assert model.list_adapters() == ["a"]
    assert torch.equal(_logits(model, ids, mask, "a"), before)


def test_merge_into_a_tied_output_layer_unties_it(tmp_path):
    """GPT-2 ties lm_head to the token embeddings: a LoRA on lm_head changes the output layer only."""
    model = _with_random_adapter("gpt2", LoraConfig(r=2, target_modules=["lm_head", "c_attn"]))
    ids, mask = batch()
    expected = _logits(model, ids, mask, "a")
    merged = model.merge_adapter("a")
    assert merged.config.tie_word_embeddings is False and model.config.tie_word_embeddings is True
    assert torch.equal(merged.transformer.wte.weight, model.base_model.transformer.wte.weight)
    reloaded = _reloaded(merged, tmp_path / "merged")
    assert (_logits(reloaded, ids, mask) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not torch.equal(reloaded.lm_head.weight, reloaded.transformer.wte.weight)
