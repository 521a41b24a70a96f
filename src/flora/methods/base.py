"""What every PEFT method shares: its config (with Hugging Face PEFT's JSON names) and its *bank*.

A bank is one method's adapters in one adapted layer: the parameters of every loaded adapter of
that method, keyed by adapter name (``ParameterDict``, PEFT's layout per adapter). For a forward
pass it derives a *plan* from the routing (which rows use which of its adapters, the per-row
weights gathered for the batched strategies) and memoises it for as long as the routing lives.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flora.kernels.autotune import token_bucket
from flora.routing import Routing, RoutingState

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


@dataclass
class AdapterConfig:
    """Fields every method has. ``target_modules``: module names (a module matches when its name
    equals one or ends with ``"." + one``), a regular expression matched against the full name, or
    ``"all-linear"`` (every Linear/Conv1D but the output layer), as in PEFT."""

    peft_type: ClassVar[str]
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None

    # PEFT fields that flora reads and writes under another name: {flora_name: peft_name}.
    peft_renames: ClassVar[dict[str, str]] = {}
    # PEFT fields flora does not implement, with the value that means "not used".
    peft_unsupported: ClassVar[dict[str, Any]] = {}

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content."""
        data = {self.peft_renames.get(k, k): v for k, v in dataclasses.asdict(self).items()}
        data.update(peft_type=self.peft_type, task_type="CAUSAL_LM", inference_mode=True)
        data.update({k: v for k, v in self.peft_unsupported.items() if k not in data})
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> AdapterConfig:
        """Build from ``adapter_config.json`` content; refuses options flora does not implement."""
        for key, unused in cls.peft_unsupported.items():
            value = data.get(key, unused)
            if value not in (unused, None, [], {}, False) and value != unused:
                raise ValueError(
                    f"{source}: {cls.peft_type} option {key}={value!r} is not supported by flora "
                    f"(expected {unused!r})"
                )
        names = {cls.peft_renames.get(f.name, f.name): f.name for f in dataclasses.fields(cls)}
        kwargs = {names[k]: v for k, v in data.items() if k in names}
        if kwargs.get("target_modules") is None:
            raise ValueError(f"{source}: target_modules is missing (expected a list of module names)")
        if isinstance(kwargs["target_modules"], (set, tuple)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        return cls(**kwargs)

    def targets(self, module_name: str, is_output_layer: bool) -> bool:
        """Whether this config adapts the module called ``module_name``."""
        if self.exclude_modules is not None and name_matches(module_name, self.exclude_modules):
            return False
        if self.target_modules == "all-linear":
            return not is_output_layer
        return name_matches(module_name, self.target_modules)


def name_matches(module_name: str, patterns: list[str] | str) -> bool:
    """PEFT's matching rule: a string is a regex on the full name, a list matches name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end of
    ``module_name`` (as a regex on whole name components) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass
class Plan:
    """What a bank derives from one routing: its adapters' rows, and memoised per-strategy data."""

    groups: dict[str, list[int]]
    rows: dict[str, Tensor]
    memo: dict[Hashable, Any] = field(default_factory=dict)

    def cached(self, key: Hashable, build):
        """``build()`` once per plan and autograd mode (tensors built without grad are not reused
        in a pass that needs gradients)."""
        key = (key, torch.is_grad_enabled())
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]


class Bank(nn.Module):
    """All adapters of one method in one layer with ``in_features -> out_features``.

    Subclasses set ``method``, ``strategies`` (the first is the default) and ``param_names``
    (PEFT's per-module tensor names, e.g. ``("lora_A.weight", "lora_B.weight")``), and implement
    `add`, `adapter_state`, `merge_into` and one or more of the forward hooks.
    """

    method: ClassVar[str]
    strategies: ClassVar[tuple[str, ...]]
    param_names: ClassVar[tuple[str, ...]]
    replaces_base: ClassVar[bool] = False

    def __init__(self, in_features: int, out_features: int, state: RoutingState) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._state = [state]  # a list, so nn.Module does not register it

    @property
    def state(self) -> RoutingState:
        return self._state[0]

    def adapters(self) -> list[str]:
        raise NotImplementedError

    def add(
        self,
        name: str,
        config: AdapterConfig,
        module_name: str,
        weights: dict[str, Tensor] | None,
        like: Tensor,
    ) -> None:
        """Add adapter ``name``: ``weights`` (keyed by ``param_names``) or a fresh initialisation,
        on the device and in the dtype of ``like`` (the base layer's weight)."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        for attr in self._parameter_dicts():
            parameters = getattr(self, attr)
            if name in parameters:
                del parameters[name]

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s tensors keyed by ``param_names`` (PEFT's layout)."""
        raise NotImplementedError

    def merge_into(self, name: str, weight_oi: Tensor, bias: Tensor | None) -> None:
        """Fold adapter ``name`` into a copy of the base weights, in place (``weight_oi: [out, in]``)."""
        raise NotImplementedError

    def _parameter_dicts(self) -> list[str]:
        return [n for n, m in self.named_children() if isinstance(m, nn.ParameterDict)]

    # -- forward -------------------------------------------------------------------------------

    def plan(self, routing: Routing) -> Plan | None:
        """The rows of this batch that use one of this bank's adapters (``None`` if there are none)."""
        key = ("plan", id(self))
        if key not in routing.memo:
            groups = routing.rows_by_adapter(self.adapters())
            rows = {n: torch.tensor(r, device=routing.device) for n, r in groups.items()}
            routing.memo[key] = Plan(groups, rows) if groups else None
        return routing.memo[key]

    def choose_strategy(self, plan: Plan, x: Tensor, candidates: dict[str, Any]) -> str:
        """The strategy in force: the model's choice when this method has it, its measured best
        under ``"auto"``, else this method's default. ``candidates`` maps names to thunks."""
        wanted = self.state.strategy
        if wanted in candidates:
            return wanted
        if wanted != "auto" or len(candidates) == 1:
            return self.strategies[0]
        tokens = token_bucket(x.shape[1])
        key = ("strategy", tokens)
        if key not in plan.memo:
            rank = max(self.rank(n) for n in plan.groups)
            tune_key = (
                self.method, self.in_features, self.out_features, rank, x.shape[0], tokens,
                len(plan.groups), sum(map(len, plan.groups.values())),
                x.device.type, x.dtype, torch.is_grad_enabled(),
            )  # fmt: skip
            plan.memo[key] = self.state.tuner.pick(tune_key, candidates)
        return plan.memo[key]

    def rank(self, name: str) -> int:
        return 1

    def scale_input(self, x: Tensor, plan: Plan, routing: Routing) -> Tensor:
        return x

    def base_output(self, x: Tensor, plan: Plan, routing: Routing, layer: nn.Module) -> Tensor:
        raise NotImplementedError

    def adjust_output(self, x: Tensor, out: Tensor, plan: Plan, routing: Routing) -> Tensor:
        return out

    # -- helpers for subclasses ----------------------------------------------------------------

    def _check_shape(self, name: str, module_name: str, key: str, got: Tensor, expected: tuple) -> None:
        if tuple(got.shape) != tuple(expected):
            raise ValueError(
                f"adapter {name!r}: layer {module_name}: {key} has shape {tuple(got.shape)} but the "
                f"base layer ({self.in_features} -> {self.out_features}) needs {tuple(expected)}"
            )

    def _row_table(self, plan: Plan, routing: Routing, identity: Tensor, rows_of) -> Tensor:
        """``[batch, *identity.shape]``: ``rows_of(name)`` for rows of this bank's adapters,
        ``identity`` for the others. One stack and one gather."""
        names = list(plan.groups)
        table = torch.stack([identity] + [rows_of(n) for n in names])
        index = [0] * routing.batch_size
        for slot, name in enumerate(names, start=1):
            for row in plan.groups[name]:
                index[row] = slot
        return table[torch.tensor(index, device=table.device)]
