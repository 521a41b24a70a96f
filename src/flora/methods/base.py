"""What every PEFT method shares: its config (with Hugging Face PEFT's JSON names) and its *bank*.

A bank is one method's adapters in one adapted layer: the parameters of every loaded adapter of
that method, keyed by adapter name (``ParameterDict``, PEFT's layout per adapter). For a batch
(`flora.methods.batch.AdapterBatch`) it finds its rows (a `Plan`) and compiles its steps: closures
``(batch, x) -> ...`` with the strategy chosen, which derive the batch's per-row weights when they
first run under it (`flora.methods.batch.PerBatch`). The layer compiles once per batch and input
shape, so the decode steps of a `generate` call only run kernels, and a batch of the same shape
runs the same steps with its own rows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from flora.kernels.autotune import token_bucket
from flora.methods.batch import AdapterBatch, AdapterRuntime, PerBatch, Plan

K = TypeVar("K")

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
                    f"{source}: {cls.peft_type} option {key}={value!r} is not supported by flora (expected {unused!r})"
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


def pad_rank(t: Tensor, rank: int, dim: int) -> Tensor:
    """``t`` zero-padded along ``dim`` to size ``rank`` (``t`` itself when it is already)."""
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


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
    # Whether `merge_into` adds to the bias: `AdapterModel.merge_adapter` then gives a bias-less
    # base layer a zero bias first (BitFit).
    merge_adds_bias: ClassVar[bool] = False
    # Under "auto", the strategy taken without measuring when one adapter serves every row (for
    # LoRA: ``segmented``, then two plain matmuls); ``None`` measures as for any other batch.
    whole_batch_strategy: ClassVar[str | None] = None

    def __init__(self, in_features: int, out_features: int, runtime: AdapterRuntime) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._runtime = [runtime]  # a list, so nn.Module does not register it

    @property
    def runtime(self) -> AdapterRuntime:
        return self._runtime[0]

    def adapters(self) -> list[str]:
        raise NotImplementedError

    def holds(self, name: str) -> bool:
        """Whether adapter ``name`` has weights in this bank."""
        return name in getattr(self, self.param_names[0].split(".")[0])

    def kind(self, name: str) -> Hashable:
        """What of adapter ``name`` here decides this bank's compiled steps beyond which rows use it
        (`flora.methods.batch.AdapterRuntime.shape`): its rank by default."""
        return self.rank(name)

    @classmethod
    def shapes(
        cls, config: AdapterConfig, module_name: str, in_features: int, out_features: int
    ) -> dict[str, tuple[int, ...]]:
        """The shape of each of an adapter's tensors (keyed by ``param_names``) in a layer ``in ->
        out`` called ``module_name``, as ``config`` says (its rank, size, ...)."""
        raise NotImplementedError

    @classmethod
    def check_shapes(
        cls, name: str, config: AdapterConfig, module_name: str, in_features: int, out_features: int,
        shapes: dict[str, tuple[int, ...]],
    ) -> None:  # fmt: skip
        """`ValueError` naming the tensor unless ``shapes`` (keyed by ``param_names``) are what
        `shapes` expects."""
        for key, expected in cls.shapes(config, module_name, in_features, out_features).items():
            if tuple(shapes[key]) != expected:
                raise ValueError(
                    f"adapter {name!r}: layer {module_name}: {key} has shape {tuple(shapes[key])} but "
                    f"{config.peft_type} with this config on the base layer ({in_features} -> {out_features}) "
                    f"needs {expected}"
                )

    def add(
        self,
        name: str,
        config: AdapterConfig,
        module_name: str,
        weights: dict[str, Tensor] | None,
        like: Tensor,
    ) -> None:
        """Add adapter ``name``: ``weights`` (keyed by ``param_names``, shapes as `shapes` says) or a
        fresh initialisation, on the device and in the dtype of ``like`` (the base layer's weight)."""
        raise NotImplementedError

    def _checked(self, name: str, config: AdapterConfig, module_name: str,
                 weights: dict[str, Tensor]) -> dict[str, Tensor]:  # fmt: skip
        """``weights``, their shapes checked (`check_shapes`)."""
        shapes = {key: tuple(tensor.shape) for key, tensor in weights.items()}
        self.check_shapes(name, config, module_name, self.in_features, self.out_features, shapes)
        return weights

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

    # -- forward: each hook returns a step ``(batch, ...) -> ...`` with its strategy chosen ------------

    def plan(self, batch: AdapterBatch) -> Plan | None:
        """The rows of ``batch`` that use one of this bank's adapters (``None`` if there are none)."""
        return batch.plan(self, self.holds)

    def choose_strategy(
        self, plan: Plan, x: Tensor, build: Callable[[str], K], shape: tuple | None = None,
        trial: Callable[[K], Tensor] | None = None,
    ) -> K:  # fmt: skip
        """``build(strategy)`` for the strategy in force: the model's choice when this method has it, the
        measured fastest under ``"auto"``, else this method's default. ``trial(built)`` computes this
        bank's output for the sample ``x: [batch, tokens, in]`` with what ``build`` made, without side
        effects (called only when measuring). ``shape`` names what is computed, for the autotuner's key
        (default: this layer's features and the largest rank in the batch)."""
        wanted = self.runtime.strategy
        if wanted in self.strategies:
            return build(wanted)
        if wanted != "auto" or len(self.strategies) == 1:
            return build(self.strategies[0])
        if self.whole_batch_strategy and plan.one_adapter_for_all(x.shape[0]):
            return build(self.whole_batch_strategy)
        if shape is None:
            shape = (self.in_features, self.out_features, max(self.rank(n) for n in plan.groups))
        # Sizes are bucketed (powers of two): a server's ever-changing batches share measurements.
        key = (
            self.method, shape, token_bucket(x.shape[0]), token_bucket(x.shape[1]), token_bucket(len(plan.groups)),
            token_bucket(sum(map(len, plan.groups.values()))), x.device.type, x.dtype, torch.is_grad_enabled(),
        )  # fmt: skip
        tuner = self.runtime.tuner
        choice = tuner.known(key)
        if choice in self.strategies:
            return build(choice)
        built = {name: build(name) for name in self.strategies}
        choice = tuner.pick(key, {name: (lambda k=k: trial(k)) for name, k in built.items()})
        # The candidates ran without autograd: under it, what the chosen one derived is derived again.
        return build(choice) if torch.is_grad_enabled() else built[choice]

    def rank(self, name: str) -> int:
        return 1

    def input_step(self, batch: AdapterBatch) -> Callable[[AdapterBatch, Tensor], Tensor] | None:
        """``(batch, x) -> x`` applied before the base layer (IA3 on feed-forward layers), or ``None``."""
        return None

    def base_step(self, batch: AdapterBatch, layer: nn.Module, x: Tensor) -> Callable[[AdapterBatch, Tensor], Tensor]:
        """``(batch, x) -> out`` replacing the base layer (multiplicative methods)."""
        raise NotImplementedError

    def output_step(
        self, batch: AdapterBatch, x: Tensor, base: Callable[[AdapterBatch, Tensor], Tensor]
    ) -> Callable[[AdapterBatch, Tensor, Tensor], Tensor] | None:
        """``(batch, x, out) -> out`` applied after the base layer (additive and output-scaling methods),
        or ``None``. ``x`` is a sample input and ``base`` the base computation, for measuring."""
        return None

    def fused_step(
        self, batch: AdapterBatch, layer: nn.Module, x: Tensor
    ) -> Callable[[AdapterBatch, Tensor], Tensor] | None:
        """``(batch, x) -> out``: the base layer and this bank's change in one step, used when this bank is
        the only one with rows in the batch (LoRA: the update is the ``addmm`` input of the base
        matmul); ``None`` when the method has no such form. ``x`` is a sample input."""
        return None

    # -- helpers for subclasses ----------------------------------------------------------------

    def row_table(self, identity: Tensor, rows_of: Callable[[str], Tensor]) -> PerBatch[Tensor]:
        """``[batch, *identity.shape]`` per batch: ``rows_of(name)`` for the rows of this bank's adapters,
        ``identity`` for the others; one stack."""

        def build(batch: AdapterBatch) -> Tensor:
            plan = self.plan(batch)
            per_row = [identity] * batch.batch_size
            for name, rows in plan.groups.items():
                table = rows_of(name)
                for row in rows:
                    per_row[row] = table
            return torch.stack(per_row)

        return PerBatch(build)
