"""`lowrank_bmm`'s per-row tables, kept between routings for all of a model's LoRA groups together.

Without autograd, every LoRA group (`flora.methods.lora_group`) reads each row's factors from tables

    a_rows [slots, R, in]          b_rows [slots, R_m, out_m]   (one per member m)

of which a batch of ``n`` rows reads slots ``0 .. n - 1``: slot ``r`` holds the factors of row ``r``'s
adapter (zeros for a row whose adapter the group does not hold). A server's batch changes by a row
or two from one routing to the next (`flora.serve.engine` keeps its rows in their slots), so the
tables outlive a routing and a routing writes only the slots whose adapter changed.

Which slots changed is the same for every group, so one `SlotTables` serves them all (it lives on
the model's `RoutingState`, one for decoding steps and one for prompts, so that a server's
prefills do not overwrite its running rows). The first group to ask for a new routing's tables
writes the changed slots of every group's tables: per slot one ``torch._foreach_copy_`` of the
adapter's factors in every group (11 small tensors per decoder layer of a Llama-style model with
every linear layer adapted) and one ``_foreach_zero_``, instead of a pass over the rows and a copy
per factor in each group. A group
seen for the first time (or with another layout: ranks, members, dtype) gets tables of its own,
written for every row of the routing that asks, and is dropped when a routing passes without
asking for it. The storage grows in steps of 8 slots and is kept at the largest batch seen.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flora.routing import Routing, RoutingState

SLOT_STEP = 8

RowFactors = tuple[Tensor, list[Tensor]]  # one adapter's ``A [R, in]`` and its members' ``s·Bᵀ [R_m, out_m]``
Views = tuple[Tensor, list[tuple[int, int, Tensor]]]  # `lowrank_bmm`'s ``a_rows`` and ``b_rows``

_UNWRITTEN = object()


class GroupTables:
    """One LoRA group's tables for one `GroupLayout`, ``slots`` rows each."""

    def __init__(self, slots: int, like: RowFactors, layout: GroupLayout) -> None:
        with torch.inference_mode(False):  # writable later in and out of inference mode
            self.a = like[0].new_empty(slots, *like[0].shape)
            self.bs = [b.new_empty(slots, *b.shape) for b in like[1]]
        self.layout = layout
        self.used = 0  # the count of the last routing that read these tables (`SlotTables.count`)
        self._views: dict[int, Views] = {}

    def slot(self, r: int) -> list[Tensor]:
        """Slot ``r`` of every table (views), in the order of `parts`."""
        return [self.a[r], *(b[r] for b in self.bs)]

    def parts(self, name: str | None) -> list[Tensor | None]:
        """Adapter ``name``'s factors in the order of `slot`, ``None`` for each where its rows read zeros."""
        if name is None or not self.layout.holds(name):
            return [None] * (1 + len(self.bs))
        a, bs = self.layout.factors(name)
        return [a, *bs]

    def views(self, n: int) -> Views:
        """The tables of the first ``n`` slots, as `lowrank_bmm` reads them."""
        views = self._views.get(n)
        if views is None:
            views = self._views[n] = (self.a[:n], b_tables([b[:n] for b in self.bs], self.layout.ranks))
        return views


class GroupLayout(NamedTuple):
    """What a LoRA group's tables hold for a batch: ``holds(name)``, whether the group holds adapter
    ``name`` (else its rows read zeros); ``fits(name)``, whether its factors fit these tables (no
    member's rank above theirs); ``factors(name)``, its `RowFactors` (`LoraGroup._row_factors`);
    ``ranks``, each member's columns of ``x Aᵀ``."""

    holds: Callable[[str], bool]
    fits: Callable[[str], bool]
    factors: Callable[[str], RowFactors]
    ranks: tuple[int, ...]


class SlotTables:
    """Every LoRA group's per-row tables for one kind of input (see the module docstring).

    ``names[r]``: the adapter whose factors slot ``r`` of every group's tables holds (``None``:
    zeros), and ``written[r]`` the factors written there, compared with the adapter's current ones
    when the adapters may have changed in place (not read-only). ``count`` counts the routings that
    wrote."""

    def __init__(self) -> None:
        self.groups: dict[Hashable, GroupTables] = {}
        self.slots = 0
        self.names: list[object] = []
        self.written: list[list[Tensor | None] | None] = []
        self.owner: Routing | None = None
        self.count = 0
        self._sources: dict[str, list[Tensor | None]] = {}  # adapters' factors in every group, in `_slot` order
        self._slot_views: dict[int, list[Tensor]] = {}

    def forget(self, name: str) -> None:
        """Adapter ``name`` was replaced or removed: its slots are written again when next used."""
        self.names = [_UNWRITTEN if kept == name else kept for kept in self.names]
        self._sources.pop(name, None)

    def tables(self, routing: Routing, key: Hashable, layout: GroupLayout, read_only: bool) -> Views:
        """The tables of the group whose layout is ``key`` for ``routing``'s rows."""
        if self.owner is not routing:
            self._write(routing, read_only)
        group = self.groups.get(key)
        if group is None:
            group = self._add(key, routing, layout)
        group.used = self.count
        return group.views(routing.batch_size)

    def _write(self, routing: Routing, read_only: bool) -> None:
        """Make every group's slots ``0 .. n - 1`` hold ``routing``'s rows' factors."""
        self.count += 1
        self.owner = routing
        names = routing.names
        if len(names) > self.slots:  # grow: every group's tables are made again when next asked for
            self.slots = -(-len(names) // SLOT_STEP) * SLOT_STEP
            self.names, self.written = [_UNWRITTEN] * self.slots, [None] * self.slots
            self._drop(list(self.groups))
        if not read_only:
            self._sources = {}
        recheck = not read_only  # adapters may have changed in place: the rows holding one are compared
        changed = [r for r, name in enumerate(names)
                   if name != self.names[r] or (recheck and self.written[r] is not None)]  # fmt: skip
        adapters = {names[r] for r in changed} - {None}
        # Groups this routing has no use for go: those the last routing did not read (another layout
        # took their place), and those too small for an adapter it brings (a group's ranks grew).
        self._drop([key for key, group in self.groups.items()
                    if group.used < self.count - 1 or not all(map(group.layout.fits, adapters))])  # fmt: skip
        for r in changed:
            name, source = names[r], self._source(names[r])
            written = self.written[r] or []
            if name == self.names[r] and len(written) == len(source) and all(map(operator.is_, source, written)):
                continue  # the adapter's factors were not worked out again
            self._write_slot(self._slot(r), source)
            self.names[r], self.written[r] = name, None if name is None else source

    def _add(self, key: Hashable, routing: Routing, layout: GroupLayout) -> GroupTables:
        """A group's new tables, written for every row of ``routing``; the slots past its rows are
        written again in every group when next used (this group's hold nothing yet)."""
        like = layout.factors(next(name for name in routing.names if name is not None and layout.holds(name)))
        group = GroupTables(self.slots, like, layout)
        for r, name in enumerate(routing.names):
            self._write_slot(group.slot(r), group.parts(name))
        n = routing.batch_size
        self.names[n:] = [_UNWRITTEN] * (self.slots - n)
        self.groups[key] = group
        self._regrouped()
        return group

    def _drop(self, keys: list[Hashable]) -> None:
        """Drop the groups ``keys``."""
        for key in keys:
            del self.groups[key]
        if keys:
            self._regrouped()

    def _regrouped(self) -> None:
        """The set of groups changed: what is kept across them is worked out again."""
        self._sources, self._slot_views = {}, {}

    @staticmethod
    def _write_slot(slot: list[Tensor], source: list[Tensor | None]) -> None:
        """Copy ``source`` into ``slot`` (views of the tables), zeros where it is ``None``."""
        pairs = [(d, s) for d, s in zip(slot, source, strict=True) if s is not None]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
        if len(pairs) < len(slot):
            torch._foreach_zero_([d for d, s in zip(slot, source, strict=True) if s is None])

    def _source(self, name: str | None) -> list[Tensor | None]:
        """Adapter ``name``'s factors in every group, in `_slot` order (``None`` where it reads zeros)."""
        source = self._sources.get(name)
        if source is None:
            source = self._sources[name] = [part for group in self.groups.values() for part in group.parts(name)]
        return source

    def _slot(self, r: int) -> list[Tensor]:
        """Slot ``r`` of every group's tables."""
        views = self._slot_views.get(r)
        if views is None:
            views = self._slot_views[r] = [view for group in self.groups.values() for view in group.slot(r)]
        return views


def b_tables(tables: list[Tensor], ranks: tuple[int, ...]) -> list[tuple[int, int, Tensor]]:
    """``(start, stop, table)`` per member of a group: its ranks' columns of ``x Aᵀ``."""
    starts = [sum(ranks[:m]) for m in range(len(ranks))]
    return [(start, start + rank, table) for start, rank, table in zip(starts, ranks, tables, strict=True)]


def slot_tables(state: RoutingState) -> tuple[SlotTables, SlotTables]:
    """A model's tables for decoding steps (one token per row) and for prompts, made on first use."""
    if state.slot_tables is None:
        state.slot_tables = (SlotTables(), SlotTables())
    return state.slot_tables
