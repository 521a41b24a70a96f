"""LoRA (Hu et al., 2021, arXiv 2106.09685) as a bank of per-row adapters.

For a base layer ``y = x W0ᵀ`` and an adapter ``A: [r, in]``, ``B: [out, r]``:

    y = x W0ᵀ + s · (dropout(x) Aᵀ) Bᵀ,   s = alpha / r   (rsLoRA: alpha / sqrt(r))

The same function as Hugging Face PEFT's ``LoraLayer`` (``lora_A.weight``, ``lora_B.weight``,
``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``). Initialisation as PEFT's
default: ``A`` Kaiming-uniform, ``B`` zero, so a new adapter leaves the output unchanged.
Strategies: ``bmm`` (default), ``loop``, ``segmented`` (see `flora.kernels.lowrank`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.kernels.lowrank import lowrank_bmm, lowrank_loop, lowrank_segmented
from flora.methods.base import AdapterConfig, Bank, Plan, pattern_value
from flora.routing import Routing


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA hyperparameters; ``alpha`` and ``dropout`` are PEFT's ``lora_alpha`` / ``lora_dropout``."""

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    peft_renames: ClassVar[dict[str, str]] = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    peft_unsupported: ClassVar[dict[str, Any]] = {
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "lora_bias": False,
        "target_parameters": None,
        "trainable_token_indices": None,
    }

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r={self.r} is invalid (expected an integer >= 1)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout={self.dropout} is invalid (expected 0 <= dropout < 1)")

    def scaling(self, module_name: str, rank: int) -> float:
        alpha = pattern_value(self.alpha_pattern, module_name, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


class LoraBank(Bank):
    method = "lora"
    strategies = ("bmm", "loop", "segmented")
    param_names = ("lora_A.weight", "lora_B.weight")

    def __init__(self, in_features, out_features, state) -> None:
        super().__init__(in_features, out_features, state)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}

    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    def add(self, name, config: LoraConfig, module_name, weights, like) -> None:
        if weights is None:
            r = pattern_value(config.rank_pattern, module_name, config.r)
            a = torch.empty(r, self.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(self.out_features, r)
        else:
            a, b = weights["lora_A.weight"], weights["lora_B.weight"]
            r = a.shape[0] if a.dim() == 2 else -1
            self._check_shape(name, module_name, "lora_A.weight", a, (r, self.in_features))
            self._check_shape(name, module_name, "lora_B.weight", b, (self.out_features, r))
        self.lora_A[name] = nn.Parameter(a.to(like))
        self.lora_B[name] = nn.Parameter(b.to(like))
        self.scaling[name] = config.scaling(module_name, r)
        self.dropout[name] = config.dropout

    def remove(self, name: str) -> None:
        super().remove(name)
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}

    def merge_into(self, name: str, weight_oi: Tensor, bias: Tensor | None) -> None:
        weight_oi += self.scaling[name] * (self.lora_B[name] @ self.lora_A[name]).to(weight_oi)

    # -- forward -------------------------------------------------------------------------------

    def _scaled_b(self, name: str) -> Tensor:
        return self.lora_B[name] * self.scaling[name]

    def _loop_groups(self, plan: Plan) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [(plan.rows[n], self.lora_A[n], self._scaled_b(n)) for n in plan.groups]

    def _bmm_rows(self, plan: Plan, routing: Routing) -> tuple[Tensor, Tensor]:
        rank = max(self.rank(n) for n in plan.groups)
        a0 = self.lora_A[next(iter(plan.groups))]
        zeros_a = a0.new_zeros(self.in_features, rank)
        zeros_b = a0.new_zeros(rank, self.out_features)
        a_rows = self._row_table(plan, routing, zeros_a, lambda n: F.pad(self.lora_A[n].T, (0, rank - self.rank(n))))
        b_rows = self._row_table(
            plan, routing, zeros_b, lambda n: F.pad(self._scaled_b(n).T, (0, 0, 0, rank - self.rank(n)))
        )
        return a_rows, b_rows

    def _segments(self, plan: Plan) -> tuple[Tensor, list[tuple[int, int, Tensor, Tensor]]]:
        order, segments, start = [], [], 0
        for name, rows in plan.groups.items():
            order.extend(rows)
            segments.append((start, start + len(rows), self.lora_A[name], self._scaled_b(name)))
            start += len(rows)
        return torch.tensor(order, device=plan.rows[name].device), segments

    def _dropout(self, x: Tensor, plan: Plan, routing: Routing) -> Tensor:
        rates = {self.dropout[n] for n in plan.groups}
        if not self.training or rates == {0.0}:
            return x
        if len(rates) == 1 and len(plan.groups) == routing.batch_size:
            return F.dropout(x, rates.pop(), training=True)
        keep = x.new_ones(routing.batch_size, 1, 1)
        for name, rows in plan.rows.items():
            keep[rows] = 1.0 - self.dropout[name]
        return x * torch.bernoulli(keep.expand_as(x)) / keep

    def adjust_output(self, x: Tensor, out: Tensor, plan: Plan, routing: Routing) -> Tensor:
        batch = routing.batch_size
        x3 = self._dropout(x.reshape(batch, -1, self.in_features), plan, routing)
        out3 = out.reshape(batch, -1, self.out_features)
        runs = {
            "bmm": lambda o: lowrank_bmm(x3, o, *plan.cached("bmm", lambda: self._bmm_rows(plan, routing))),
            "loop": lambda o: lowrank_loop(x3, o, plan.cached("loop", lambda: self._loop_groups(plan))),
            "segmented": lambda o: lowrank_segmented(x3, o, *plan.cached("seg", lambda: self._segments(plan))),
        }
        strategy = self.choose_strategy(plan, x3, {n: (lambda r=r: r(out3.clone())) for n, r in runs.items()})
        return runs[strategy](out3).reshape(out.shape)
