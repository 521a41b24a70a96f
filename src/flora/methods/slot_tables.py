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
tables writes the changed slots of every group's tables: per slot one ``torch._foreach_copy_`` of
the adapter's factors in every group, one ``_foreach_mul`` for the scalings and one
``_foreach_zero_`` for the padding. A group seen for the first time (or with other ranks or
dtype) gets tables of its own, written for every row of the batch that asks, and is dropped when
a batch passes without asking for it. The storage grows in steps of 8 slots and is kept at the
largest batch seen. Tables may be kept in another dtype than the adapters (bfloat16: half the
bytes a decoding step reads).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

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

    def fits(self, name: str) -> bool:
        """Whether adapter ``name``'s factors fit these tables (no member's rank above theirs)."""
        return all(f is None or f[0].shape[0] <= rank
                   for f, rank in zip(self.source.member_factors(name), self.ranks, strict=True))  # fmt: skip

    def collect(self, r: int, name: str | None, writes: SlotWrites) -> None:
        """Add what makes slot ``r`` hold adapter ``name`` (zeros for ``None``) to ``writes``."""
        factors = [None] * len(self.ranks) if name is None else self.source.member_factors(name)
        for start, rank, b, member in zip(self.starts, self.ranks, self.bs, factors, strict=True):
            a_slot, b_slot, r_m = self.a[r, start : start + rank], b[r], 0
            if member is not None:
                a, b_m, scaling = member
                r_m = a.shape[0]
                writes.scaled.append((a_slot[:r_m], a, scaling))
                writes.copied.append((b_slot[:r_m], b_m.T))
            if r_m < rank:
                writes.zeroed += [a_slot[r_m:], b_slot[r_m:]]

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
        self.scaled: list[tuple[Tensor, Tensor, float]] = []  # (slot view, A, s): the view takes s·A
        self.copied: list[tuple[Tensor, Tensor]] = []  # (slot view, Bᵀ)
        self.zeroed: list[Tensor] = []

    def run(self) -> None:
        if self.scaled:
            sources = torch._foreach_mul([a for _, a, _ in self.scaled], [s for *_, s in self.scaled])
            views = [view for view, _, _ in self.scaled] + [view for view, _ in self.copied]
            torch._foreach_copy_(views, [*sources, *(b for _, b in self.copied)])
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
                    if group.used < self.count - 1 or not all(map(group.fits, brought))]:  # fmt: skip
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
