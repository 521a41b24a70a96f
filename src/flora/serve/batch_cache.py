"""The running batch's key/value cache: rows join and leave between decoding steps.

The cache is transformers' `DynamicCache`, whose layers hold keys and values
``[rows, kv_heads, columns, head_dim]``, plus ``mask: [rows, columns]`` (1 on a row's own columns:
its virtual tokens, prompt and generated tokens; 0 on padding). Rows are left-aligned to the
right: a row shorter than the batch has padding columns on its left, which attention never reads
because the mask is 0 there. So:

- `join`: two batches of rows become one by left-padding the shorter to the longer's columns;
- `keep`: a subset of the rows, with the columns that are padding for every kept row dropped
  (the cache stays as short as its longest row).

Only caches of full-attention layers (`DynamicLayer`) can be regrouped this way; sliding-window
and other layer kinds are refused by `check_regroupable`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


@dataclass
class BatchCache:
    """A key/value cache and its ``mask [rows, columns]`` (see the module docstring)."""

    cache: DynamicCache
    mask: Tensor

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def columns(self) -> int:
        return self.mask.shape[1]


def check_regroupable(cache: DynamicCache) -> None:
    """Refuse a cache whose layers are not all full-attention `DynamicLayer`s."""
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ValueError(
            f"the server regroups key/value caches row by row, which needs full-attention layers; this model's "
            f"cache has {', '.join(sorted(kinds))} layers (sliding-window or other attention is not supported)"
        )


def _rebuilt(layers: list[tuple[Tensor, Tensor]], config: PretrainedConfig) -> DynamicCache:
    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def join(first: BatchCache | None, second: BatchCache, config: PretrainedConfig) -> BatchCache:
    """``first``'s rows then ``second``'s, left-padded to the longer of the two."""
    if first is None:
        return second
    width = max(first.columns, second.columns)

    def padded(t: Tensor, columns: int) -> Tensor:  # keys/values [rows, heads, columns, dim] or mask [rows, columns]
        missing = width - columns
        if missing == 0:
            return t
        return F.pad(t, (0, 0, missing, 0)) if t.dim() == 4 else F.pad(t, (missing, 0))

    layers = [
        (torch.cat([padded(a.keys, first.columns), padded(b.keys, second.columns)]),
         torch.cat([padded(a.values, first.columns), padded(b.values, second.columns)]))
        for a, b in zip(first.cache.layers, second.cache.layers, strict=True)
    ]  # fmt: skip
    mask = torch.cat([padded(first.mask, first.columns), padded(second.mask, second.columns)])
    return BatchCache(_rebuilt(layers, config), mask)


def keep(batch: BatchCache, rows: list[int], config: PretrainedConfig) -> BatchCache | None:
    """Only ``rows`` (in that order), without the columns that are padding for all of them;
    ``None`` for no rows."""
    if not rows:
        return None
    index = torch.tensor(rows, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    start = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
    layers = [
        (layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])
        for layer in batch.cache.layers
    ]
    return BatchCache(_rebuilt(layers, config), mask[:, start:])
