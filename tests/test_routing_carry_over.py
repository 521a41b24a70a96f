"""A batch made to ``carry`` runs what the layers compiled for the last batch of the same shape
(`flora.methods.batch`): each row still gets its own adapter, whatever the strategy, and nothing
carries over where a layer's function would be wrong for the new rows (other kinds of adapters,
other layers)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_lora_group import _merged_logits

from flora import AdapterModel, LoraConfig

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Two batches of the same shape: 5 and 6 rows (bucket 8), 4 distinct adapters, 4 rows with one.
FIRST = ["a0", "a1", None, "a2", "a3"]
SECOND = ["a4", "a1", "a5", None, None, "a2"]


def _randomize(model: AdapterModel, name: str) -> None:
    with torch.no_grad():
        for key, parameter in model.adapter_parameters(name).items():
            if "lora_B" in key:
                parameter.normal_(0, 0.3)


def _model(strategy: str = "bmm") -> AdapterModel:
    model = AdapterModel(tiny_model("llama"), strategy=strategy)
    torch.manual_seed(0)
    for i in range(6):  # one kind: the same layers, the same rank
        model.add_adapter(f"a{i}", LoraConfig(r=4, alpha=8, target_modules=ATTENTION))
        _randomize(model, f"a{i}")
    return model


def _ids(rows: int, seed: int, tokens: int = 3) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def _logits(model: AdapterModel, routing, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), model.routed(routing):
        return model.base_model(ids).logits


def _assert_rows_are_their_adapters(model: AdapterModel, routing, ids: torch.Tensor) -> torch.Tensor:
    logits = _logits(model, routing, ids)
    expected = _merged_logits(model, ids, list(routing.names))
    for row, name in enumerate(routing.names):
        assert torch.allclose(logits[row], expected[row], atol=2e-5, rtol=1e-4), (row, name)
    return logits


def _compiled_anew(routing) -> list:
    """The layer functions ``routing`` compiled itself rather than took over."""
    taken = set(map(id, routing.carried.values()))
    return [run for run in routing.layers.values() if id(run) not in taken]


def test_a_routing_of_the_same_shape_runs_the_compiled_layers_of_the_last_with_its_own_rows():
    model = _model()
    first = model.routing(FIRST, carry=True)
    first_logits = _logits(model, first, _ids(5, 1))
    assert first.layers and not first.carried

    second = model.routing(SECOND, carry=True)
    assert second.shape == first.shape
    assert set(map(id, second.carried.values())) == set(map(id, first.layers.values()))
    ids = _ids(6, 2, tokens=4)  # 4 tokens, 3 before: one bucket
    logits = _assert_rows_are_their_adapters(model, second, ids)
    assert second.layers and not _compiled_anew(second)
    assert torch.equal(logits, _logits(model, model.routing(SECOND), ids))  # as if compiled for it
    _assert_rows_are_their_adapters(model, second, _ids(6, 3, tokens=5))  # another bucket: compiled
    assert _compiled_anew(second)
    # The first routing, run again after the second wrote the tables, still gets its own rows.
    assert torch.equal(_logits(model, first, _ids(5, 1)), first_logits)


def test_one_adapter_for_every_row_carries_over_its_plain_matmuls():
    model = _model(strategy="auto")  # one adapter, every row: `segmented` without measuring
    first = model.routing(["a0"] * 3, carry=True)
    _logits(model, first, _ids(3, 1))
    second = model.routing(["a3"] * 4, carry=True)
    _assert_rows_are_their_adapters(model, second, _ids(4, 2))
    assert second.carried and not _compiled_anew(second)


@pytest.mark.parametrize("strategy", ["segmented", "loop", "stacked", "auto"])
def test_every_strategy_carries_over_reading_the_rows_of_the_new_batch(strategy):
    model = _model(strategy)
    first = model.routing(FIRST, carry=True)
    first_logits = _logits(model, first, _ids(5, 1))
    second = model.routing(SECOND, carry=True)
    assert set(map(id, second.carried.values())) == set(map(id, first.layers.values()))
    _assert_rows_are_their_adapters(model, second, _ids(6, 2, tokens=4))
    assert not _compiled_anew(second)
    assert torch.equal(_logits(model, first, _ids(5, 1)), first_logits)  # the first, run again: its own rows


def test_another_shape_or_kind_of_adapter_or_changed_layers_carry_nothing_over():
    model = _model()
    first = model.routing(FIRST, carry=True)
    _logits(model, first, _ids(5, 1))
    assert not model.routing(["a0", "a1", "a2", "a3", "a4"], carry=True).carried  # 5 distinct: bucket 8
    assert not model.routing(FIRST * 2, carry=True).carried  # 10 rows: bucket 16
    assert not model.routing(FIRST).carried  # not asked to
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))  # another kind; no new banks
    _randomize(model, "other")
    second = model.routing(SECOND, carry=True)
    assert second.carried
    mixed = model.routing(["other", *SECOND[1:]], carry=True)  # two kinds: another shape
    assert mixed.shape != second.shape and not mixed.carried
    _assert_rows_are_their_adapters(model, mixed, _ids(6, 4))
    mixed_again = model.routing(["a3", "other", "a0", None, "a4", None], carry=True)  # the same two kinds
    assert mixed_again.carried
    _assert_rows_are_their_adapters(model, mixed_again, _ids(6, 5))
    assert not _compiled_anew(mixed_again)
    model.add_adapter("mlp", LoraConfig(r=4, target_modules=["down_proj"]))  # new banks and groups
    renewed = model.routing(SECOND, carry=True)
    assert renewed.shape != first.shape and not renewed.carried
    _assert_rows_are_their_adapters(model, renewed, _ids(6, 3))


def test_a_replaced_adapter_is_read_anew_by_carried_over_layers():
    model = _model()
    model.adapters_read_only = True
    first = model.routing(FIRST, carry=True)
    _logits(model, first, _ids(5, 1))
    model.delete_adapter("a1")  # replaced (read-only adapters are not written in place)
    model.add_adapter("a1", LoraConfig(r=4, alpha=8, target_modules=ATTENTION))
    _randomize(model, "a1")
    second = model.routing(SECOND, carry=True)
    assert second.carried
    _assert_rows_are_their_adapters(model, second, _ids(6, 2))
    assert not _compiled_anew(second)
