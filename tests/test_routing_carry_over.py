"""A routing made ``like`` the last one runs the layers that one compiled, when the two have the same
shape (`flora.routing`): each row still gets its own adapter, and nothing carries over where a
layer's function would be wrong for the new rows."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_lora_group import _merged_logits, _randomized

from flora import AdapterModel, LoraConfig

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Two batches of the same shape: 5 and 6 rows (bucket 8), 4 distinct adapters, 4 rows with one.
FIRST = ["a0", "a1", None, "a2", "a3"]
SECOND = ["a4", "a1", "a5", None, None, "a2"]


def _model() -> AdapterModel:
    model = AdapterModel(tiny_model("llama"))
    for i in range(6):  # one kind: the same layers, the same rank
        model.add_adapter(f"a{i}", LoraConfig(r=4, alpha=8, target_modules=ATTENTION))
    model.strategy = "bmm"
    return _randomized(model)


def _ids(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, 3), generator=torch.Generator().manual_seed(seed))


def _logits(model: AdapterModel, routing, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), model.routed(routing):
        return model.base_model(ids).logits


def test_a_routing_of_the_same_shape_runs_the_compiled_layers_of_the_last_with_its_own_rows():
    model = _model()
    first = model.routing(FIRST)
    first_logits = _logits(model, first, _ids(5, 1))
    assert first.reusable and first.layers

    ids = _ids(6, 2)
    second = model.routing(SECOND, like=first)
    assert second.shape == first.shape and second.layers == first.layers  # carried over, not compiled again
    logits = _logits(model, second, ids)
    assert torch.equal(logits, _logits(model, model.routing(SECOND), ids))  # as if compiled for it
    expected = _merged_logits(model, ids, SECOND)
    for row, name in enumerate(SECOND):
        assert torch.allclose(logits[row], expected[row], atol=2e-5, rtol=1e-4), (row, name)
    # The first routing, run again after the second wrote the tables, still gets its own rows.
    assert torch.equal(_logits(model, first, _ids(5, 1)), first_logits)


@pytest.mark.parametrize("strategy", ["segmented", "loop", "stacked"])
def test_strategies_that_capture_rows_carry_nothing_over(strategy):
    model = _model()
    model.strategy = strategy
    first = model.routing(FIRST)
    _logits(model, first, _ids(5, 1))
    assert not first.reusable
    assert not model.routing(SECOND, like=first).layers


def test_another_shape_or_kind_of_adapter_or_changed_layers_carry_nothing_over():
    model = _model()
    first = model.routing(FIRST)
    _logits(model, first, _ids(5, 1))
    assert not model.routing(["a0", "a1", "a2", "a3", "a4"], like=first).layers  # 5 distinct: bucket 8
    assert not model.routing(FIRST * 2, like=first).layers  # 10 rows: bucket 16
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))  # another kind; no new banks
    assert model.routing(SECOND, like=first).layers
    mixed = model.routing(["other", *SECOND[1:]], like=first)
    assert mixed.shape is None and not mixed.layers
    model.add_adapter("mlp", LoraConfig(r=4, target_modules=["down_proj"]))  # new banks and groups
    renewed = model.routing(SECOND, like=first)
    assert renewed.shape != first.shape and not renewed.layers
    ids = _ids(6, 3)
    assert torch.allclose(_logits(model, renewed, ids), _merged_logits(model, ids, SECOND), atol=2e-5, rtol=1e-4)


def test_a_replaced_adapter_is_read_anew_by_carried_over_layers():
    model = _model()
    model.adapters_read_only = True
    first = model.routing(FIRST)
    _logits(model, first, _ids(5, 1))
    model.delete_adapter("a1")  # replaced (read-only adapters are not written in place)
    model.add_adapter("a1", LoraConfig(r=4, alpha=8, target_modules=ATTENTION))
    with torch.no_grad():
        for key, parameter in model.adapter_parameters("a1").items():
            if "lora_B" in key:
                parameter.normal_(0, 0.3)
    second = model.routing(SECOND, like=first)
    assert second.layers
    ids = _ids(6, 2)
    assert torch.allclose(_logits(model, second, ids), _merged_logits(model, ids, SECOND), atol=2e-5, rtol=1e-4)
