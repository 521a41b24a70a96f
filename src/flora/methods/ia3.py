"""IA3 (Liu et al., 2022, arXiv 2205.05638) as a bank of per-row adapters.

A learned vector rescales a layer's activations: for attention-type targets its output,
``y = (x W0ᵀ + bias) ∘ l`` with ``l: [out]``; for the ``feedforward_modules`` its input,
``y = (x ∘ l) W0ᵀ + bias`` with ``l: [in]``. The same function and the same tensors as Hugging
Face PEFT (``ia3_l``: ``[out, 1]`` or ``[1, in]``), initialised to ones (the identity). Per row, the
vectors are gathered into ``[batch, 1, features]`` and applied element-wise: there is no matmul
to batch, so IA3 has one strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flora.methods.base import AdapterConfig, Bank, name_matches
from flora.methods.batch import AdapterBatch


@dataclass
class Ia3Config(AdapterConfig):
    """IA3: ``feedforward_modules`` (a subset of the targets) are scaled on their input."""

    peft_type: ClassVar[str] = "IA3"
    feedforward_modules: list[str] | str | None = None

    peft_unsupported: ClassVar[dict[str, Any]] = {"modules_to_save": None}

    def is_feedforward(self, module_name: str) -> bool:
        return self.feedforward_modules is not None and name_matches(module_name, self.feedforward_modules)


class Ia3Bank(Bank):
    method = "ia3"
    strategies = ("gather",)
    param_names = ("ia3_l",)

    def __init__(self, in_features, out_features, state) -> None:
        super().__init__(in_features, out_features, state)
        self.ia3_l = nn.ParameterDict()
        self._feedforward: dict[str, bool] = {}  # adapter -> scales the input (else the output)

    def adapters(self) -> list[str]:
        return list(self.ia3_l.keys())

    @classmethod
    def shapes(cls, config: Ia3Config, module_name, in_features, out_features) -> dict[str, tuple[int, ...]]:
        return {"ia3_l": (1, in_features) if config.is_feedforward(module_name) else (out_features, 1)}

    def add(self, name, config: Ia3Config, module_name, weights, like) -> None:
        if weights is None:
            vector = torch.ones(self.shapes(config, module_name, self.in_features, self.out_features)["ia3_l"])
        else:
            vector = self._checked(name, config, module_name, weights)["ia3_l"]
        self.ia3_l[name] = nn.Parameter(vector.to(like))
        self._feedforward[name] = config.is_feedforward(module_name)

    def remove(self, name: str) -> None:
        super().remove(name)
        self._feedforward.pop(name, None)

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    def merge_into(self, name: str, weight_oi: Tensor, bias: Tensor | None) -> None:
        vector = self.ia3_l[name].to(weight_oi)
        weight_oi *= vector  # [1, in] scales columns, [out, 1] scales rows
        if bias is not None and not self._feedforward[name]:
            bias *= vector.flatten()

    def kind(self, name: str) -> bool:
        return self._feedforward[name]  # scales the input or the output

    # -- forward -------------------------------------------------------------------------------

    def _scaling_step(self, batch: AdapterBatch, feedforward: bool) -> Callable[[AdapterBatch, Tensor], Tensor] | None:
        """``(batch, t) -> t ∘ l_row`` over the input (feed-forward adapters) or the output (the others)."""
        if not any(self._feedforward[n] == feedforward for n in self.plan(batch).groups):
            return None
        size = self.in_features if feedforward else self.out_features
        like = next(iter(self.ia3_l.values()))
        ones = like.new_ones(size)
        scales = self.row_table(
            ones, lambda n: self.ia3_l[n].flatten() if self._feedforward[n] is feedforward else ones
        )
        return lambda batch, t: (t.reshape(batch.batch_size, -1, size) * scales(batch).unsqueeze(1)).reshape(t.shape)

    def input_step(self, batch):
        return self._scaling_step(batch, feedforward=True)

    def output_step(self, batch, x, base):
        scale = self._scaling_step(batch, feedforward=False)
        return None if scale is None else (lambda batch, x, out: scale(batch, out))
