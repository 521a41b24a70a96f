"""`lowrank_bmm`'s per-row tables, kept between batches for all of a model's LoRA groups together.

Without autograd, every LoRA group (`flora.methods.lora_group`) of ``k`` members reads each row's
adapter from tables

    a_rows [slots, R, in],  R = Σ R_m          b_rows [slots, R_m, out_m]   (one per member m)

of which a batch of ``n`` rows reads slots ``0 .. n - 1``. Slot ``r`` holds row ``r``'s adapter:
member ``m``'s ranks ``R_m`` (the largest rank of ``m`` in the batch) take ``s_m A_m`` (``[r_m, in]``)
and ``B_mᵀ`` (``[r_m, out_m]``) in their first ``r_m`` rows and zeros after them (all zeros for a
row whose adapter does not adapt ``m``), so every row computes exactly its own
``s_m (x A_mᵀ) B_mᵀ``. A server's batch changes by a row or two from one step to the next
(`flora.serve.engine` keeps its rows in their slots), so the tables outlive a batch and a batch
writes only the slots whose adapter changed (every slot, unless the adapters are read-only).

Which slots changed is the same for every group, so one `SlotTables` serves them all (a model's
`flora.methods.batch.AdapterRuntime` has one for one-token rows and one for prompts, so that a
server's prefills do not overwrite its running rows; a batch's one-token steps read the prompts'
tables where its own prompts wrote them, as in `generate`). The first group to ask for a new batch's
tables writes the changed slots of every group's tables: one ``torch._foreach_copy_`` of the
adapters' factors into every group's slots, one ``_foreach_mul`` for the scalings and one
``_foreach_zero_`` for the padding. The Python side of a write is list concatenation: each slot's
views are made once (per adapter ranks), and each adapter's factors gathered once per write (a
read-only adapter's, once until it leaves). A group seen for the first time (or with other ranks
or dtype) gets tables of its own, written for every row of the batch that asks, and is dropped
when a batch passes without asking for it. The storage grows in steps of 8 slots, kept at the
largest batch seen, in the adapters' dtype or another (bfloat16: half the bytes a step reads).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

SLOT_STEP = 8

MemberFactors = tuple[Tensor, Tensor, float]  # one member's ``A [r, in]``, ``B [out, r]`` and scaling ``s``
# A group's tables' layout: its members (by id), their ranks in the batch, the tables' dtype and device.
TableKey = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]
Views = tuple[Tensor, list[tuple[int, int, Tensor]]]  # `lowrank_bmm`'s ``a_rows`` and ``b_rows``

_UNWRITTEN = object()


class TableSource(Protocol):
    """A LoRA group's members that have rows in a batch, as their tables see them
    (`flora.methods.lora_group.Members`); equal sources share tables."""

    in_features: int
    out_features: tuple[int, ...]

    def member_factors(self, name: str) -> list[MemberFactors | None]:
        """Adapter ``name``'s factors in each member (``None`` where it does not adapt that member)."""


# Adapter ``name``'s factors as a slot takes them: its rank ``r_m`` in each member (0 where it does not
# adapt one), then for the members it adapts ``A_m``, ``s_m`` and ``B_mᵀ``.
Sources = tuple[tuple[int, ...], list[Tensor], list[float], list[Tensor]]
# Slot ``r``'s views for an adapter of ranks ``r_m``: where ``s_m A_m`` and ``B_mᵀ`` go, and the padding.
Destinations = tuple[list[Tensor], list[Tensor], list[Tensor]]
_NO_ADAPTER: Sources = ((), [], [], [])


class GroupTables:
    """One LoRA group's tables for one layout (its members' ranks), ``slots`` rows each."""

    def __init__(self, slots: int, source: TableSource, ranks: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
        with torch.inference_mode(False):  # writable later in and out of inference mode
            self.a = torch.empty(slots, sum(ranks), source.in_features, dtype=dtype, device=device)
            self.bs = [torch.empty(slots, rank, out, dtype=dtype, device=device)
                       for rank, out in zip(ranks, source.out_features, strict=True)]  # fmt: skip
        self.source, self.ranks = source, ranks
        self.starts = [sum(ranks[:m]) for m in range(len(ranks))]
        self.used = 0  # the count of the last batch that read these tables (`SlotTables.count`)
        self._views: dict[int, Views] = {}
        self._destinations: dict[tuple[int, tuple[int, ...]], Destinations] = {}
        self._sources: dict[str, Sources] = {}

    def fits(self, name: str) -> bool:
        """Whether adapter ``name``'s factors fit these tables (no member's rank above theirs)."""
        ranks = self._sources_of(name)[0]
        return all(r_m <= rank for r_m, rank in zip(ranks, self.ranks, strict=True))

    def forget(self, name: str | None = None) -> None:
        """Gather adapter ``name``'s factors (every adapter's: ``None``) again when next written."""
        if name is None:
            self._sources.clear()
        else:
            self._sources.pop(name, None)

    def collect(self, r: int, name: str | None, writes: SlotWrites) -> None:
        """Add what makes slot ``r`` hold adapter ``name`` (zeros for ``None``) to ``writes``."""
        sources = _NO_ADAPTER if name is None else self._sources_of(name)
        key = (r, sources[0])
        if key not in self._destinations:
            self._destinations[key] = self._slot_views(r, sources[0] or (0,) * len(self.ranks))
        writes.add(self._destinations[key], sources)

    def _sources_of(self, name: str) -> Sources:
        """Adapter ``name``'s factors, gathered once until `forget` (its parameters' detached views: no
        autograd history is kept, and the model stays deep-copyable)."""
        sources = self._sources.get(name)
        if sources is None:
            held = self.source.member_factors(name)
            sources = self._sources[name] = (
                tuple(0 if f is None else f[0].shape[0] for f in held), [f[0].detach() for f in held if f],
                [f[2] for f in held if f], [f[1].detach().T for f in held if f])  # fmt: skip
        return sources

    def _slot_views(self, r: int, ranks: tuple[int, ...]) -> Destinations:
        views: Destinations = ([], [], [])
        for start, rank, b, r_m in zip(self.starts, self.ranks, self.bs, ranks, strict=True):
            a_slot, b_slot = self.a[r, start : start + rank], b[r]
            if r_m:
                views[0].append(a_slot[:r_m])
                views[1].append(b_slot[:r_m])
            if r_m < rank:
                views[2].extend((a_slot[r_m:], b_slot[r_m:]))
        return views

    def views(self, n: int) -> Views:
        """The tables of the first ``n`` slots, as `lowrank_bmm` reads them."""
        views = self._views.get(n)
        if views is None:
            b_rows = [(start, start + rank, b[:n]) for start, rank, b in zip(self.starts, self.ranks, self.bs,
                                                                            strict=True)]  # fmt: skip
            views = self._views[n] = (self.a[:n], b_rows)
        return views


class SlotWrites:
    """The copies that write some slots of every group's tables, made in three ``_foreach`` calls."""

    def __init__(self) -> None:
        self.scaled, self.a, self.scalings = [], [], []  # slot views that take s·A; A; s
        self.copied, self.b_t, self.zeroed = [], [], []  # slot views that take Bᵀ; Bᵀ; padding

    def add(self, destinations: Destinations, sources: Sources) -> None:
        for writes, more in zip((self.scaled, self.copied, self.zeroed, self.a, self.scalings, self.b_t),
                                (*destinations, *sources[1:]), strict=True):  # fmt: skip
            writes += more

    def run(self) -> None:
        if self.scaled and self.scaled[0].dtype == self.a[0].dtype:  # s·A computed in place, in the tables
            torch._foreach_copy_(self.scaled + self.copied, self.a + self.b_t)
            torch._foreach_mul_(self.scaled, self.scalings)
        elif self.scaled:  # s·A rounded once to the tables' dtype
            torch._foreach_copy_(self.scaled + self.copied, [*torch._foreach_mul(self.a, self.scalings), *self.b_t])
        if self.zeroed:
            torch._foreach_zero_(self.zeroed)


class SlotTables:
    """Every LoRA group's per-row tables for one kind of input (see the module docstring).

    ``names[r]``: the adapter whose factors slot ``r`` of every group's tables holds (``None``:
    zeros); kept across routings only for read-only adapters (a server's: they change only by being
    replaced or removed, `forget`), while adapters that may be trained are written again for each
    routing, which then reads their weights as they are. ``count`` counts the batches that wrote."""

    def __init__(self) -> None:
        self.groups: dict[TableKey, GroupTables] = {}
        self.slots = 0
        self.names: list[object] = []
        self.owner: tuple[str | None, ...] | None = None
        self.count = 0

    def forget(self, name: str) -> None:
        """Adapter ``name`` was replaced or removed: its slots are written again when next used."""
        self.names = [_UNWRITTEN if kept == name else kept for kept in self.names]
        for group in self.groups.values():
            group.forget(name)

    def views(self, names: tuple[str | None, ...], key: TableKey, source: TableSource, read_only: bool) -> Views:
        """The tables of group ``source`` in layout ``key`` for rows ``names`` (a batch's: rows are written
        when a new tuple of names comes)."""
        if self.owner is not names:
            self._write(names, read_only)
        group = self.groups.get(key)
        if group is None:
            group = self._add(key, source, names)
        group.used = self.count
        return group.views(len(names))

    def _write(self, names: tuple[str | None, ...], read_only: bool) -> None:
        """Make every group's slots ``0 .. n - 1`` hold the factors of rows ``names``."""
        self.count += 1
        self.owner = names
        if len(names) > self.slots:  # grow: every group's tables are made again when next asked for
            self.slots = -(-len(names) // SLOT_STEP) * SLOT_STEP
            self.names = [_UNWRITTEN] * self.slots
            self.groups.clear()
        # Adapters that may have been written since (not read-only: trained) are gathered and written again.
        changed = [r for r, name in enumerate(names) if name != self.names[r] or not read_only]
        if not read_only:
            for group in self.groups.values():
                group.forget()
        self.names[: len(names)] = names
        # Groups this batch has no use for go: those the last batch did not read (another layout took
        # their place), and those too small for an adapter it brings (a member's rank grew).
        brought = {names[r] for r in changed} - {None}
        for key in [key for key, group in self.groups.items()
                    if group.used < self.count - 1 or not all(group.fits(n) for n in brought)]:  # fmt: skip
            del self.groups[key]
        writes = SlotWrites()
        for r in changed:
            for group in self.groups.values():
                group.collect(r, names[r], writes)
        writes.run()

    def _add(self, key: TableKey, source: TableSource, names: tuple[str | None, ...]) -> GroupTables:
        """A group's new tables, written for every row of ``names``; the slots past them are written again
        in every group when next used (this group's hold nothing yet)."""
        group = GroupTables(self.slots, source, *key[1:])
        writes = SlotWrites()
        for r, name in enumerate(names):
            group.collect(r, name, writes)
        writes.run()
        self.names[len(names) :] = [_UNWRITTEN] * (self.slots - len(names))
        self.groups[key] = group
        return group
