"""Bottleneck adapters (``y + W_up σ(W_down y)`` on a layer's output) as a per-row bank."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import adam_losses, batch, tiny_model

from flora import AdapterModel, BitFitConfig, BottleneckConfig, Ia3Config, LoraConfig
from flora.methods import METHODS, BottleneckBank
from flora.model import STRATEGIES

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
HOULSBY = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj")}
HOULSBY["qwen2"] = HOULSBY["llama"]


def _random_bottleneck(model: AdapterModel, name: str, config: BottleneckConfig, seed: int) -> None:
    model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_parameters(name).values():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def _reference(base, adapter: dict[str, torch.Tensor], activation: str, ids, mask) -> torch.Tensor:
    """Float64 logits of ``base`` with ``y + σ(y W_downᵀ) W_upᵀ`` hooked onto every module of
    ``adapter`` (``"<module>.bottleneck_down.weight" / ".bottleneck_up.weight"``), from the formula."""
    model = copy.deepcopy(base).double()
    act = ACT[activation]
    for key, down in adapter.items():
        if not key.endswith(".bottleneck_down.weight"):
            continue
        module_name = key.removesuffix(".bottleneck_down.weight")
        up = adapter[module_name + ".bottleneck_up.weight"].detach().double()
        down = down.detach().double()

        def hook(module, args, y, down=down, up=up):
            return y + torch.einsum("...s,os->...o", act(torch.einsum("...o,so->...s", y, down)), up)

        model.get_submodule(module_name).register_forward_hook(hook)
    return model(input_ids=ids, attention_mask=mask).logits


CONFIGS = {
    "a": BottleneckConfig(size=8),  # Houlsby, relu
    "b": BottleneckConfig(size=4, style="pfeiffer", non_linearity="gelu"),
    "c": BottleneckConfig(size=3, non_linearity="silu", target_modules=["mlp.c_proj", "down_proj", "q_proj"]),
}


def _mixed_model(arch: str, strategy: str = "auto", names=("a", "b")) -> AdapterModel:
    model = AdapterModel(tiny_model(arch), strategy=strategy)
    for seed, name in enumerate(names):
        _random_bottleneck(model, name, CONFIGS[name], seed=seed + 1)
    return model


def _module_names(model: AdapterModel, name: str) -> set[str]:
    return {key.rsplit(".", 2)[0] for key in model.adapter_parameters(name)}


def test_bottleneck_is_registered_and_exported():
    assert METHODS["BOTTLENECK"].config is BottleneckConfig and METHODS["BOTTLENECK"].bank is BottleneckBank
    config = BottleneckConfig()
    assert (config.style, config.non_linearity, config.target_modules) == ("houlsby", "relu", None)


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_default_targets_follow_the_style(arch, style):
    model = AdapterModel(tiny_model(arch))
    model.add_adapter("x", BottleneckConfig(size=4, style=style))
    expected = HOULSBY[arch] if style == "houlsby" else HOULSBY[arch][1:]
    layers = {name for name, _ in model.base_model.named_modules() if name.endswith(expected)}
    assert len(layers) == 2 * len(expected)  # every block of the two
    assert _module_names(model, "x") == layers
    for key, parameter in model.adapter_parameters("x").items():
        if key.endswith("bottleneck_down.weight"):
            assert parameter.shape == (4, 32) and parameter.abs().sum() > 0
        else:
            assert parameter.shape == (32, 4) and parameter.abs().sum() == 0


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_new_bottleneck_adapter_is_the_identity(arch, style):
    base = tiny_model(arch)
    model = AdapterModel(tiny_model(arch))
    model.add_adapter("fresh", BottleneckConfig(size=8, style=style, non_linearity="gelu"))
    ids, mask = batch()
    got = model(ids, attention_mask=mask, adapter_names=["fresh"] * len(ids)).logits
    assert torch.equal(got, base(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bottleneck_mixed_batch_equals_rows_alone_and_float64_reference(arch, strategy):
    base = tiny_model(arch)
    model = _mixed_model(arch, strategy, names=("a", "b", "c"))
    ids, mask = batch(rows=5)
    names = ["a", None, "b", "a", "c"]  # sizes 8, 4, 3; relu, gelu, silu
    got = model(ids, attention_mask=mask, adapter_names=names).logits
    bare = base(input_ids=ids, attention_mask=mask).logits
    for row, name in enumerate(names):
        one = ids[row : row + 1], mask[row : row + 1]
        alone = model(one[0], attention_mask=one[1], adapter_names=[name]).logits[0]
        assert (got[row] - alone).abs().max() <= 1e-5, (row, name)
        if name is None:
            assert (got[row] - bare[row]).abs().max() <= 1e-5
            continue
        expected = _reference(base, model.adapter_parameters(name), CONFIGS[name].non_linearity, *one)[0]
        assert (got[row].double() - expected).abs().max() <= 1e-4, (row, name)
        assert (got[row] - bare[row]).abs().max() > 1e-3  # the adapter does something


def test_every_strategy_gives_the_same_logits():
    ids, mask = batch(rows=5)
    names = ["a", None, "b", "a", "c"]
    results = {}
    for strategy in BottleneckBank.strategies:
        model = _mixed_model("llama", strategy, names=("a", "b", "c"))
        results[strategy] = model(ids, attention_mask=mask, adapter_names=names).logits
    for strategy, logits in results.items():
        assert (logits - results["bmm"]).abs().max() <= 1e-5, strategy


def test_bottleneck_generate_matches_each_row_alone():
    model = _mixed_model("llama", "bmm")
    ids, mask = batch(rows=3)
    names = ["a", "b", None]
    out = model.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=4, do_sample=False)
    for row, name in enumerate(names):
        one = model.generate(
            ids[row : row + 1], attention_mask=mask[row : row + 1], adapter_names=[name], max_new_tokens=4
        )
        assert torch.equal(out[row], one[0])


def test_bottleneck_save_then_load_gives_identical_logits(arch, tmp_path):
    model = _mixed_model(arch, "bmm", names=("a", "b", "c"))
    again = AdapterModel(tiny_model(arch), strategy="bmm")
    for name in ("a", "b", "c"):
        path = model.save_adapter(name, tmp_path / name)
        data = json.loads((path / "adapter_config.json").read_text())
        assert data["peft_type"] == "BOTTLENECK"
        assert (data["size"], data["style"], data["non_linearity"]) == (
            CONFIGS[name].size, CONFIGS[name].style, CONFIGS[name].non_linearity,
        )  # fmt: skip
        again.load_adapter(path, adapter_name=name)
        loaded, saved = again.adapter_configs[name], model.adapter_configs[name]
        assert (loaded.size, loaded.style, loaded.non_linearity, loaded.target_modules) == (
            saved.size, saved.style, saved.non_linearity, saved.target_modules,
        )  # fmt: skip
        for key, tensor in model.adapter_parameters(name).items():
            assert torch.equal(again.adapter_parameters(name)[key], tensor), key
    ids, mask = batch(rows=5)
    names = ["a", None, "b", "a", "c"]
    expected = model(ids, attention_mask=mask, adapter_names=names).logits
    assert torch.equal(again(ids, attention_mask=mask, adapter_names=names).logits, expected)


def _loss(model, ids, mask, names):
    return model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), adapter_names=names).loss


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bottleneck_gradients_reach_only_the_adapters_in_the_batch(strategy):
    model = _mixed_model("llama", strategy, names=("a", "b", "c"))
    model.train()
    ids, mask = batch(rows=4)
    mask[:] = 1  # equal token counts per row: the batch loss is the mean of the row losses
    names = ["a", None, "b", "a"]
    _loss(model, ids, mask, names).backward()
    mixed = {n: {k: p.grad for k, p in model.adapter_parameters(n).items()} for n in ("a", "b")}
    for name in ("a", "b"):
        for key, grad in mixed[name].items():
            assert grad is not None and grad.abs().sum() > 0, (name, key)
    assert all(p.grad is None for p in model.adapter_parameters("c").values())
    assert all(p.grad is None for p in model.base_model.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)
    for row, name in enumerate(names):  # the same gradients, one row at a time
        if name is None:
            continue
        (_loss(model, ids[row : row + 1], mask[row : row + 1], [name]) / len(names)).backward()
    for name in ("a", "b"):
        for key, parameter in model.adapter_parameters(name).items():
            assert torch.allclose(mixed[name][key], parameter.grad, atol=1e-6, rtol=1e-4), (name, key)


def test_bottleneck_training_lowers_the_loss():
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("t", BottleneckConfig(size=8))
    model.train()
    ids, mask = batch(rows=4)
    labels = ids.masked_fill(mask == 0, -100)
    losses = adam_losses(model, ids, mask, labels, ["t"] * len(ids), lr=3e-2, steps=10)
    assert losses[-1] < losses[0] - 0.1, losses


def test_bottleneck_mixes_with_other_methods_in_one_layer():
    """down_proj holds bottleneck, BitFit, IA3 (input scaling) and LoRA banks: each row as if alone."""
    model = _mixed_model("llama", names=("a", "b"))
    model.add_adapter("bit", BitFitConfig(target_modules=["down_proj"]))
    model.add_adapter("ia", Ia3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    model.add_adapter("lo", LoraConfig(r=2, target_modules=["down_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name in ("bit", "ia", "lo"):
            for parameter in model.adapter_parameters(name).values():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    ids, mask = batch(rows=6)
    names = ["a", "bit", "ia", None, "lo", "b"]
    got = model(ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):
        alone = model(ids[row : row + 1], attention_mask=mask[row : row + 1], adapter_names=[name]).logits[0]
        assert (got[row] - alone).abs().max() <= 1e-5, (row, name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"style": "adapterfusion"}, r"style='adapterfusion' is unknown \(expected one of houlsby, pfeiffer\)"),
        ({"non_linearity": "tanh"}, r"non_linearity='tanh' is unknown \(expected one of relu, gelu, silu"),
        ({"size": 0}, r"size=0 is invalid \(expected an integer >= 1\)"),
        ({"size": -3}, r"size=-3 is invalid"),
        ({"size": 2.5}, r"size=2.5 is invalid"),
    ],
)
def test_bad_bottleneck_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**kwargs)


def test_bad_config_on_disk_is_refused(tmp_path):
    model = _mixed_model("llama", names=("a",))
    path = model.save_adapter("a", tmp_path / "a")
    data = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**data, "non_linearity": "sigmoid"}))
    fresh = AdapterModel(tiny_model("llama"))
    with pytest.raises(ValueError, match="non_linearity='sigmoid'"):
        fresh.load_adapter(path, adapter_name="a")
    assert fresh.list_adapters() == []


def test_merging_a_bottleneck_adapter_raises():
    model = _mixed_model("llama", names=("a",))
    with pytest.raises(ValueError, match=r"bottleneck adapter 'a' cannot be merged"):
        model.merge_adapter("a")
    assert model.list_adapters() == ["a"]


def test_targets_that_match_nothing_are_refused():
    model = AdapterModel(tiny_model("llama"))
    with pytest.raises(ValueError, match="matches no Linear"):
        model.add_adapter("x", BottleneckConfig(target_modules=["nope"]))
