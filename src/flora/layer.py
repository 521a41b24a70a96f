"""`AdaptedLayer`: a base Linear or GPT-2 ``Conv1D`` together with its adapter banks.

Forward, for the routing in force (no routing, or no row using an adapter here: the bare base layer):

1. banks that scale the input (IA3 feed-forward) rescale their rows of ``x``;
2. the base output: ``base_layer(x)``, or a multiplicative bank's output (FLoRA) when one of its
   adapters is in the batch (its rows without an adapter get exactly ``x W0ᵀ + bias``);
3. banks that add to or rescale the output (LoRA, IA3) update their rows.

Each row uses at most one adapter, so every other bank leaves that row as it is. When one bank
alone has rows here, it may fold steps 2-3 into one (`Bank.fused_step`: LoRA adds its update as
the input term of the base matmul). The steps are compiled once per routing and input shape into
one closure (strategy chosen, per-row weights gathered) and, without autograd, memoised on the
routing: a decode step is a dict lookup and the kernels. A closure whose banks all read the rows'
adapters when it runs (`Bank.reads_names_when_run`) may serve the next routing of the same shape
(`flora.routing`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from flora.methods.base import Bank
from flora.routing import Routing, RoutingState, carried_key

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
        if bank_class.method not in self.banks:  # in this layer's mode: no dropout added to a model in eval
            self.banks[bank_class.method] = bank_class(self.in_features, self.out_features, self._state[0]).train(
                self.training
            )
        return self.banks[bank_class.method]

    def drop_empty_banks(self) -> None:
        for method in [m for m, bank in self.banks.items() if not bank.adapters()]:
            del self.banks[method]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        routing = self._state[0].current
        if routing is None:
            return self.base_layer(x, *args, **kwargs)
        if x.shape[0] != routing.batch_size:
            routing = routing.expanded(x.shape[0])
        if torch.is_grad_enabled():
            # Under autograd the per-row weights are gathered in every call: activation
            # checkpointing re-runs the forward and must see the same operations again.
            return self._compile(routing, x)(x)
        key = (id(self), x.shape[1:])  # the batch is the routing's
        run = routing.layers.get(key)
        if run is None:
            run = routing.carried.get(carried_key(key)) if routing.carried else None
            run = routing.layers[key] = self._compile(routing, x) if run is None else run
        return run(x)

    def _compile(self, routing: Routing, x: Tensor) -> Callable[[Tensor], Tensor]:
        """One function ``x -> out`` for this routing, with every bank's strategy chosen and its
        per-row weights gathered. The bare base layer when no row uses an adapter here."""
        key = (id(self), "plans")
        if key not in routing.memo:
            routing.memo[key] = [(b, plan) for b in self.banks.values() if (plan := b.plan(routing)) is not None]
        active = routing.memo[key]
        if not active:
            return self.base_layer
        if not all(bank.reads_names_when_run for bank, _ in active):
            routing.reusable = False
        inputs = [step for bank, plan in active if (step := bank.input_step(plan, routing)) is not None]
        sample = x
        for step in inputs:
            sample = step(sample)
        if not inputs and len(active) == 1:  # the usual case: one bank, maybe fused with the base matmul
            fused = active[0][0].fused_step(active[0][1], routing, self, x)
            if fused is not None:
                return fused
        replacing = [(bank, plan) for bank, plan in active if bank.replaces_base]
        base = replacing[0][0].base_step(replacing[0][1], routing, self, sample) if replacing else self.base_layer
        outputs = [step for bank, plan in active if (step := bank.output_step(plan, routing, sample, base)) is not None]
        if not inputs and len(outputs) == 1:  # the usual case: one additive or scaling bank
            output = outputs[0]
            return lambda x: output(x, base(x))

        def run(x: Tensor) -> Tensor:
            for step in inputs:
                x = step(x)
            out = base(x)
            for step in outputs:
                out = step(x, out)
            return out

        return run

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
