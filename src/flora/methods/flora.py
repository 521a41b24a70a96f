"""FLoRA, the multiplicative per-example adapter of Wen & Chaudhuri (arXiv 2312.05677, ICLR 2024).

An adapter of rank r is ``A: [r, out]`` and ``B: [r, in]``; with the base weight ``W0`` (``in x out``)

    W_i = ΔW_i ∘ W0,   ΔW_i = (1/r) Bᵀ A        (mean over the rank, as in the paper)
    y_i = Σ_j (a_ij / r) ∘ ((x_i ∘ b_ij) W0) + bias

Initialised to all ones, so ``ΔW = 1`` and a new adapter is exactly the base layer. FLoRA is a
different function from LoRA (a trained LoRA cannot be served as FLoRA) and wants far higher
learning rates (the paper: 8e-3 against LoRA's 1e-4). IA3 is its "rank 1/2" special case.

Saved in PEFT's layout with flora's own ``peft_type = "FLORA"``: per module
``flora_A.weight: [r, out]`` and ``flora_B.weight: [r, in]``.
Strategies: ``flora`` (the batched element-wise form, default) and ``loop`` (a dense ``W_i`` per
distinct adapter); see `flora.kernels.flora`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.kernels.flora import flora_dense, flora_elementwise
from flora.methods.base import AdapterConfig, Bank, pad_rank, pattern_value
from flora.methods.batch import AdapterBatch, PerBatch


@dataclass
class FloraConfig(AdapterConfig):
    """FLoRA hyperparameters: the rank ``r`` (the paper uses 1) and per-module ``rank_pattern``."""

    peft_type: ClassVar[str] = "FLORA"
    r: int = 1
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"FLoRA rank r={self.r} is invalid (expected an integer >= 1)")


class FloraBank(Bank):
    method = "flora"
    strategies = ("flora", "loop")
    param_names = ("flora_A.weight", "flora_B.weight")
    replaces_base = True

    def __init__(self, in_features, out_features, state) -> None:
        super().__init__(in_features, out_features, state)
        self.flora_A = nn.ParameterDict()
        self.flora_B = nn.ParameterDict()

    def adapters(self) -> list[str]:
        return list(self.flora_A.keys())

    def rank(self, name: str) -> int:
        return self.flora_A[name].shape[0]

    @classmethod
    def shapes(cls, config: FloraConfig, module_name, in_features, out_features) -> dict[str, tuple[int, ...]]:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        return {"flora_A.weight": (r, out_features), "flora_B.weight": (r, in_features)}

    def add(self, name, config: FloraConfig, module_name, weights, like) -> None:
        if weights is None:
            shapes = self.shapes(config, module_name, self.in_features, self.out_features)
            a, b = torch.ones(shapes["flora_A.weight"]), torch.ones(shapes["flora_B.weight"])
        else:
            a, b = (self._checked(name, config, module_name, weights)[key] for key in self.param_names)
        self.flora_A[name] = nn.Parameter(a.to(like))
        self.flora_B[name] = nn.Parameter(b.to(like))

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return {"flora_A.weight": self.flora_A[name], "flora_B.weight": self.flora_B[name]}

    def delta_weight(self, name: str) -> Tensor:
        """``ΔW_iᵀ = (1/r) Aᵀ B``, ``[out, in]``."""
        a = self.flora_A[name]
        return (a.T @ self.flora_B[name]) / a.shape[0]

    def merge_into(self, name: str, weight_oi: Tensor, bias: Tensor | None) -> None:
        weight_oi *= self.delta_weight(name).to(weight_oi)

    # -- forward -------------------------------------------------------------------------------

    def _kernel(self, strategy: str, weight: Tensor) -> Callable[[AdapterBatch, Tensor], Tensor]:
        """``(batch, x: [batch, tokens, in]) -> [batch, tokens, out]`` (no bias) for ``strategy``."""
        if strategy == "loop":

            def groups(batch: AdapterBatch) -> tuple[Tensor | None, list[tuple[Tensor, Tensor, Tensor]]]:
                plan = self.plan(batch)
                used = {row for rows in plan.groups.values() for row in rows}
                base = [row for row in range(batch.batch_size) if row not in used]
                base_rows = torch.tensor(base, device=batch.device) if base else None
                return base_rows, [(plan.rows[n], self.flora_A[n], self.flora_B[n]) for n in plan.groups]

            kept = PerBatch(groups)
            return lambda batch, x: flora_dense(x, weight, *kept(batch), self.out_features)

        def tables(batch: AdapterBatch) -> tuple[Tensor, Tensor]:
            plan = self.plan(batch)
            rank = max(self.rank(n) for n in plan.groups)
            like = self.flora_A[next(iter(plan.groups))]
            identity_a = like.new_zeros(rank, self.out_features)
            identity_a[0] = 1.0
            b_rows = self.row_table(like.new_ones(rank, self.in_features), lambda n: pad_rank(self.flora_B[n], rank, 0))
            a_rows = self.row_table(identity_a, lambda n: pad_rank(self.flora_A[n] / self.rank(n), rank, 0))
            return b_rows(batch), a_rows(batch)

        kept = PerBatch(tables)
        return lambda batch, x: flora_elementwise(x, lambda t: F.linear(t, weight), *kept(batch))

    def base_step(self, batch, layer, x):
        weight, bias = layer.weight_out_in(), layer.base_layer.bias
        x3 = x.reshape(batch.batch_size, -1, self.in_features)
        run = self.choose_strategy(self.plan(batch), x3, lambda name: self._kernel(name, weight),
                                   trial=lambda kernel: kernel(batch, x3))  # fmt: skip

        def step(batch: AdapterBatch, x: Tensor) -> Tensor:
            out = run(batch, x.reshape(batch.batch_size, -1, self.in_features))
            if bias is not None:
                out = out + bias
            return out.reshape(*x.shape[:-1], self.out_features)

        return step
