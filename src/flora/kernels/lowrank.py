"""Low-rank updates with one adapter per row: ``Δ_i = (x_i A_iᵀ) B_i``.

Shapes: ``x: [batch, tokens, in]``; an adapter is ``A: [r, in]`` (PEFT's ``lora_A.weight``) and
``B: [r, out]`` (``lora_B.weight`` transposed, its scaling folded in); the result ``Δ`` is
``[batch, tokens, out]`` with zeros on rows without an adapter. ``B`` may be block-diagonal over
several layers that read the same input (`flora.methods.lora_group`): then ``out`` spans all of them.

Three strategies compute the same function (up to float rounding):

- `lowrank_loop`: one gather, two matmuls and one scatter per distinct adapter (what PEFT's
  mixed batch does); cost grows with the number of distinct adapters.
- `lowrank_bmm`: every row's ``A`` and ``B`` gathered into ``[batch, r, in]`` / ``[batch, r, out]``
  (ranks zero-padded to the largest), then two batched matmuls for the whole batch (for several
  layers: one for the shared ``x Aᵀ``, one per layer's ``B``). ``A`` keeps PEFT's ``[r, in]``
  layout and is read transposed: on CPU that is twice as fast as an ``[in, r]`` copy for decoding
  (one token per row).
- `lowrank_segmented`: rows sorted by adapter once, one matmul pair per contiguous segment, one
  scatter back; no padding. Rows already in segment order (one adapter for every row, say) skip
  the sort and the scatter: one adapter for the whole batch is two plain matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lowrank_loop(x: Tensor, groups: list[tuple[Tensor, Tensor, Tensor]], out_features: int) -> Tensor:
    """``groups``: ``(rows [n], A [r, in], B [r, out])`` per distinct adapter."""
    covered = sum(rows.numel() for rows, _, _ in groups) == x.shape[0]
    result = (x.new_empty if covered else x.new_zeros)(x.shape[0], x.shape[1], out_features)
    for rows, a, b in groups:
        result.index_copy_(0, rows, (x.index_select(0, rows) @ a.T) @ b)
    return result


def lowrank_bmm(x: Tensor, a_rows: Tensor, b_rows: list[tuple[int, int, Tensor]]) -> list[Tensor]:
    """``a_rows: [batch, R, in]``; ``b_rows``: ``(start, stop, [batch, stop - start, out_m])`` per
    output, each reading its ranks ``start:stop`` of ``x Aᵀ`` (zeros for rows without an adapter).
    Returns one ``[batch, tokens, out_m]`` per output."""
    xa = torch.bmm(x, a_rows.transpose(1, 2))
    if len(b_rows) == 1:
        return [torch.bmm(xa, b_rows[0][2])]
    return [torch.bmm(xa[..., start:stop], b) for start, stop, b in b_rows]


def lowrank_segmented(
    x: Tensor, order: Tensor | None, segments: list[tuple[int, int, Tensor, Tensor]], out_features: int
) -> Tensor:
    """``order: [n]`` rows with an adapter, grouped by adapter, or ``None`` when that is every row
    in its own order (no sort, no scatter); ``segments``: ``(start, stop, A, B)`` slices of
    ``order`` that share one adapter."""
    grouped = x if order is None else x.index_select(0, order)
    if len(segments) == 1:
        (_, _, a, b) = segments[0]
        delta = (grouped @ a.T) @ b
    else:
        delta = torch.cat([(grouped[start:stop] @ a.T) @ b for start, stop, a, b in segments])
    if order is None:
        return delta
    result = (x.new_empty if order.numel() == x.shape[0] else x.new_zeros)(x.shape[0], x.shape[1], out_features)
    return result.index_copy_(0, order, delta)
