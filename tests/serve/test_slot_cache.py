"""`SlotCache`: rows joining, leaving and decoding keep, for every row, exactly its own keys and values
in order (checked against a list per row), through slot moves and storage growth."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from flora.serve import slot_cache
from flora.serve.engine import slot_order
from flora.serve.slot_cache import SlotCache

LAYERS, HEADS, DIM = 2, 3, 4


def _prefill(lengths: list[int], virtual: list[int]) -> tuple[DynamicCache, torch.Tensor, list[list[torch.Tensor]]]:
    """A left-padded prefill cache of rows with ``virtual[i]`` virtual-token columns in front of the
    padding (as prompt and prefix tuning lay them out) and ``lengths[i]`` prompt tokens; each row's
    expected ``[layers * 2]`` column sequences."""
    rows, front = len(lengths), max(virtual)
    width = front + max(lengths)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for row, (length, v) in enumerate(zip(lengths, virtual, strict=True)):
        mask[row, :v] = 1
        mask[row, width - length :] = 1
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.randn(rows, HEADS, width, DIM), torch.randn(rows, HEADS, width, DIM), layer)
    expected = [
        [table[row][:, mask[row].bool()] for layer in cache.layers for table in (layer.keys, layer.values)]
        for row in range(rows)
    ]
    return cache, mask, expected


def _assert_rows(cache: SlotCache, expected: list[list[torch.Tensor]]) -> None:
    assert cache.rows == len(expected)
    for row, tables in enumerate(expected):
        mask = cache.mask[row]
        assert int(mask.sum()) == int(cache.lengths[row]) == tables[0].shape[1]
        stored = [table[row][:, mask] for layer in cache.layers for table in (layer.keys, layer.values)]
        for got, want in zip(stored, tables, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_keep_their_own_columns_through_joins_moves_steps_and_growth(seed, monkeypatch):
    monkeypatch.setattr(slot_cache, "SLOT_STEP", 2)  # small steps: the storage grows many times
    monkeypatch.setattr(slot_cache, "COLUMN_STEP", 8)
    random.seed(seed)
    torch.manual_seed(seed)
    cache, expected, grown = SlotCache(), [], set()
    for _ in range(60):
        action = random.random()
        if action < 0.3 or not expected:
            new = random.randint(1, 3)
            lengths = [random.randint(1, 30) for _ in range(new)]
            virtual = [random.choice([0, 0, 2]) for _ in range(new)]
            prefill, mask, rows = _prefill(lengths, virtual)
            cache.admit(prefill, mask)
            expected.extend(rows)
        elif action < 0.5:
            staying = slot_order(sorted(random.sample(range(len(expected)), random.randint(0, len(expected)))))
            cache.keep(staying)
            expected = [expected[row] for row in staying]
        else:
            mask = cache.next_step()
            width = max(t[0].shape[1] for t in expected) + 1
            assert mask.shape == (len(expected), width)
            for index, layer in enumerate(cache.layers):
                keys, values = torch.randn(len(expected), HEADS, 1, DIM), torch.randn(len(expected), HEADS, 1, DIM)
                seen_keys, seen_values = layer.update(keys, values)
                assert seen_keys.shape == (len(expected), HEADS, width, DIM)
                for row, tables in enumerate(expected):
                    tables[2 * index] = torch.cat([tables[2 * index], keys[row]], dim=1)
                    tables[2 * index + 1] = torch.cat([tables[2 * index + 1], values[row]], dim=1)
                    torch.testing.assert_close(seen_keys[row][:, mask[row]], tables[2 * index], rtol=0, atol=0)
        _assert_rows(cache, expected)
        grown.add((cache.slots, cache.capacity))
    assert len({slots for slots, _ in grown}) > 2 and len({columns for _, columns in grown}) > 2


def test_a_step_takes_one_token_per_row():
    cache = SlotCache()
    prefill, mask, _ = _prefill([3], [0])
    cache.admit(prefill, mask)
    cache.next_step()
    with pytest.raises(ValueError, match="one token per row"):
        cache.layers[0].update(torch.randn(1, HEADS, 2, DIM), torch.randn(1, HEADS, 2, DIM))


def test_storage_is_given_back_when_long_rows_leave_and_when_the_batch_empties():
    cache = SlotCache()
    prefill, mask, expected = _prefill([200, 5], [0, 0])
    cache.admit(prefill, mask)
    assert cache.capacity == 256
    cache.keep([1])  # the long row leaves: 6 columns needed of 256
    assert cache.capacity == 128
    _assert_rows(cache, expected[1:])
    cache.keep([])
    assert cache.layers == [] and cache.capacity == 0
    prefill, mask, expected = _prefill([7], [2])
    cache.admit(prefill, mask)
    _assert_rows(cache, expected)
