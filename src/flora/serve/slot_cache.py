"""The running batch's key/value cache: one slot per row, written in place.

Every layer keeps ``keys`` and ``values`` ``[slots, kv_heads, capacity, head_dim]``; the cache keeps
``mask [slots, capacity]`` (True on the columns a row attends to) and ``lengths [slots]`` (how many
columns each row holds). Running row ``r`` lives in slot ``r``, its tokens (virtual tokens, prompt,
generated) in columns ``0 .. lengths[r] - 1`` in the order they came, so rows of different lengths
need no padding between them:

- `SlotCache.admit`: new rows take the slots after the running ones; the columns of their prefill
  cache that hold tokens are gathered to the front of those slots (one gather per layer, of the new
  rows only);
- `SlotCache.keep`: the rows that stay, each moved into its slot: a copy of the rows that move
  (`flora.serve.engine.slot_order` moves only rows from past the new end), nothing for the others;
- `SlotCache.next_step`, then the decoding forward: every layer writes each row's new key and value at
  that row's next column (`SlotLayer.update`, one ``index_put_``) and attention reads
  ``[:rows, :, :width]``, ``width`` the longest row's columns: a view, not a copy. A shorter row's
  columns past its own are masked.

transformers' `DynamicCache` concatenates every layer's whole cache at each decoding step, and
regrouping its rows when one joined or left copied all of them (about a decoding step's time, at
almost every step under load: ``docs/serving.md``); here a step writes one column per row and a
row joining or leaving copies that row. The storage grows (slots in steps of 8, columns by half)
when a row needs it and is kept for the next rows, except columns four times more than the
longest row still needs (given back when long rows leave) and all of it when the batch empties.
Attention sees the same keys, values and mask as before, in another column order: each row's
tokens are those of the row alone.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

SLOT_STEP = 8
COLUMN_STEP = 64


def check_regroupable(cache: DynamicCache) -> None:
    """Refuse a prefill cache whose layers are not all full-attention `DynamicLayer`s (sliding-window
    and other layer kinds keep what a slot cannot hold)."""
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ValueError(
            f"the server keeps key/value caches row by row, which needs full-attention layers; this model's "
            f"cache has {', '.join(sorted(kinds))} layers (sliding-window or other attention is not supported)"
        )


class SlotLayer(CacheLayerMixin):
    """One layer's ``keys`` and ``values`` ``[slots, kv_heads, capacity, head_dim]``, owned by a `SlotCache`."""

    is_sliding = False

    def __init__(self, owner: SlotCache, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.owner = owner
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to do: the owner allocates the storage."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write each row's new ``key_states``/``value_states [rows, kv_heads, 1, head_dim]`` at its next
        column; returns the columns attention reads, ``[rows, kv_heads, width, head_dim]`` views."""
        if key_states.shape[2] != 1:
            raise ValueError(f"a slot cache takes one token per row and step, got {key_states.shape[2]}")
        rows, columns, width = self.owner.step
        self.keys[rows, :, columns] = key_states[:, :, 0]
        self.values[rows, :, columns] = value_states[:, :, 0]
        n = key_states.shape[0]
        return self.keys[:n, :, :width], self.values[:n, :, :width]

    def get_seq_length(self) -> int:
        return self.owner.step[2] - 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.step[2], 0

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The running rows' keys and values, in slots (see the module docstring). Empty until `admit`."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.rows = 0
        self.mask: Tensor | None = None  # [slots, capacity] bool
        self.lengths: Tensor | None = None  # [slots] long
        self.step: tuple[Tensor, Tensor, int] | None = None  # (row index, each row's new column, width)

    @property
    def slots(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def capacity(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def admit(self, cache: DynamicCache, mask: Tensor) -> None:
        """Rows ``self.rows ..`` become the rows of a prefill ``cache`` (keys ``[new, kv_heads, columns,
        head_dim]``) whose ``mask [new, columns]`` marks the columns holding tokens (left padding is 0)."""
        check_regroupable(cache)
        new, first = mask.shape[0], self.rows
        mask = mask.bool()
        lengths = mask.sum(dim=1)
        width = int(lengths.max())
        self._reserve(cache, first + new, width)
        # each row's token columns, in order, first: a stable sort puts the True columns ahead
        columns = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
        for layer, source in zip(self.layers, cache.layers, strict=True):
            index = columns[:, None, :, None].expand(new, source.keys.shape[1], width, source.keys.shape[3])
            layer.keys[first : first + new, :, :width] = source.keys.gather(2, index)
            layer.values[first : first + new, :, :width] = source.values.gather(2, index)
        self.mask[first : first + new] = False
        self.mask[first : first + new, :width] = torch.arange(width, device=mask.device) < lengths[:, None]
        self.lengths[first : first + new] = lengths
        self.rows += new

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` stay, row ``rows[s]`` moving to slot ``s``."""
        moves = [(slot, row) for slot, row in enumerate(rows) if slot != row]
        if moves:
            device = self.mask.device
            slots = torch.tensor([slot for slot, _ in moves], device=device)
            sources = torch.tensor([row for _, row in moves], device=device)
            width = int(self.lengths.index_select(0, sources).max())
            for layer in self.layers:
                for table in (layer.keys, layer.values):
                    columns = table[:, :, :width]
                    columns.index_copy_(0, slots, columns.index_select(0, sources))
            self.mask.index_copy_(0, slots, self.mask.index_select(0, sources))
            self.lengths.index_copy_(0, slots, self.lengths.index_select(0, sources))
        self.rows = len(rows)
        if not rows:
            self.layers, self.mask, self.lengths = [], None, None  # an idle server holds no cache
            return
        needed = _round_up(int(self.lengths[: self.rows].max()) + 1, COLUMN_STEP)
        if self.capacity >= 4 * needed:  # the long rows left: give their columns back
            self._resize(self.slots, 2 * needed)

    def next_step(self) -> Tensor:
        """Open one column per running row for the next decoding forward; returns its attention mask
        ``[rows, width]`` (the cache's columns, the new one included)."""
        rows = self.rows
        columns = self.lengths[:rows].clone()
        width = int(columns.max()) + 1
        if width > self.capacity:
            self._grow(self.slots, width)
        index = torch.arange(rows, device=columns.device)
        self.mask[index, columns] = True
        self.lengths[:rows] += 1
        self.step = (index, columns, width)
        return self.mask[:rows, :width]

    # -- storage -------------------------------------------------------------------------------

    def _reserve(self, like: DynamicCache, slots: int, columns: int) -> None:
        if not self.layers:
            self._allocate(like, slots, columns)
        elif slots > self.slots or columns > self.capacity:
            self._grow(slots, columns)

    def _allocate(self, like: DynamicCache, slots: int, columns: int) -> None:
        slots, capacity = _round_up(slots, SLOT_STEP), _round_up(columns + 1, COLUMN_STEP)
        with torch.inference_mode(False):  # written in and out of inference mode
            self.layers = [
                SlotLayer(self, *(t.new_zeros(slots, t.shape[1], capacity, t.shape[3]) for t in (src.keys, src.values)))
                for src in like.layers
            ]  # fmt: skip
            device = self.layers[0].device
            self.mask = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
            self.lengths = torch.zeros(slots, dtype=torch.long, device=device)

    def _grow(self, slots: int, columns: int) -> None:
        """At least ``slots`` slots of ``columns`` columns."""
        capacity = self.capacity
        if columns > capacity:
            capacity = _round_up(max(columns + 1, capacity + capacity // 2), COLUMN_STEP)
        self._resize(_round_up(max(slots, self.slots), SLOT_STEP), capacity)

    def _resize(self, slots: int, capacity: int) -> None:
        """``slots`` slots of ``capacity`` columns, keeping what fits of what the rows hold."""
        kept_slots, kept_columns = min(slots, self.slots), min(capacity, self.capacity)

        def resized(table: Tensor) -> Tensor:
            if table.dim() == 1:
                new = table.new_zeros(slots)
                new[:kept_slots] = table[:kept_slots]
            elif table.dim() == 2:
                new = table.new_zeros(slots, capacity)
                new[:kept_slots, :kept_columns] = table[:kept_slots, :kept_columns]
            else:
                new = table.new_zeros(slots, table.shape[1], capacity, table.shape[3])
                new[:kept_slots, :, :kept_columns] = table[:kept_slots, :, :kept_columns]
            return new

        with torch.inference_mode(False):
            for layer in self.layers:
                layer.keys, layer.values = resized(layer.keys), resized(layer.values)
            self.mask, self.lengths = resized(self.mask), resized(self.lengths)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
