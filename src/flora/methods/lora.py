"""LoRA (Hu et al., 2021, arXiv 2106.09685) as a bank of per-row adapters.

For a base layer ``y = x W0ᵀ`` and an adapter ``A: [r, in]``, ``B: [out, r]``:

    y = x W0ᵀ + s · (dropout(x) Aᵀ) Bᵀ,   s = alpha / r   (rsLoRA: alpha / sqrt(r))

The same function as Hugging Face PEFT's ``LoraLayer`` (``lora_A.weight``, ``lora_B.weight``,
``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``). Initialisation as PEFT's
default: ``A`` Kaiming-uniform, ``B`` zero, so a new adapter leaves the output unchanged.
Strategies: ``bmm`` (default), ``loop``, ``segmented`` (see `flora.kernels.lowrank`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.kernels.lowrank import lowrank_bmm, lowrank_loop, lowrank_segmented
from flora.methods.base import AdapterConfig, Bank, Plan, pad_rank, pattern_value
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

    def _kernel(self, strategy: str, plan: Plan, routing: Routing) -> Callable[[Tensor, Tensor], Tensor]:
        """``(x: [batch, tokens, in], out: [batch, tokens, out]) -> out`` for ``strategy``."""
        if strategy == "loop":
            groups = [(plan.rows[n], self.lora_A[n], self._scaled_b(n)) for n in plan.groups]
            return lambda x, out: lowrank_loop(x, out, groups)
        if strategy == "segmented":
            order, segments, start = [], [], 0
            for name, rows in plan.groups.items():
                order.extend(rows)
                segments.append((start, start + len(rows), self.lora_A[name], self._scaled_b(name)))
                start += len(rows)
            order_t = torch.tensor(order, device=routing.device)
            return lambda x, out: lowrank_segmented(x, out, order_t, segments)
        rank = max(self.rank(n) for n in plan.groups)
        like = self.lora_A[next(iter(plan.groups))]
        zeros_a, zeros_b = like.new_zeros(self.in_features, rank), like.new_zeros(rank, self.out_features)
        a_rows = self._row_table(plan, routing, zeros_a, lambda n: pad_rank(self.lora_A[n].T, rank, dim=1))
        b_rows = self._row_table(plan, routing, zeros_b, lambda n: pad_rank(self.lora_B[n].T, rank, dim=0))
        scales = [0.0] * routing.batch_size
        for name, rows in plan.groups.items():
            for row in rows:
                scales[row] = self.scaling[name]
        b_rows = b_rows * torch.tensor(scales, dtype=b_rows.dtype, device=b_rows.device).view(-1, 1, 1)
        return lambda x, out: lowrank_bmm(x, out, a_rows, b_rows)

    def _dropout(self, plan: Plan, routing: Routing) -> Callable[[Tensor], Tensor] | None:
        """Each row's adapter's dropout on the LoRA path's input (training only), or ``None``."""
        rates = {self.dropout[n] for n in plan.groups}
        if not self.training or rates == {0.0}:
            return None
        if len(rates) == 1 and sum(map(len, plan.groups.values())) == routing.batch_size:
            rate = rates.pop()
            return lambda x: F.dropout(x, rate, training=True)
        keep = torch.ones(routing.batch_size, 1, 1, device=routing.device)
        for name, rows in plan.rows.items():
            keep[rows] = 1.0 - self.dropout[name]
        return lambda x: x * torch.bernoulli(keep.to(x.dtype).expand_as(x)) / keep.to(x.dtype)

    def output_step(self, plan, routing, x, base):
        batch, features = routing.batch_size, (self.in_features, self.out_features)

        def kernel(name: str):
            return self.prepared(routing, name, lambda: self._kernel(name, plan, routing))

        x3 = x.reshape(batch, -1, features[0])
        sample_out = functools.cache(lambda: base(x).reshape(batch, -1, features[1]))
        run = kernel(self.choose_strategy(plan, x3, lambda name: lambda: kernel(name)(x3, sample_out().clone())))
        dropout = self._dropout(plan, routing)
        if dropout is None and x.dim() == 3:  # the usual [batch, tokens, features]: no reshapes
            return run

        def step(x: Tensor, out: Tensor) -> Tensor:
            x3 = x.reshape(batch, -1, features[0])
            if dropout is not None:
                x3 = dropout(x3)
            return run(x3, out.reshape(batch, -1, features[1])).reshape(out.shape)

        return step
