"""Additive low-rank updates with one adapter per row: ``out_i += (x_i A_iᵀ) B_iᵀ``.

Shapes: ``x: [batch, tokens, in]``, ``out: [batch, tokens, out]``; an adapter is
``A: [r, in]`` and ``B: [out, r]`` (PEFT's ``lora_A.weight`` / ``lora_B.weight`` layout) with its
scaling already folded into ``B``. Rows without an adapter are left as they are.

Three strategies compute the same function (up to float rounding):

- `lowrank_loop`: one gather, two matmuls and one scatter per distinct adapter (what PEFT's
  mixed batch does); cost grows with the number of distinct adapters.
- `lowrank_bmm`: every row's ``A`` and ``B`` gathered into ``[batch, in, r]`` / ``[batch, r, out]``
  (ranks zero-padded to the largest), then two batched matmuls for the whole batch.
- `lowrank_segmented`: rows sorted by adapter once, one matmul pair per contiguous segment, one
  scatter back; fewer gathers than the loop, no padding unlike bmm.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lowrank_loop(x: Tensor, out: Tensor, groups: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """``groups``: ``(rows [n], A [r, in], B [out, r])`` per distinct adapter. Updates ``out`` in place."""
    for rows, a, b in groups:
        out.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
    return out


def lowrank_bmm(x: Tensor, out: Tensor, a_rows: Tensor, b_rows: Tensor) -> Tensor:
    """``a_rows: [batch, in, r]``, ``b_rows: [batch, r, out]`` (zeros for rows without an adapter)."""
    return torch.baddbmm(out, torch.bmm(x, a_rows), b_rows)


def lowrank_segmented(x: Tensor, out: Tensor, order: Tensor, segments: list[tuple[int, int, Tensor, Tensor]]) -> Tensor:
    """``order: [n]`` rows with an adapter, grouped by adapter; ``segments``: ``(start, stop, A, B)``
    slices of ``order`` that share one adapter. Updates ``out`` in place."""
    grouped = x.index_select(0, order)
    delta = torch.cat([(grouped[start:stop] @ a.T) @ b.T for start, stop, a, b in segments])
    return out.index_add_(0, order, delta)
