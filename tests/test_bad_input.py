"""Bad input gets a clear error naming the bad value and what was expected, and loses nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, tiny_model
from safetensors.torch import save_file

from flora import AdapterModel, LoraConfig
from flora.io import CONFIG_NAME, WEIGHTS_NAME


@pytest.fixture
def model():
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("known", LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    return model


def test_unknown_adapter_name_lists_loaded_ones(model):
    ids, mask = batch(rows=2)
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) 'nope'.*\['known', 'other'\]"):
        model(ids, attention_mask=mask, adapter_names=["known", "nope"])
    with pytest.raises(ValueError, match="unknown adapter 'nope'.*known"):
        model.delete_adapter("nope")


def test_adapter_names_of_wrong_length(model):
    ids, mask = batch(rows=3)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        model(ids, attention_mask=mask, adapter_names=["known", None])
    with pytest.raises(ValueError, match="adapter_names has 4 entries but the batch has 3 rows"):
        model.generate(ids, attention_mask=mask, adapter_names=["known"] * 4, max_new_tokens=2)


def test_duplicate_adapter_name_is_refused_and_keeps_the_first(model):
    before = {k: v.clone() for k, v in model.adapter_parameters("known").items()}
    with pytest.raises(ValueError, match="an adapter named 'known' is already loaded"):
        model.add_adapter("known", LoraConfig(r=4))
    after = model.adapter_parameters("known")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_invalid_adapter_name(model):
    with pytest.raises(ValueError, match="adapter name 'a.b' is invalid"):
        model.add_adapter("a.b", LoraConfig())


def test_adapter_with_wrong_shapes_names_layer_and_shapes(model, tmp_path):
    bigger = AdapterModel(tiny_model("llama"))
    bigger.add_adapter("x", LoraConfig(r=2, target_modules=["q_proj"]))
    bigger.save_adapter("x", tmp_path / "x")
    tensors = {}
    from safetensors.torch import load_file

    for key, tensor in load_file(tmp_path / "x" / WEIGHTS_NAME).items():
        tensors[key] = torch.zeros(tensor.shape[0], 64) if "lora_A" in key else tensor
    save_file(tensors, tmp_path / "x" / WEIGHTS_NAME)
    before = model.state_dict()
    with pytest.raises(
        ValueError,
        match=r"layer model\.layers\.0\.self_attn\.q_proj: lora_A\.weight has shape \(2, 64\).*needs \(2, 32\)",
    ):
        model.load_adapter(tmp_path / "x", adapter_name="wrong")
    assert model.list_adapters() == ["known", "other"]
    assert model.state_dict().keys() == before.keys()


def test_adapter_for_a_layer_the_base_lacks(model, tmp_path):
    gpt2 = AdapterModel(tiny_model("gpt2"))
    gpt2.add_adapter("g", LoraConfig(r=2, target_modules=["c_attn"]))
    gpt2.save_adapter("g", tmp_path / "g")
    with pytest.raises(
        ValueError, match=r"layer 'transformer\.h\.0\.attn\.c_attn' is not a Linear/Conv1D layer.*another model"
    ):
        model.load_adapter(tmp_path / "g", adapter_name="g")
    assert model.list_adapters() == ["known", "other"]


def test_directory_without_config(tmp_path, model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_NAME}"):
        model.load_adapter(tmp_path / "empty", adapter_name="e")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.load_adapter(tmp_path / "missing", adapter_name="e")


def test_pickle_weights_are_refused_never_unpickled(tmp_path, model):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))

    class Bomb:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    import pickle

    (directory / "adapter_model.bin").write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle file, which flora refuses to load"):
        model.load_adapter(directory, adapter_name="p")


def test_corrupt_safetensors_and_config(tmp_path, model):
    model.save_adapter("known", tmp_path / "k")
    (tmp_path / "k" / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        model.load_adapter(tmp_path / "k", adapter_name="k")
    (tmp_path / "k" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        model.load_adapter(tmp_path / "k", adapter_name="k")


def test_unsupported_peft_options_and_types(tmp_path, model):
    model.save_adapter("known", tmp_path / "k")
    config = json.loads((tmp_path / "k" / CONFIG_NAME).read_text())
    (tmp_path / "k" / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="option use_dora=True is not supported"):
        model.load_adapter(tmp_path / "k", adapter_name="k")
    (tmp_path / "k" / CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "VERA"}))
    with pytest.raises(ValueError, match="peft_type 'VERA' is not supported"):
        model.load_adapter(tmp_path / "k", adapter_name="k")


def test_target_modules_matching_nothing(model):
    with pytest.raises(ValueError, match=r"target_modules=\['query'\] matches no Linear"):
        model.add_adapter("q", LoraConfig(target_modules=["query"]))
    assert model.list_adapters() == ["known", "other"]


def test_unknown_strategy(model):
    with pytest.raises(ValueError, match="strategy 'fast' is unknown"):
        model.strategy = "fast"


def test_delete_adapter_restores_plain_layers(model):
    model.delete_adapter("known")
    model.delete_adapter("other")
    assert model.list_adapters() == []
    assert model.base_model.state_dict().keys() == tiny_model("llama").state_dict().keys()
