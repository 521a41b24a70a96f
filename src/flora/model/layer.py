"""`AdaptedLayer`: a base Linear or GPT-2 ``Conv1D`` together with its adapter banks.

Forward, for the batch in force (none, or no row using an adapter here: the bare base layer):

1. banks that scale the input (IA3 feed-forward) rescale their rows of ``x``;
2. the base output: ``base_layer(x)``, or a multiplicative bank's output (FLoRA) when one of its
   adapters is in the batch (its rows without an adapter get exactly ``x W0ᵀ + bias``);
3. banks that add to or rescale the output (LoRA, IA3) update their rows.

Each row uses at most one adapter, so every other bank leaves that row as it is. When one bank
alone has rows here, it may fold steps 2-3 into one (`Bank.fused_step`: LoRA adds its update as
the input term of the base matmul). The steps are compiled once per batch and input shape into
one function ``(batch, x) -> out`` (strategies chosen) that the batch keeps
(`flora.methods.batch.AdapterBatch.step`): a decode step is a dict lookup and the kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from flora.methods.base import Bank
from flora.methods.batch import AdapterBatch, AdapterRuntime, Step

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

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_features(base_layer)
        self.banks = nn.ModuleDict()
        self._runtime = [runtime]  # a list, so nn.Module does not register it

    def weight_out_in(self) -> Tensor:
        return weight_out_in(self.base_layer)

    def bank(self, bank_class: type[Bank]) -> Bank:
        """This layer's bank of ``bank_class``, created on first use."""
        if bank_class.method not in self.banks:  # in this layer's mode: no dropout added to a model in eval
            self.banks[bank_class.method] = bank_class(self.in_features, self.out_features, self._runtime[0]).train(
                self.training
            )
        return self.banks[bank_class.method]

    def drop_empty_banks(self) -> None:
        for method in [m for m, bank in self.banks.items() if not bank.adapters()]:
            del self.banks[method]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        batch = self._runtime[0].current
        if batch is None:
            return self.base_layer(x, *args, **kwargs)
        if x.shape[0] != batch.batch_size:
            batch = batch.expanded(x.shape[0])
        if torch.is_grad_enabled():
            # Under autograd the per-row weights are gathered in every call: activation
            # checkpointing re-runs the forward and must see the same operations again.
            return self._compile(batch, x)(batch, x)
        return batch.step(id(self), x, self._compile)(batch, x)

    def _base(self, batch: AdapterBatch, x: Tensor) -> Tensor:
        return self.base_layer(x)

    def _compile(self, batch: AdapterBatch, x: Tensor) -> Step:
        """One function ``(batch, x) -> out`` for batches like ``batch``, with every bank's strategy chosen.
        The bare base layer when no row uses an adapter here."""
        active = [bank for bank in self.banks.values() if bank.plan(batch) is not None]
        if not active:
            return self._base
        inputs = [step for bank in active if (step := bank.input_step(batch)) is not None]
        sample = x
        for step in inputs:
            sample = step(batch, sample)
        if not inputs and len(active) == 1:  # the usual case: one bank, maybe fused with the base matmul
            fused = active[0].fused_step(batch, self, x)
            if fused is not None:
                return fused
        replacing = [bank for bank in active if bank.replaces_base]
        base = replacing[0].base_step(batch, self, sample) if replacing else self._base
        outputs = [step for bank in active if (step := bank.output_step(batch, sample, base)) is not None]
        if not inputs and len(outputs) == 1:  # the usual case: one additive or scaling bank
            output = outputs[0]
            return lambda batch, x: output(batch, x, base(batch, x))

        def run(batch: AdapterBatch, x: Tensor) -> Tensor:
            for step in inputs:
                x = step(batch, x)
            out = base(batch, x)
            for step in outputs:
                out = step(batch, x, out)
            return out

        return run

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
