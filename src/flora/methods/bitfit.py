"""BitFit (Ben Zaken, Ravfogel & Goldberg, ACL 2022, arXiv 2106.10199) as a bank of per-row adapters.

BitFit fine-tunes bias terms only. Here an adapter is one bias delta per targeted layer: for a base
layer ``y = x W0ᵀ + b0`` (``b0 = 0`` where the layer has no bias, as in Llama) and an adapter
``Δb: [out]``, row ``i`` with adapter ``a(i)`` computes

    y_i = x_i W0ᵀ + b0 + Δb_{a(i)}

and a row without an adapter gets ``x_i W0ᵀ + b0`` exactly. ``Δb`` starts at zero, so a new adapter
is the identity. The paper also trains the biases of normalisation layers; flora adapts
Linear/Conv1D layers only, so those are not part of an adapter.

Per row, the deltas are gathered into ``[batch, 1, out]`` (zeros for rows without one) and added:
there is no matmul to batch, so BitFit has one strategy (``gather``). Merging adds ``Δb`` into the
base bias, creating a bias on layers that have none (`AdapterModel.merge_adapter` then turns on the
config options that declare them, such as Llama's ``attention_bias``, or refuses where none can).

Saved in PEFT's layout with flora's own ``peft_type = "BITFIT"``: per module one tensor
``base_model.model.<module>.bitfit_bias`` of shape ``[out]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from flora.methods.base import AdapterConfig, Bank


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit: a trainable bias delta on every targeted layer (default: every Linear/Conv1D but the
    output layer). It has no hyperparameters of its own."""

    peft_type: ClassVar[str] = "BITFIT"


class BitFitBank(Bank):
    method = "bitfit"
    strategies = ("gather",)
    param_names = ("bitfit_bias",)
    merge_adds_bias = True

    def __init__(self, in_features, out_features, state) -> None:
        super().__init__(in_features, out_features, state)
        self.bitfit_bias = nn.ParameterDict()

    def adapters(self) -> list[str]:
        return list(self.bitfit_bias.keys())

    @classmethod
    def shapes(cls, config: BitFitConfig, module_name, in_features, out_features) -> dict[str, tuple[int, ...]]:
        return {"bitfit_bias": (out_features,)}

    def add(self, name, config: BitFitConfig, module_name, weights, like) -> None:
        if weights is None:
            delta = torch.zeros(self.out_features)
        else:
            delta = self._checked(name, config, module_name, weights)["bitfit_bias"]
        self.bitfit_bias[name] = nn.Parameter(delta.to(like))

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return {"bitfit_bias": self.bitfit_bias[name]}

    def merge_into(self, name: str, weight_oi: Tensor, bias: Tensor | None) -> None:
        if bias is None:
            raise ValueError(f"bitfit adapter {name!r}: merging needs a base bias to add to (got none)")
        bias += self.bitfit_bias[name].to(bias)

    # -- forward -------------------------------------------------------------------------------

    def output_step(self, batch, x, base):
        size = self.out_features
        deltas = self.row_table(next(iter(self.bitfit_bias.values())).new_zeros(size), self.bitfit_bias.__getitem__)
        return lambda batch, x, out: (out.reshape(batch.batch_size, -1, size) + deltas(batch).unsqueeze(1)).reshape(
            out.shape
        )
