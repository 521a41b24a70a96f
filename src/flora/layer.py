"""`AdaptedLayer`: a base Linear or GPT-2 ``Conv1D`` together with its adapter banks.

Forward, for the routing in force (no routing, or no row using an adapter here: the bare base layer):

1. banks that scale the input (IA3 feed-forward) rescale their rows of ``x``;
2. the base output: ``base_layer(x)``, or a multiplicative bank's output (FLoRA) when one of its
   adapters is in the batch (its rows without an adapter get exactly ``x W0ᵀ + bias``);
3. banks that add to or rescale the output (LoRA, IA3) update their rows.

Each row uses at most one adapter, so every other bank leaves that row as it is.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from flora.methods.base import Bank
from flora.routing import RoutingState

ADAPTABLE = (nn.Linear, Conv1D)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D (whose weight is ``[in, out]``)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def weight_out_in(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a transposed view for Conv1D)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


class AdaptedLayer(nn.Module):
    """A base layer (``base_layer``) and one bank per method that has adapters here (``banks``)."""

    def __init__(self, base_layer: nn.Module, state: RoutingState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_features(base_layer)
        self.banks = nn.ModuleDict()
        self._state = [state]  # a list, so nn.Module does not register it

    def weight_out_in(self) -> Tensor:
        return weight_out_in(self.base_layer)

    def bank(self, bank_class: type[Bank]) -> Bank:
        """This layer's bank of ``bank_class``, created on first use."""
        if bank_class.method not in self.banks:
            self.banks[bank_class.method] = bank_class(self.in_features, self.out_features, self._state[0])
        return self.banks[bank_class.method]

    def drop_empty_banks(self) -> None:
        for method in [m for m, bank in self.banks.items() if not bank.adapters()]:
            del self.banks[method]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        routing = self._state[0].current
        if routing is None:
            return self.base_layer(x, *args, **kwargs)
        routing = routing.expanded(x.shape[0])
        active = [(bank, plan) for bank in self.banks.values() if (plan := bank.plan(routing)) is not None]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        for bank, plan in active:
            x = bank.scale_input(x, plan, routing)
        replacing = [(bank, plan) for bank, plan in active if bank.replaces_base]
        if replacing:
            bank, plan = replacing[0]
            out = bank.base_output(x, plan, routing, self)
        else:
            out = self.base_layer(x, *args, **kwargs)
        for bank, plan in active:
            out = bank.adjust_output(x, out, plan, routing)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
