"""LoRA (Hu et al., 2021, arXiv 2106.09685) as a bank of per-row adapters.

For a base layer ``y = x W0ᵀ`` and an adapter ``A: [r, in]``, ``B: [out, r]``:

    y = x W0ᵀ + s · (dropout(x) Aᵀ) Bᵀ,   s = alpha / r   (rsLoRA: alpha / sqrt(r))

The same function as Hugging Face PEFT's ``LoraLayer`` (``lora_A.weight``, ``lora_B.weight``,
``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``). Initialisation as PEFT's
default: ``A`` Kaiming-uniform, ``B`` zero, so a new adapter leaves the output unchanged.
Strategies: ``bmm`` (default), ``loop``, ``segmented``, ``stacked`` (see `flora.kernels.lowrank`); sibling layers
that read the same input compute their updates together (`flora.methods.lora_group`), and a layer
whose only adapted rows are LoRA's adds the update inside its base matmul (`LoraBank.fused_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.methods.base import AdapterConfig, Bank, pattern_value
from flora.methods.batch import AdapterBatch
from flora.methods.lora_group import LoraGroup


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
    strategies = ("bmm", "loop", "segmented", "stacked")
    whole_batch_strategy = "segmented"
    param_names = ("lora_A.weight", "lora_B.weight")

    def __init__(self, in_features, out_features, runtime) -> None:
        super().__init__(in_features, out_features, runtime)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranks: dict[str, int] = {}  # plain dicts: read per batch, faster than the ParameterDicts
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        # The LoRA banks of the sibling layers that read the same input (`AdapterModel` links them),
        # and this bank alone (for training with dropout, whose mask is per layer).
        self.own_group = LoraGroup([self])
        self.group = self.own_group

    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def holds(self, name: str) -> bool:
        return name in self.ranks

    def rank(self, name: str) -> int:
        return self.ranks[name]

    @classmethod
    def shapes(cls, config: LoraConfig, module_name, in_features, out_features) -> dict[str, tuple[int, ...]]:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        return {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}

    def add(self, name, config: LoraConfig, module_name, weights, like) -> None:
        if weights is None:
            shapes = self.shapes(config, module_name, self.in_features, self.out_features)
            a = torch.empty(shapes["lora_A.weight"])
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(shapes["lora_B.weight"])
        else:
            a, b = (self._checked(name, config, module_name, weights)[key] for key in self.param_names)
        r = a.shape[0]
        self.forget(name)
        self.lora_A[name] = nn.Parameter(a.to(like))
        self.lora_B[name] = nn.Parameter(b.to(like))
        self.ranks[name] = self.lora_A[name].shape[0]
        self.scaling[name] = config.scaling(module_name, r)
        self.dropout[name] = config.dropout

    def remove(self, name: str) -> None:
        self.forget(name)
        super().remove(name)
        self.ranks.pop(name, None)
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)

    def forget(self, name: str) -> None:
        """Drop what this bank's groups keep of adapter ``name`` (it is replaced or removed)."""
        self.group.forget(name)
        self.own_group.forget(name)

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}

    def merge_into(self, name: str, weight_oi: Tensor, bias: Tensor | None) -> None:
        weight_oi += self.scaling[name] * (self.lora_B[name] @ self.lora_A[name]).to(weight_oi)

    # -- forward -------------------------------------------------------------------------------

    def _dropout(self, batch: AdapterBatch) -> Callable[[AdapterBatch, Tensor], Tensor] | None:
        """Each row's adapter's dropout on the LoRA path's input (training only: nothing carries over,
        so the steps compiled for a batch run only under it), or ``None``."""
        if not self.training:
            return None
        plan = self.plan(batch)
        rates = {self.dropout[n] for n in plan.groups}
        if rates == {0.0}:
            return None
        if len(rates) == 1 and sum(map(len, plan.groups.values())) == batch.batch_size:
            rate = rates.pop()
            return lambda batch, x: F.dropout(x, rate, training=True)
        keep = torch.ones(batch.batch_size, 1, 1, device=batch.device)
        for name, rows in plan.rows.items():
            keep[rows] = 1.0 - self.dropout[name]

        def dropout(batch: AdapterBatch, x: Tensor) -> Tensor:
            x3, rows = x.reshape(batch.batch_size, -1, x.shape[-1]), keep.to(x.dtype)
            return x3 * torch.bernoulli(rows.expand_as(x3)) / rows

        return dropout

    def _delta(self, batch: AdapterBatch, x: Tensor) -> Callable[[AdapterBatch, Tensor], Tensor]:
        """``(batch, x) -> [batch, tokens, out]``: this layer's update, computed with its siblings' unless
        dropout (training) needs a mask of each layer's own on the input."""
        dropout = self._dropout(batch)
        if dropout is not None:
            delta = self.own_group.member_delta(self, batch, x)
            return lambda batch, x: delta(batch, dropout(batch, x))
        group = self.group if self.group.computes_together(batch) else self.own_group
        return group.member_delta(self, batch, x)

    def output_step(self, batch, x, base):
        delta = self._delta(batch, x)
        return lambda batch, x, out: out + delta(batch, x).reshape(out.shape)

    def fused_step(self, batch, layer, x):
        """``Δ + x W0ᵀ`` (plus the bias): the base matmul accumulates into the update (``addmm``)."""
        if self._dropout(batch) is not None:
            return None
        delta = self._delta(batch, x)
        weight_in_out = layer.weight_out_in().T
        bias = layer.base_layer.bias

        def step(batch: AdapterBatch, x: Tensor) -> Tensor:
            update, x2 = delta(batch, x).reshape(-1, self.out_features), x.reshape(-1, self.in_features)
            # In place without autograd; under it, the update may be a column slice whose storage a
            # sibling's output (saved for backward) shares.
            out = (
                torch.addmm(update, x2, weight_in_out) if torch.is_grad_enabled() else update.addmm_(x2, weight_in_out)
            )
            if bias is not None:
                out = out + bias
            return out.view(*x.shape[:-1], self.out_features)

        return step
