"""A batch's adapter state, in one owner: `AdapterBatch`, and `AdapterRuntime`, what a model's layers share.

transformers calls an adapted ``Linear`` with its input alone, so the layers of an `AdapterModel`
read the batch in force from the one object they share, the model's `AdapterRuntime` (its
``current``, set by `AdapterRuntime.using`). Everything that depends on which adapter each row
uses lives in that batch, built once per routing (one forward, one `generate` call, one server
step):

- ``names``: the adapter of each row (``None``: the base model);
- the rows of each bank's adapters (`Plan`, ``plans``) and of the prompt- and prefix-tuning
  adapters (`flora.methods.prompt.VirtualPlan`, ``virtual``);
- each adapted layer's compiled function per input shape (``layers``), with the strategies the
  banks chose; a LoRA group's computation that its sibling layers share (`GroupRun`, ``runs``);
- ``carried``: the compiled functions taken over from the last batch of the same ``shape``.

A compiled function takes the batch it runs under, ``step(batch, x)``, and derives what it needs
of the rows from that batch when it first runs under it (`PerBatch`): so a batch whose rows use
other adapters, but whose `AdapterRuntime.shape` is the same (the same kinds of adapter, the same
size buckets as the autotuner's), runs the functions the last one compiled. A server's batch
changes by a row or two at almost every step; carrying over, it only writes those rows' LoRA
tables (`flora.methods.slot_tables`, kept in the runtime across batches).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import Tensor

from flora.kernels.autotune import Autotuner, token_bucket
from flora.methods.prompt import VirtualPlan
from flora.methods.slot_tables import SlotTables

Size = tuple[int, ...]
Step = Callable[["AdapterBatch", Tensor], Tensor]  # a compiled layer function: (batch in force, x) -> out
CARRIED_SHAPES = 32  # batch shapes whose compiled layers a runtime keeps to carry over
T = TypeVar("T")


@dataclass
class Plan:
    """The rows of one bank's adapters in a batch: ``groups`` maps an adapter to its rows, in first-seen order."""

    groups: dict[str, list[int]]
    device: torch.device

    def one_adapter_for_all(self, batch_size: int) -> bool:
        """Whether one adapter serves every one of ``batch_size`` rows."""
        return len(self.groups) == 1 and len(next(iter(self.groups.values()))) == batch_size

    @functools.cached_property
    def rows(self) -> dict[str, Tensor]:
        """The same rows as index tensors."""
        return {name: torch.tensor(rows, device=self.device) for name, rows in self.groups.items()}


class GroupRun:
    """One batch's computation for the members of a LoRA group (`flora.methods.lora_group`):
    ``kernel(batch, x)`` gives each member's update, ``[batch, tokens, out_m]``, in the order of
    ``position`` (member id -> index). The last input and its updates are kept until every member
    has read them."""

    def __init__(self, kernel: Callable[[AdapterBatch, Tensor], list[Tensor]], position: dict[int, int]) -> None:
        self.kernel = kernel
        self.position = position
        self.input: Tensor | None = None
        self._deltas: list[Tensor | None] = []
        self._pending = 0

    def delta(self, member: object, batch: AdapterBatch, x: Tensor) -> Tensor:
        """``member``'s update for ``x: [..., in]``, computed once for the members that share ``x`` and
        handed to each member once: the member owns it (and may add into it in place)."""
        slot = self.position[id(member)]
        if self.input is not x or self._deltas[slot] is None:
            self.input, self._deltas = x, list(self.kernel(batch, x.reshape(x.shape[0], -1, x.shape[-1])))
            self._pending = len(self.position)
        delta, self._deltas[slot] = self._deltas[slot], None
        self._pending -= 1
        if self._pending <= 0:  # every member has its update: hold nothing past this layer group
            self.input, self._deltas = None, []
        return delta


class PerBatch(Generic[T]):
    """What a compiled function derives from the batch it runs under (row indices, row tables), made
    when it first runs under a batch and kept while it runs under that one."""

    __slots__ = ("build", "batch", "value")

    def __init__(self, build: Callable[[AdapterBatch], T]) -> None:
        self.build = build
        self.batch: AdapterBatch | None = None
        self.value: T | None = None

    def __call__(self, batch: AdapterBatch) -> T:
        if batch is not self.batch:
            self.value, self.batch = self.build(batch), batch
        return self.value


@dataclass(eq=False)
class AdapterBatch:
    """The adapter state of one batch (see the module docstring); `AdapterRuntime.batch` makes it.

    Attributes:
        names: one entry per row, an adapter name or ``None`` for the base model.
        device: where row-index tensors live.
        virtual: the rows' prompt and prefix tokens, ``None`` when no row has any.
        shape: what decides every compiled function apart from the rows' adapters (`AdapterRuntime.shape`;
            ``None``: nothing carries over to or from this batch).
        layers: each adapted layer's compiled function by ``(id(layer), x.shape[1:])``.
        carried: the compiled functions of earlier batches of the same ``shape``, by `carried_key`.
        plans: each bank's `Plan` (``None``: no row uses one of its adapters), by bank.
        runs: each LoRA group's `GroupRun` by ``(id(group), x.shape[:-1])``.
    """

    names: tuple[str | None, ...]
    device: torch.device
    virtual: VirtualPlan | None = None
    shape: Hashable | None = None
    layers: dict[tuple[int, Size], Step] = field(default_factory=dict)
    carried: dict[tuple[int, ...], Step] = field(default_factory=dict)
    plans: dict[Hashable, Plan | None] = field(default_factory=dict)
    runs: dict[tuple[int, Size], GroupRun] = field(default_factory=dict)
    _expanded: dict[int, AdapterBatch] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.names)

    @functools.cached_property
    def rows(self) -> dict[str, list[int]]:
        """Row indices of every adapter in the batch, in first-seen order (shared: read, don't change)."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            if name is not None:
                rows.setdefault(name, []).append(row)
        return rows

    def plan(self, bank: Hashable, holds: Callable[[str], bool]) -> Plan | None:
        """The `Plan` of ``bank``, which holds the adapters for which ``holds(name)``: made once per batch."""
        if bank not in self.plans:
            groups = {name: rows for name, rows in self.rows.items() if holds(name)}
            self.plans[bank] = Plan(groups, self.device) if groups else None
        return self.plans[bank]

    def expanded(self, batch_size: int) -> AdapterBatch:
        """The batch whose rows repeat each row ``k`` times in place (beam search, ``num_return_sequences``):
        ``[a, b] -> [a, a, b, b]`` for ``k = 2``."""
        if batch_size == self.batch_size:
            return self
        if batch_size not in self._expanded:
            if batch_size % self.batch_size:
                raise ValueError(f"a layer saw a batch of {batch_size} rows, but adapter_names has "
                                 f"{self.batch_size} entries (expected a multiple)")  # fmt: skip
            k = batch_size // self.batch_size
            virtual = None if self.virtual is None else self.virtual.repeated(k)
            self._expanded[batch_size] = AdapterBatch(tuple(n for n in self.names for _ in range(k)), self.device,
                                                      virtual)  # fmt: skip
        return self._expanded[batch_size]

    def step(self, layer: int, x: Tensor, compile: Callable[[AdapterBatch, Tensor], Step]) -> Step:
        """Layer ``layer``'s compiled function for inputs shaped like ``x``: this batch's, a carried one,
        or ``compile(self, x)``."""
        key = (layer, x.shape[1:])  # the rows are the batch's
        run = self.layers.get(key)
        if run is None:
            run = self.carried.get(carried_key(key)) if self.carried else None
            run = self.layers[key] = compile(self, x) if run is None else run
        return run


def carried_key(key: tuple[int, Size]) -> tuple[int, ...]:
    """``(id(layer), x.shape[1:])`` -> the same with the token count bucketed: ``[tokens, in]`` inputs of
    5 to 8 tokens share one key (the autotuner's buckets)."""
    layer, shape = key
    return (layer, token_bucket(shape[0]), *shape[1:]) if len(shape) > 1 else (layer, *shape)


class AdapterRuntime:
    """What an `AdapterModel`'s adapted layers and banks share (see the module docstring).

    Attributes:
        current: the batch in force; ``None`` outside a forward pass (the layers are the bare base model).
        strategy: how per-row adapters are computed (`flora.model.STRATEGIES`).
        tuner: the autotuner's measurements (``strategy == "auto"``).
        read_only: adapters are only added, replaced or deleted, never written in place
            (`AdapterModel.adapters_read_only`).
        adapter_dtype: the dtype of LoRA's per-row tables (``None``: the adapters' own).
        tables: LoRA's per-row tables for one-token rows (decoding) and for prompts, kept across batches.
    """

    def __init__(self) -> None:
        self.current: AdapterBatch | None = None
        self.strategy = "auto"
        self.tuner = Autotuner()
        self.read_only = False
        self.adapter_dtype: torch.dtype | None = None
        self.tables = (SlotTables(), SlotTables())
        # What decides a batch's shape: each adapter's kind (interned), and a token for the adapted
        # layers and their banks, renewed when they change (`restructured`).
        self._kinds: dict[str, int] = {}
        self._kind_numbers: dict[Hashable, int] = {}
        self._structure: tuple = ()
        self._structure_token = object()
        self._carriers: OrderedDict[Hashable, AdapterBatch] = OrderedDict()  # shape -> its last batch

    @contextmanager
    def using(self, batch: AdapterBatch | None) -> Iterator[AdapterBatch | None]:
        """Within the block, the adapted layers run ``batch``'s rows."""
        previous, self.current = self.current, batch
        try:
            yield batch
        finally:
            self.current = previous

    def batch(self, names: tuple[str | None, ...], device: torch.device, carry: Hashable | None = None) -> AdapterBatch:
        """A new batch of rows ``names``. With ``carry`` (what else decides the layers' compiled functions:
        the model's dtype and device), it runs what the layers compiled for the last batch of the same
        `shape`, and is kept for the next one of its shape."""
        batch = AdapterBatch(names, device)
        batch.shape = None if carry is None else self.shape(names, carry)
        if batch.shape is not None:
            previous = self._carriers.pop(batch.shape, None)
            if previous is not None:
                batch.carried = previous.carried | {carried_key(key): run for key, run in previous.layers.items()}
            self._carriers[batch.shape] = batch
            if len(self._carriers) > CARRIED_SHAPES:
                self._carriers.popitem(last=False)
        return batch

    def shape(self, names: tuple[str | None, ...], mode: Hashable) -> Hashable:
        """What decides every layer's compiled function for rows ``names`` apart from which adapter each
        row uses: the layers and banks there are, the strategy setting, ``mode``, the kinds of adapter
        in the batch (each: its method and, per layer it adapts, what its bank's kernels depend on:
        `Bank.kind`), and what the autotuner's key reads of the batch (`Bank.choose_strategy`: sizes
        bucketed, whether one adapter serves every row)."""
        kinds, adapters, rows = set(), set(), 0
        for name in names:
            if name is not None:
                kinds.add(self._kinds[name])
                adapters.add(name)
                rows += 1
        whole_batch = len(adapters) == 1 and rows == len(names)
        sizes = tuple(map(token_bucket, (len(names), len(adapters), rows)))
        return self._structure_token, self.strategy, self.adapter_dtype, mode, frozenset(kinds), sizes, whole_batch

    def added(self, name: str, kind: Hashable) -> None:
        """Adapter ``name`` was installed; ``kind``: what of it decides the layers' compiled functions."""
        self._kinds[name] = self._kind_numbers.setdefault(kind, len(self._kind_numbers))

    def removed(self, name: str) -> None:
        self._kinds.pop(name, None)
        for tables in self.tables:
            tables.forget(name)

    def restructured(self, structure: tuple) -> None:
        """The adapted layers, their banks and LoRA groups are now ``structure``: compiled functions of
        another structure no longer carry over."""
        if structure != self._structure:
            self._structure, self._structure_token = structure, object()
            self._carriers.clear()
