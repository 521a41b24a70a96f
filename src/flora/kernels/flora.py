"""FLoRA's multiplicative adapter with one adapter per row (Wen & Chaudhuri, 2024).

An adapter of rank ``r`` has ``A: [r, out]`` and ``B: [r, in]`` and defines, for a base layer with
weight ``W0`` (``in x out``, the paper's ``d x k``),

    W_i = ΔW_i ∘ W0,   ΔW_i = (1/r) Σ_j b_ij a_ijᵀ

so that for a row ``x_i`` (``∘`` is the element-wise product)

    y_i = x_i W_i = Σ_j (a_ij / r) ∘ ((x_i ∘ b_ij) W0).

For a whole batch at rank 1 this is ``Y = A ∘ ((B ∘ X) W0)``: element-wise scalings around one
shared matmul, whatever the number of distinct adapters. At rank r the rows are broadcast into r
scaled copies, one matmul with ``W0``, then summed over r.

Two strategies compute it (same function, up to rounding):

- `flora_elementwise`: the paper's batched form above.
- `flora_dense`: per distinct adapter, materialise ``W_i`` and do one matmul for its rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def flora_elementwise(x: Tensor, matmul: Callable[[Tensor], Tensor], b_rows: Tensor, a_rows: Tensor) -> Tensor:
    """The batched multiplicative form, without the bias.

    Args:
        x: ``[batch, tokens, in]``.
        matmul: ``[..., in] -> [..., out]``, the base layer's product with ``W0`` (no bias).
        b_rows: ``[batch, r, in]`` per-row ``B``.
        a_rows: ``[batch, r, out]`` per-row ``A``, already divided by each adapter's rank (zeros pad
            lower ranks; a row without an adapter has ``b = 1`` and ``a = (1, 0, ...)``).

    Returns:
        ``[batch, tokens, out]``.
    """
    if b_rows.shape[1] == 1:
        return matmul(x * b_rows) * a_rows
    scaled = x.unsqueeze(1) * b_rows.unsqueeze(2)  # [batch, r, tokens, in]
    return (matmul(scaled) * a_rows.unsqueeze(2)).sum(1)


def flora_dense(
    x: Tensor,
    weight: Tensor,
    base_rows: Tensor | None,
    groups: list[tuple[Tensor, Tensor, Tensor]],
    out_features: int,
) -> Tensor:
    """Per distinct adapter, ``W_i = ΔW_i ∘ W0`` and one matmul; without the bias.

    Args:
        x: ``[batch, tokens, in]``.
        weight: ``W0`` as ``[out, in]`` (``torch.nn.Linear`` layout).
        base_rows: rows without an adapter (they get ``x W0``), or ``None``.
        groups: ``(rows [n], A [r, out], B [r, in])`` per distinct adapter.
        out_features: ``out``.
    """
    result = x.new_empty(x.shape[0], x.shape[1], out_features)
    if base_rows is not None:
        result.index_copy_(0, base_rows, F.linear(x.index_select(0, base_rows), weight))
    for rows, a, b in groups:
        delta = (a.T @ b) / a.shape[0]  # [out, in]
        result.index_copy_(0, rows, F.linear(x.index_select(0, rows), delta * weight))
    return result
