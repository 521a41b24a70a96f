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
writes only the slots whose adapter changed.

Which slots changed is the same for every group, so one `SlotTables` serves them all (a model's
`flora.methods.batch.AdapterRuntime` has one for one-token rows and one for prompts, so that a
server's prefills do not overwrite its running rows). The first group to ask for a new batch's
tables writes the changed slots of every group's tables: one ``torch._foreach_copy_`` of the
adapters' factors into every group's slots, one ``_foreach_mul`` for the scalings and one
``_foreach_zero_`` for the padding. The Python side of a write is list concatenation: each slot's
views are made once (per adapter ranks), and read-only adapters' factors are gathered once. A
group seen for the first time (or with other ranks or dtype) gets tables of its own, written for
every row of the batch that asks, and is dropped when a batch passes without asking for it. The
storage grows in steps of 8 slots and is kept at the largest batch seen. Tables may be kept in
another dtype than the adapters (bfloat16: half the bytes a decoding step reads).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

SLOT_STEP = 8
KEPT_SOURCES = 256  # adapters whose gathered factors a group's tables keep (read-only adapters)

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


class _Sources(NamedTuple):
    """Adapter ``name``'s factors as a slot takes them, for the members it adapts: their ranks
    ``r_m`` (0 where it does not adapt a member), ``A_m`` with ``s_m``, and ``B_mᵀ``."""

    ranks: tuple[int, ...]
    a: list[Tensor]
    scalings: list[float]
    b_t: list[Tensor]


class _Destinations(NamedTuple):
    """Slot ``r``'s views for an adapter of member ranks ``r_m``: where ``s_m A_m`` and ``B_mᵀ`` go,
    and the padding past ``r_m`` (zeros)."""

    a: list[Tensor]
    b: list[Tensor]
    zeroed: list[Tensor]


class GroupTables:
    """One LoRA group's tables for one layout (its members' ranks), ``slots`` rows each. The views a
    slot is written through are made once per slot and adapter ranks; with read-only adapters, each
    adapter's factors are gathered once (for the `KEPT_SOURCES` adapters written last)."""

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
        self._destinations: dict[tuple[int, tuple[int, ...]], _Destinations] = {}
        self._sources: OrderedDict[str, _Sources] = OrderedDict()

    def fits(self, name: str, keep: bool = False) -> bool:
        """Whether adapter ``name``'s factors fit these tables (no member's rank above theirs)."""
        ranks = self._sources_of(name, keep).ranks
        return all(r_m <= rank for r_m, rank in zip(ranks, self.ranks, strict=True))

    def forget(self, name: str) -> None:
        self._sources.pop(name, None)

    def collect(self, r: int, name: str | None, writes: SlotWrites, keep: bool = False) -> None:
        """Add what makes slot ``r`` hold adapter ``name`` (zeros for ``None``) to ``writes``; ``keep``:
        the adapters are read-only, so their gathered factors may be kept."""
        sources = self._NONE if name is None else self._sources_of(name, keep)
        destinations = self._destinations.get((r, sources.ranks))
        if destinations is None:
            destinations = self._destinations[r, sources.ranks] = self._slot_views(r, sources.ranks)
        writes.add(destinations, sources)

    _NONE = _Sources((), [], [], [])

    def _sources_of(self, name: str, keep: bool) -> _Sources:
        """Adapter ``name``'s `_Sources`, kept for the next time if ``keep``."""
        sources = self._sources.get(name) if keep else None
        if sources is not None:
            self._sources.move_to_end(name)
            return sources
        sources = self._gather(name)
        if keep:
            self._sources[name] = sources
            if len(self._sources) > KEPT_SOURCES:
                self._sources.popitem(last=False)
        return sources

    def _gather(self, name: str) -> _Sources:
        ranks, a, scalings, b_t = [], [], [], []
        for member in self.source.member_factors(name):
            ranks.append(0 if member is None else member[0].shape[0])
            if member is not None:
                a.append(member[0].detach())  # kept views: no autograd history to hold (or to deep-copy)
                b_t.append(member[1].detach().T)
                scalings.append(member[2])
        return _Sources(tuple(ranks), a, scalings, b_t)

    def _slot_views(self, r: int, ranks: tuple[int, ...]) -> _Destinations:
        views = _Destinations([], [], [])
        for start, rank, b, r_m in zip(self.starts, self.ranks, self.bs, ranks or (0,) * len(self.ranks),
                                       strict=True):  # fmt: skip
            a_slot, b_slot = self.a[r, start : start + rank], b[r]
            if r_m:
                views.a.append(a_slot[:r_m])
                views.b.append(b_slot[:r_m])
            if r_m < rank:
                views.zeroed.extend((a_slot[r_m:], b_slot[r_m:]))
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
        self.scaled: list[Tensor] = []  # slot views that take s·A
        self.a: list[Tensor] = []
        self.scalings: list[float] = []
        self.copied: list[Tensor] = []  # slot views that take Bᵀ
        self.b_t: list[Tensor] = []
        self.zeroed: list[Tensor] = []

    def add(self, destinations: _Destinations, sources: _Sources) -> None:
        self.scaled += destinations.a
        self.a += sources.a
        self.scalings += sources.scalings
        self.copied += destinations.b
        self.b_t += sources.b_t
        self.zeroed += destinations.zeroed

    def run(self) -> None:
        if self.scaled and self.scaled[0].dtype == self.a[0].dtype:  # s·A computed in place, in the tables
            torch._foreach_copy_(self.scaled + self.copied, self.a + self.b_t)
            torch._foreach_mul_(self.scaled, self.scalings)
        elif self.scaled:  # s·A rounded once to the tables' dtype
            scaled = torch._foreach_mul(self.a, self.scalings)
            torch._foreach_copy_(self.scaled + self.copied, [*scaled, *self.b_t])
        if self.zeroed:
            torch._foreach_zero_(self.zeroed)


class SlotTables:
    """Every LoRA group's per-row tables for one kind of input (see the module docstring).

    ``names[r]``: the adapter whose factors slot ``r`` of every group's tables holds (``None``:
    zeros), and ``versions[r]`` those factors' versions when written, compared with the adapter's
    current ones when the adapters may change in place (not read-only). ``count`` counts the
    batches that wrote."""

    def __init__(self) -> None:
        self.groups: dict[TableKey, GroupTables] = {}
        self.slots = 0
        self.names: list[object] = []
        self.versions: list[tuple | None] = []
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
            group = self._add(key, source, names, read_only)
        group.used = self.count
        return group.views(len(names))

    def _write(self, names: tuple[str | None, ...], read_only: bool) -> None:
        """Make every group's slots ``0 .. n - 1`` hold the factors of rows ``names``."""
        self.count += 1
        self.owner = names
        if len(names) > self.slots:  # grow: every group's tables are made again when next asked for
            self.slots = -(-len(names) // SLOT_STEP) * SLOT_STEP
            self.names, self.versions = [_UNWRITTEN] * self.slots, [None] * self.slots
            self.groups.clear()
        changed = []
        for r, name in enumerate(names):
            versions = None if read_only or name is None else self._versions(name)
            if name != self.names[r] or versions != self.versions[r]:
                changed.append(r)
                self.names[r], self.versions[r] = name, versions
        # Groups this batch has no use for go: those the last batch did not read (another layout took
        # their place), and those too small for an adapter it brings (a member's rank grew).
        brought = {names[r] for r in changed} - {None}
        for key in [key for key, group in self.groups.items()
                    if group.used < self.count - 1 or not all(group.fits(n, read_only) for n in brought)]:  # fmt: skip
            del self.groups[key]
        writes = SlotWrites()
        for r in changed:
            for group in self.groups.values():
                group.collect(r, names[r], writes, read_only)
        writes.run()

    def _add(self, key: TableKey, source: TableSource, names: tuple[str | None, ...], read_only: bool) -> GroupTables:
        """A group's new tables, written for every row of ``names``; the slots past them are written again
        in every group when next used (this group's hold nothing yet)."""
        group = GroupTables(self.slots, source, *key[1:])
        writes = SlotWrites()
        for r, name in enumerate(names):
            group.collect(r, name, writes, read_only)
        writes.run()
        self.names[len(names) :] = [_UNWRITTEN] * (self.slots - len(names))
        self.groups[key] = group
        return group

    def _versions(self, name: str) -> tuple:
        """`written_versions` of adapter ``name``'s factors."""
        return written_versions(t for group in self.groups.values()
                                for f in group.source.member_factors(name) if f is not None for t in f[:2])  # fmt: skip


class _OptimizerSteps:
    """The optimizer steps taken in this process (a hook on every ``torch.optim.Optimizer.step``)."""

    count = 0

    @classmethod
    def after_step(cls, optimizer, args, kwargs) -> None:
        cls.count += 1


register_optimizer_step_post_hook(_OptimizerSteps.after_step)


def written_versions(tensors: Iterable[Tensor]) -> tuple:
    """What changes when one of ``tensors`` is written: in place (its version counter), given new
    storage (``module.to(dtype)`` swaps a parameter's data without counting a version), or by an
    optimizer step (fused optimizers, transformers' default ``adamw_torch_fused`` among them, write
    parameters without counting versions)."""
    return (_OptimizerSteps.count, *((t._version, t.data_ptr()) for t in tensors))
