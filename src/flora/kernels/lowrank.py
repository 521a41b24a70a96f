"""Low-rank updates with one adapter per row: ``Δ_i = (x_i A_iᵀ) B_i``.

Shapes: ``x: [batch, tokens, in]``; an adapter is ``A: [r, in]`` (PEFT's ``lora_A.weight``) and
``B: [r, out]`` (``lora_B.weight`` transposed, its scaling folded in); the result ``Δ`` is
``[batch, tokens, out]`` with zeros on rows without an adapter. Several layers that read the same
input (`flora.methods.lora_group`) stack their ``A``s into one ``[R, in]`` and keep one ``B`` each,
reading their own ranks ``start:stop`` of ``x Aᵀ``: every kernel returns one ``Δ`` per layer.

Four strategies compute the same function (up to float rounding):

- `lowrank_loop`: one gather, one matmul for ``x Aᵀ`` and one per output for ``B``, and one
  scatter per output, per distinct adapter (what PEFT's mixed batch does); cost grows with the
  number of distinct adapters.
- `lowrank_bmm`: every row's ``A`` and ``B`` gathered into ``[batch, r, in]`` / ``[batch, r, out]``
  (ranks zero-padded to the largest), then two batched matmuls for the whole batch (for several
  layers: one for the shared ``x Aᵀ``, one per layer's ``B``). ``A`` keeps PEFT's ``[r, in]``
  layout, read as ``Aᵀ`` (a transposed view) also when decoding: on CPU, with the tables coming
  from memory, ``x Aᵀ`` streams them 2.5x faster than the matrix-vector form ``A x`` for a group's
  stacked ``A`` (``R`` = 16 or 24) and as fast for one layer's (``R`` = 8).
- `lowrank_segmented`: rows sorted by adapter once, the same products per contiguous segment, one
  scatter back per output. Rows already in segment order (one adapter for every row, say) skip
  the sort and the scatter: one adapter for the whole batch is plain matmuls.
- `lowrank_stacked`: the batch's ``D`` distinct adapters stacked, ``A = [A_1; ...; A_D]``
  (``[D·r, in]``) and ``B = [B_1; ...; B_D]`` (``[D·r, out]``); every row goes through all of them
  in two dense matmuls, and a mask keeps each row's own ranks of ``x Aᵀ``:

      Δ = ((x Aᵀ) ∘ M) B,   M[i, d·r:(d+1)·r] = 1 where row i uses adapter d, else 0

  ``D`` times the arithmetic, but each distinct adapter is read once, by a dense matmul: for few
  adapters shared by many rows it reads far less than `lowrank_bmm`'s per-row tables.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lowrank_loop(x: Tensor, groups: list[tuple[Tensor, Tensor, list[tuple[int, int, Tensor]]]]) -> list[Tensor]:
    """``groups``: ``(rows [n], A [R, in], B)`` per distinct adapter, ``B`` as in `lowrank_bmm` but
    one adapter's: ``(start, stop, [stop - start, out_m])`` per output. Returns one
    ``[batch, tokens, out_m]`` per output."""
    covered = sum(rows.numel() for rows, _, _ in groups) == x.shape[0]
    make = x.new_empty if covered else x.new_zeros
    results = [make(x.shape[0], x.shape[1], b.shape[1]) for _, _, b in groups[0][2]]
    for rows, a, b_parts in groups:
        xa = x.index_select(0, rows) @ a.T
        for result, (start, stop, b) in zip(results, b_parts, strict=True):
            result.index_copy_(0, rows, xa[..., start:stop] @ b)
    return results


def lowrank_bmm(x: Tensor, a_rows: Tensor, b_rows: list[tuple[int, int, Tensor]]) -> list[Tensor]:
    """``a_rows: [batch, R, in]``; ``b_rows``: ``(start, stop, [batch, stop - start, out_m])`` per
    output, each reading its ranks ``start:stop`` of ``x Aᵀ`` (zeros for rows without an adapter).
    Returns one ``[batch, tokens, out_m]`` per output."""
    xa = torch.bmm(x, a_rows.transpose(1, 2))
    if len(b_rows) == 1:
        return [torch.bmm(xa, b_rows[0][2])]
    return [torch.bmm(xa[..., start:stop], b) for start, stop, b in b_rows]


def lowrank_segmented(
    x: Tensor, order: Tensor | None, segments: list[tuple[int, int, Tensor, list[tuple[int, int, Tensor]]]]
) -> list[Tensor]:
    """``order: [n]`` rows with an adapter, grouped by adapter, or ``None`` when that is every row
    in its own order (no sort, no scatter); ``segments``: ``(start, stop, A, B)`` slices of
    ``order`` that share one adapter, ``B`` as in `lowrank_loop`. Returns one ``[batch, tokens,
    out_m]`` per output."""
    grouped = x if order is None else x.index_select(0, order)
    parts = []  # per segment, per output
    for start, stop, a, b_parts in segments:
        xa = (grouped if len(segments) == 1 else grouped[start:stop]) @ a.T
        parts.append([xa[..., first:last] @ b for first, last, b in b_parts])
    deltas = parts[0] if len(parts) == 1 else [torch.cat(column) for column in zip(*parts, strict=True)]
    if order is None:
        return deltas
    make = x.new_empty if order.numel() == x.shape[0] else x.new_zeros
    return [make(x.shape[0], x.shape[1], delta.shape[-1]).index_copy_(0, order, delta) for delta in deltas]


def lowrank_stacked(
    x: Tensor, a_stack: Tensor, row_mask: Tensor, b_stacks: list[tuple[int, int, Tensor]]
) -> list[Tensor]:
    """``a_stack: [C, in]``, every distinct adapter's ``A`` (for several outputs: output by output,
    then adapter by adapter); ``row_mask: [batch, 1, C]``, 1 on the columns of a row's own adapter;
    ``b_stacks``: ``(start, stop, [stop - start, out_m])`` per output, reading columns
    ``start:stop`` of the masked ``x Aᵀ``. Returns one ``[batch, tokens, out_m]`` per output."""
    xa = torch.matmul(x, a_stack.T) * row_mask
    return [xa[..., start:stop] @ b for start, stop, b in b_stacks]
