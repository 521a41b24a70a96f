"""Bottleneck adapters (Houlsby et al., ICML 2019, arXiv 1902.00751; Pfeiffer et al., EACL 2021,
"AdapterFusion", arXiv 2005.00247) as a bank of per-row adapters.

A small two-layer network added to the *output* ``y = x W0ᵀ + b0`` of a targeted layer, with a
residual connection. For an adapter ``W_down: [size, out]``, ``W_up: [out, size]`` and its
activation ``σ`` (``relu``, the default as in the adapters library, ``gelu`` or ``silu``):

    y'_i = y_i + σ(y_i W_downᵀ) W_upᵀ

(no biases in the two projections). ``W_down`` is Kaiming-uniform, ``W_up`` zero, so a new adapter
is exactly the identity. Rows without an adapter are left as they are.

Placement (``style``, used when ``target_modules`` is ``None``): ``"houlsby"`` adapts the attention
output projection and the feed-forward output projection of every block, ``"pfeiffer"`` only the
feed-forward output projection. The layers are found by name (`ATTENTION_OUTPUTS`,
`FEEDFORWARD_OUTPUTS`): Llama/Qwen2/Mistral ``o_proj`` and ``down_proj``, GPT-2 ``attn.c_proj``
and ``mlp.c_proj``, and the usual names of other families. The adapter sits right after the
projection, before the block's residual addition, as in Houlsby's figure; Pfeiffer's extra
residual/LayerNorm rearrangement inside the adapter is not modelled.

A nonlinear adapter cannot be folded into ``W0``: `merge_into` raises.

Saved in PEFT's layout with flora's own ``peft_type = "BOTTLENECK"``: per module
``base_model.model.<module>.bottleneck_down.weight: [size, out]`` and
``base_model.model.<module>.bottleneck_up.weight: [out, size]``.

Strategies (all compute the same function; ``h`` is ``[rows, tokens, size]``):

- ``bmm`` (default): every row's ``W_downᵀ`` / ``W_upᵀ`` gathered into ``[batch, out, size]`` /
  ``[batch, size, out]`` (sizes zero-padded to the largest, zeros for rows without an adapter; all
  supported activations map 0 to 0), two batched matmuls for the whole batch.
- ``loop``: per distinct adapter, gather its rows, two matmuls, scatter-add back.
- ``segmented``: rows sorted by adapter once, one matmul pair per contiguous segment, one scatter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.methods.base import AdapterConfig, Bank, name_matches, pad_rank
from flora.methods.batch import AdapterBatch, PerBatch

STYLES = ("houlsby", "pfeiffer")
# Activations by name; each maps 0 to 0, which the padded ``bmm`` strategy relies on.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu}
# Module-name suffixes of the attention and feed-forward output projections of common architectures.
ATTENTION_OUTPUTS = (
    "o_proj",  # Llama, Qwen2, Mistral, Gemma, Phi-3
    "attn.c_proj",  # GPT-2
    "attn.out_proj",  # GPT-J
    "self_attn.out_proj",  # OPT
    "attention.out_proj",  # GPT-Neo
    "self_attn.dense",  # Phi
    "attention.dense",  # GPT-NeoX
    "self_attention.dense",  # Falcon, BLOOM
)
FEEDFORWARD_OUTPUTS = (
    "down_proj",  # Llama, Qwen2, Mistral, Gemma, Phi-3
    "mlp.c_proj",  # GPT-2, GPT-Neo
    "mlp.fc_out",  # GPT-J
    "fc2",  # OPT, Phi
    "dense_4h_to_h",  # GPT-NeoX, Falcon, BLOOM
)


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter hyperparameters.

    Args:
        size: the bottleneck width (``W_down: [size, out]``), an integer >= 1.
        style: ``"houlsby"`` (attention and feed-forward outputs) or ``"pfeiffer"`` (feed-forward
            output only); decides the targets when ``target_modules`` is ``None``.
        non_linearity: ``"relu"`` (default), ``"gelu"`` or ``"silu"`` (alias ``"swish"``).
        target_modules: ``None`` for the style's default placement, else as for every method.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    target_modules: list[str] | str | None = None
    size: int = 64
    style: str = "houlsby"
    non_linearity: str = "relu"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"bottleneck size={self.size!r} is invalid (expected an integer >= 1)")
        if self.style not in STYLES:
            raise ValueError(f"bottleneck style={self.style!r} is unknown (expected one of {', '.join(STYLES)})")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(
                f"bottleneck non_linearity={self.non_linearity!r} is unknown (expected one of {', '.join(ACTIVATIONS)})"
            )

    def default_targets(self) -> tuple[str, ...]:
        """The module-name suffixes adapted when ``target_modules`` is ``None``."""
        return FEEDFORWARD_OUTPUTS if self.style == "pfeiffer" else ATTENTION_OUTPUTS + FEEDFORWARD_OUTPUTS

    def targets(self, module_name: str, is_output_layer: bool) -> bool:
        if self.target_modules is not None:
            return super().targets(module_name, is_output_layer)
        if self.exclude_modules is not None and name_matches(module_name, self.exclude_modules):
            return False
        return not is_output_layer and name_matches(module_name, list(self.default_targets()))

    @classmethod
    def from_peft_dict(cls, data, source: str = "adapter_config.json") -> BottleneckConfig:
        """As for every method, but ``target_modules: null`` (the style's placement) is allowed."""
        if data.get("target_modules") is not None:
            return super().from_peft_dict(data, source)
        config = super().from_peft_dict({**data, "target_modules": []}, source)
        config.target_modules = None
        return config


def bottleneck_delta(y: Tensor, down: Tensor, up: Tensor, activation: Callable[[Tensor], Tensor]) -> Tensor:
    """``σ(y W_downᵀ) W_upᵀ`` for ``y: [..., out]``, ``down: [size, out]``, ``up: [out, size]``."""
    return activation(y @ down.T) @ up.T


class BottleneckBank(Bank):
    method = "bottleneck"
    strategies = ("bmm", "loop", "segmented")
    param_names = ("bottleneck_down.weight", "bottleneck_up.weight")

    def __init__(self, in_features, out_features, state) -> None:
        super().__init__(in_features, out_features, state)
        self.bottleneck_down = nn.ParameterDict()
        self.bottleneck_up = nn.ParameterDict()
        self.non_linearity: dict[str, str] = {}

    def adapters(self) -> list[str]:
        return list(self.bottleneck_down.keys())

    def rank(self, name: str) -> int:
        return self.bottleneck_down[name].shape[0]

    @classmethod
    def shapes(cls, config: BottleneckConfig, module_name, in_features, out_features) -> dict[str, tuple[int, ...]]:
        return {
            "bottleneck_down.weight": (config.size, out_features),
            "bottleneck_up.weight": (out_features, config.size),
        }

    def add(self, name, config: BottleneckConfig, module_name, weights, like) -> None:
        if weights is None:
            down = torch.empty(config.size, self.out_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            up = torch.zeros(self.out_features, config.size)
        else:
            checked = self._checked(name, config, module_name, weights)
            down, up = checked["bottleneck_down.weight"], checked["bottleneck_up.weight"]
        self.bottleneck_down[name] = nn.Parameter(down.to(like))
        self.bottleneck_up[name] = nn.Parameter(up.to(like))
        self.non_linearity[name] = config.non_linearity

    def remove(self, name: str) -> None:
        super().remove(name)
        self.non_linearity.pop(name, None)

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return {"bottleneck_down.weight": self.bottleneck_down[name], "bottleneck_up.weight": self.bottleneck_up[name]}

    def merge_into(self, name: str, weight_oi: Tensor, bias: Tensor | None) -> None:
        raise ValueError(
            f"bottleneck adapter {name!r} cannot be merged into the base weights: y + W_up σ(W_down y) is "
            f"nonlinear in y (serve it unmerged through AdapterModel)"
        )

    # -- forward -------------------------------------------------------------------------------

    def _activation(self, name: str) -> Callable[[Tensor], Tensor]:
        return ACTIVATIONS[self.non_linearity[name]]

    def _kernel(self, strategy: str) -> Callable[[AdapterBatch, Tensor], Tensor]:
        """``(batch, out: [batch, tokens, out]) -> out + delta`` for ``strategy`` (the adapter reads the base
        output). ``loop`` and ``segmented`` update ``out`` in place."""
        if strategy == "loop":
            groups = PerBatch(lambda batch: [(rows, self.bottleneck_down[n], self.bottleneck_up[n], self._activation(n))
                                             for n, rows in self.plan(batch).rows.items()])  # fmt: skip

            def loop(batch: AdapterBatch, out: Tensor) -> Tensor:
                deltas = [(rows, bottleneck_delta(out.index_select(0, rows), *rest)) for rows, *rest in groups(batch)]
                for rows, delta in deltas:
                    out.index_add_(0, rows, delta)
                return out

            return loop
        if strategy == "segmented":

            def segments(batch: AdapterBatch) -> tuple[Tensor, list]:
                order, segments = [], []
                for name, rows in self.plan(batch).groups.items():
                    weights = (self.bottleneck_down[name], self.bottleneck_up[name], self._activation(name))
                    segments.append((len(order), len(order) + len(rows), *weights))
                    order.extend(rows)
                return torch.tensor(order, device=batch.device), segments

            kept = PerBatch(segments)

            def segmented(batch: AdapterBatch, out: Tensor) -> Tensor:
                order, segments = kept(batch)
                grouped = out.index_select(0, order)
                delta = torch.cat([bottleneck_delta(grouped[s:e], *rest) for s, e, *rest in segments])
                return out.index_add_(0, order, delta)

            return segmented
        tables = PerBatch(self._row_tables)

        def bmm(batch: AdapterBatch, out: Tensor) -> Tensor:
            down_rows, up_rows, activation = tables(batch)
            return torch.baddbmm(out, activation(torch.bmm(out, down_rows)), up_rows)

        return bmm

    def _row_tables(self, batch: AdapterBatch) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """For ``bmm``: ``down_rows [batch, out, size]``, ``up_rows [batch, size, out]`` (sizes zero-padded
        to the largest, zeros for rows without an adapter) and the rows' activation."""
        plan = self.plan(batch)
        size = max(self.rank(n) for n in plan.groups)
        like = self.bottleneck_down[next(iter(plan.groups))]
        zeros_down, zeros_up = like.new_zeros(self.out_features, size), like.new_zeros(size, self.out_features)
        down_rows = self.row_table(zeros_down, lambda n: pad_rank(self.bottleneck_down[n].T, size, 1))(batch)
        up_rows = self.row_table(zeros_up, lambda n: pad_rank(self.bottleneck_up[n].T, size, 0))(batch)
        by_activation: dict[str, list[int]] = {}
        for name, rows in plan.groups.items():
            by_activation.setdefault(self.non_linearity[name], []).extend(rows)
        if len({ACTIVATIONS[a] for a in by_activation}) == 1:
            return down_rows, up_rows, ACTIVATIONS[next(iter(by_activation))]
        masks = []  # rows of different activations: each applied where its rows are (other rows stay 0)
        for act, rows in by_activation.items():
            mask = torch.zeros(batch.batch_size, 1, 1, dtype=torch.bool, device=like.device)
            mask[rows] = True
            masks.append((mask, ACTIVATIONS[act]))

        def activation(h: Tensor) -> Tensor:
            return functools.reduce(lambda h, mask_act: torch.where(mask_act[0], mask_act[1](h), h), masks, h)

        return down_rows, up_rows, activation

    def output_step(self, batch, x, base):
        size = self.out_features
        sample = functools.cache(lambda: base(batch, x).reshape(batch.batch_size, -1, size))
        run = self.choose_strategy(self.plan(batch), x.reshape(batch.batch_size, -1, self.in_features), self._kernel,
                                   trial=lambda kernel: kernel(batch, sample().clone()))  # fmt: skip
        return lambda batch, x, out: run(batch, out.reshape(batch.batch_size, -1, size)).reshape(out.shape)
