"""Training through banks: gradients reach exactly the adapters their rows used, and a mixed batch
gives the same gradients as running each row alone (every strategy)."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny_model

from flora import AdapterModel, FloraConfig, Ia3Config, LoraConfig
from flora.model import STRATEGIES


def _model(strategy: str) -> AdapterModel:
    model = AdapterModel(tiny_model("llama"), strategy=strategy)
    model.add_adapter("l4", LoraConfig(r=4, alpha=8))
    model.add_adapter("l2", LoraConfig(r=2, alpha=2, target_modules=["q_proj", "up_proj"]))
    model.add_adapter("fl", FloraConfig(r=2, target_modules=["k_proj", "down_proj"]))
    model.add_adapter("ia", Ia3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.add_adapter("unused", LoraConfig(r=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in model.list_adapters():
            for parameter in model.adapter_parameters(name).values():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.train()


def _loss(model, ids, mask, names):
    return model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), adapter_names=names).loss


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_batch_gradients_equal_per_row_sum_and_stay_in_their_adapters(strategy):
    model = _model(strategy)
    ids, mask = batch(rows=5)
    mask[:] = 1  # equal token counts per row: the batch loss is the mean of the row losses
    names = ["l4", "fl", "l2", "ia", "l4"]
    _loss(model, ids, mask, names).backward()
    mixed = {
        n: {k: None if p.grad is None else p.grad.clone() for k, p in model.adapter_parameters(n).items()}
        for n in model.list_adapters()
    }
    model.zero_grad(set_to_none=True)
    for row, name in enumerate(names):
        (_loss(model, ids[row : row + 1], mask[row : row + 1], [name]) / len(names)).backward()
    for name in model.list_adapters():
        for key, parameter in model.adapter_parameters(name).items():
            if name == "unused":
                assert mixed[name][key] is None and parameter.grad is None
            else:
                assert mixed[name][key] is not None and mixed[name][key].abs().sum() > 0
                assert torch.allclose(mixed[name][key], parameter.grad, atol=1e-6, rtol=1e-4), (name, key)
    assert all(p.grad is None for p in model.base_model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_activation_checkpointing_gives_the_same_gradients(strategy):
    """Checkpointing re-runs each block's forward in backward; the banks must redo the same work."""
    ids, mask = batch(rows=4)
    names = ["l4", "fl", None, "ia"]
    grads = []
    for checkpointing in (False, True):
        model = _model(strategy)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        _loss(model, ids, mask, names).backward()
        grads.append({k: p.grad for n in ("l4", "fl", "ia") for k, p in model.adapter_parameters(n).items()})
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=1e-5)
