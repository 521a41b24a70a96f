"""LoRA of sibling layers that read the same input, computed together.

Attention's q/k/v projections (and an MLP's gate/up) all read the same hidden states ``x``. For a
group of such layers ``m = 1..k`` and an adapter with factors ``A_m: [r_m, in]``, ``B_m: [out_m, r_m]``
and scaling ``s_m`` in each (``r_m = 0`` where it does not adapt layer ``m``), stack

    A = [A_1; ...; A_k]                     [R, in],  R = Σ r_m

so that ``x Aᵀ = [x A_1ᵀ | ... | x A_kᵀ]`` is one product for the group, and each member's update
reads its own ranks ``R_m`` of it:

    Δy_m = (x Aᵀ)[..., R_m] · s_m B_mᵀ      [batch, tokens, out_m]

one product for ``x Aᵀ`` and one per member instead of a pair per layer (`flora.kernels.lowrank`).
Each member keeps its own ``B``: a block-diagonal ``blockdiag(s_1 B_1ᵀ, ..., s_k B_kᵀ)`` would make
the second step one product, but multiplies what decoding reads from the per-row tables by ``k``.
Alone in its layer, a member adds its update to its base output inside the base matmul
(``addmm``, `LoraBank.fused_step`).

A layer whose siblings have no LoRA is a group of one, the same code with ``k = 1``. Which layers
read the same input is a property of the architecture (`SHARED_INPUT_LAYERS`, after vLLM's
``packed_modules_mapping``); a group checks at run time that its members really see the same
tensor and computes again otherwise, so a wrong guess costs time, never correctness.

Per batch and input shape the group has one `flora.methods.batch.GroupRun`: the strategy chosen,
its kernel, and the last input with its updates, which siblings reuse. ``bmm`` reads the model's
per-row tables (`flora.methods.slot_tables`), which pad each member to its largest rank in the
batch; the other strategies read each adapter's own factors (`Factors`, no padding: a batch of
mixed ranks pays for each row's own), of which a group keeps those of the `KEPT_FACTORS` adapters
used last. Under autograd everything is gathered again for each new input, inside the call of the
member that meets it first, so that activation checkpointing's recomputation repeats exactly the
operations of the forward.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from flora.kernels.lowrank import lowrank_bmm, lowrank_loop, lowrank_segmented, lowrank_stacked
from flora.methods.base import pad_rank
from flora.methods.batch import AdapterBatch, GroupRun, PerBatch, Plan
from flora.methods.slot_tables import MemberFactors

if TYPE_CHECKING:
    from flora.methods.lora import LoraBank

# Leaf names of sibling layers that read the same input, per architecture family.
SHARED_INPUT_LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),  # Llama, Mistral, Qwen2, Gemma, OPT, ...
    frozenset({"gate_proj", "up_proj"}),  # Llama-style gated MLPs
    frozenset({"w1", "w3"}),  # Mixtral experts
    frozenset({"query", "key", "value"}),  # BERT-style attention
)
KEPT_FACTORS = 64  # adapters whose `Factors` a group keeps (least recently used go first)

Kernel = Callable[[AdapterBatch, Tensor], list[Tensor]]  # (batch, x [batch, tokens, in]) -> [Δy_m]
BParts = list[tuple[int, int, Tensor]]  # per member: its ranks ``start:stop`` of ``x Aᵀ`` and ``s·Bᵀ [r_m, out_m]``


class Factors(NamedTuple):
    """One adapter's factors in a group's members, at its own ranks: ``a = [A_1; ...; A_k]`` (``[R, in]``)
    and ``b_parts``: per member ``(start, stop, s_m B_mᵀ)``, ``stop - start = r_m`` (0 where it does not
    adapt ``m``: that member's update for its rows is zero)."""

    a: Tensor
    b_parts: BParts


@dataclass(frozen=True)
class Members:
    """The members of a group that have rows in a batch (equal for batches whose adapters adapt the same
    members: they share tables), as `flora.methods.slot_tables.TableSource`."""

    banks: tuple[LoraBank, ...]

    @property
    def in_features(self) -> int:
        return self.banks[0].in_features

    @property
    def out_features(self) -> tuple[int, ...]:
        return tuple(bank.out_features for bank in self.banks)

    def member_factors(self, name: str) -> list[MemberFactors | None]:
        return [(bank.lora_A[name], bank.lora_B[name], bank.scaling[name]) if name in bank.lora_A else None
                for bank in self.banks]  # fmt: skip

    def plan(self, batch: AdapterBatch) -> Plan:
        """The rows of the adapters that adapt any member."""
        return batch.plan(self, lambda name: any(name in bank.ranks for bank in self.banks))

    def ranks(self, batch: AdapterBatch) -> tuple[int, ...]:
        """Each member's largest rank among the batch's adapters (0 where none adapts it)."""
        names = batch.rows.keys()
        return tuple(max((bank.ranks.get(n, 0) for n in names), default=0) for bank in self.banks)


class LoraGroup:
    """The LoRA banks of sibling layers that read the same input (`AdapterModel` links them)."""

    def __init__(self, banks: list[LoraBank]) -> None:
        self.banks = banks
        self._factors: OrderedDict[str, Factors] = OrderedDict()  # read-only adapters' (`factors`)

    def forget(self, name: str) -> None:
        """Drop adapter ``name``'s kept factors (it is replaced or removed)."""
        self._factors.pop(name, None)

    def computes_together(self, batch: AdapterBatch) -> bool:
        """Whether the members share one computation: not while one trains with dropout (whose mask
        is drawn per layer)."""
        return not any(bank.training and (plan := bank.plan(batch)) is not None
                       and any(bank.dropout[n] for n in plan.groups) for bank in self.banks)  # fmt: skip

    def member_delta(self, bank: LoraBank, batch: AdapterBatch, x: Tensor) -> Callable[[AdapterBatch, Tensor], Tensor]:
        """``(batch, x) -> [batch, tokens, bank.out_features]``: ``bank``'s update for the batch's rows
        (zero on rows without one of its adapters), for inputs shaped like the sample ``x``."""
        if torch.is_grad_enabled():
            return lambda batch, x: self._run(batch, x).delta(bank, batch, x)
        run = self._run(batch, x)
        return lambda batch, x: run.delta(bank, batch, x)

    # -- per batch -----------------------------------------------------------------------------

    def _run(self, batch: AdapterBatch, x: Tensor) -> GroupRun:
        key = (id(self), x.shape[:-1])  # prefill and decoding may choose different strategies
        run = batch.runs.get(key)
        if run is None or (torch.is_grad_enabled() and run.input is not x):
            run = batch.runs[key] = self._build(batch, x)
        return run

    def _build(self, batch: AdapterBatch, x: Tensor) -> GroupRun:
        members = Members(tuple(bank for bank in self.banks if bank.plan(batch) is not None))
        x3 = x.reshape(batch.batch_size, -1, x.shape[-1])
        lead, ranks = members.banks[0], members.ranks(batch)
        shape = (lead.in_features, tuple(zip(members.out_features, ranks, strict=True)))
        whole_batch = members.plan(batch).one_adapter_for_all(batch.batch_size)

        def build(strategy: str) -> Kernel:
            if strategy == "segmented" and whole_batch:  # plain matmuls: no sort, no scatter
                return self._segmented_kernel(members, whole_batch=True)
            return self._kernel(strategy, members)

        kernel = lead.choose_strategy(members.plan(batch), x3, build, shape, trial=lambda k: k(batch, x3)[0])
        return GroupRun(kernel, {id(bank): i for i, bank in enumerate(members.banks)})

    def _kernel(self, strategy: str, members: Members) -> Kernel:
        """``(batch, x [batch, tokens, in]) -> [Δy_m]`` for ``strategy`` (see `flora.kernels.lowrank`)."""
        if strategy == "bmm":
            return self._bmm_kernel(members)
        if strategy == "segmented":
            return self._segmented_kernel(members, whole_batch=False)
        if strategy == "stacked":
            stacks = PerBatch(lambda batch: self._stacks(members, batch))
            return lambda batch, x: lowrank_stacked(x, *stacks(batch))
        groups = PerBatch(lambda batch: [(members.plan(batch).rows[n], *self.factors(members, n))
                                         for n in members.plan(batch).groups])  # fmt: skip
        return lambda batch, x: lowrank_loop(x, groups(batch))

    def _bmm_kernel(self, members: Members) -> Kernel:
        """`lowrank_bmm` over the model's per-row tables (`flora.methods.slot_tables`) for the batch's rows;
        under autograd, the rows' factors stacked afresh."""
        runtime, like = members.banks[0].runtime, next(iter(members.banks[0].lora_A.values()))
        dtype, device, ids = runtime.adapter_dtype or like.dtype, like.device, tuple(map(id, members.banks))
        keys = PerBatch(lambda batch: (ids, members.ranks(batch), dtype, device))  # the tables' layout

        def kernel(batch: AdapterBatch, x: Tensor) -> list[Tensor]:
            if torch.is_grad_enabled():
                return lowrank_bmm(x, *self._stacked_rows(members, keys(batch)[1], batch))
            # Prompts have tables of their own, so that a server's prefills keep its running rows' tables;
            # a batch whose prompts wrote them (`generate`) reads them for its one-token steps too.
            one_token, prompts = runtime.tables
            tables = prompts if x.shape[1] != 1 or prompts.owner is batch.names else one_token
            a_rows, b_rows = tables.views(batch.names, keys(batch), members, runtime.read_only)
            if dtype is x.dtype:
                return lowrank_bmm(x, a_rows, b_rows)
            return [delta.to(x.dtype) for delta in lowrank_bmm(x.to(dtype), a_rows, b_rows)]

        return kernel

    def _segmented_kernel(self, members: Members, whole_batch: bool) -> Kernel:
        """`lowrank_segmented`: the rows grouped by adapter (no sort when they already are), one product pair
        per adapter; ``whole_batch``: one adapter serves every row (plain matmuls, found from row 0)."""

        def segments(batch: AdapterBatch) -> tuple[Tensor | None, list]:
            groups = {batch.names[0]: range(batch.batch_size)} if whole_batch else members.plan(batch).groups
            order, segments = [], []
            for name, rows in groups.items():
                segments.append((len(order), len(order) + len(rows), *self.factors(members, name)))
                order.extend(rows)
            in_order = order == list(range(batch.batch_size))
            return None if in_order else torch.tensor(order, device=batch.device), segments

        kept = PerBatch(segments)
        return lambda batch, x: lowrank_segmented(x, *kept(batch))

    def _stacks(self, members: Members, batch: AdapterBatch) -> tuple[Tensor, Tensor, BParts]:
        """For `lowrank_stacked`: ``a_stack [C, in]`` with, member by member, the batch's adapters' ``A_m``,
        ``row_mask [batch, 1, C]`` (1 on each row's own adapter's columns) and per member ``(start, stop,
        b_stack [stop - start, out_m])``."""
        plan = members.plan(batch)
        a_parts, b_stacks, blocks, start = [], [], [], 0
        for m in range(len(members.banks)):
            member_start, b_parts = start, []
            for name in plan.groups:
                a, parts = self.factors(members, name)
                first, stop, b = parts[m]
                a_parts.append(a[first:stop])
                b_parts.append(b)
                blocks.append((name, start, start + stop - first))
                start += stop - first
            b_stacks.append((member_start, start, torch.cat(b_parts)))
        a_stack = torch.cat(a_parts)
        row_mask = a_stack.new_zeros(batch.batch_size, 1, start)
        for name, first, stop in blocks:
            row_mask[plan.rows[name], :, first:stop] = 1
        return a_stack, row_mask, b_stacks

    def _stacked_rows(self, members: Members, ranks: tuple[int, ...], batch: AdapterBatch) -> tuple[Tensor, BParts]:
        """``a_rows [batch, R, in]`` and ``b_rows`` as `lowrank_bmm` reads them, stacked (under autograd)."""
        plan, like = members.plan(batch), next(iter(members.banks[0].lora_A.values()))
        none = Factors(
            like.new_zeros(0, members.in_features), [(0, 0, like.new_zeros(0, o)) for o in members.out_features]
        )
        rows = [self.factors(members, name) if name in plan.groups else none for name in batch.names]
        a_rows = torch.stack([torch.cat([pad_rank(a[first:stop], rank, 0) for (first, stop, _), rank in
                                         zip(parts, ranks, strict=True)]) for a, parts in rows])  # fmt: skip
        starts = [sum(ranks[:m]) for m in range(len(ranks))]
        return a_rows, [(start, start + rank, torch.stack([pad_rank(parts[m][2], rank, 0) for _, parts in rows]))
                        for m, (start, rank) in enumerate(zip(starts, ranks, strict=True))]  # fmt: skip

    def factors(self, members: Members, name: str) -> Factors:
        """Adapter ``name``'s `Factors` in ``members``. With read-only adapters (a server's:
        `AdapterModel.adapters_read_only`) and without autograd they are kept for the `KEPT_FACTORS`
        adapters used last, until replaced or removed (`forget`), so that a new batch only indexes
        them; otherwise they are gathered per batch, which reads the weights as they are then."""
        held = members.member_factors(name)
        keep = members.banks[0].runtime.read_only and not torch.is_grad_enabled()
        kept = self._factors.get(name) if keep else None
        if kept is not None and len(kept.b_parts) == len(held):
            self._factors.move_to_end(name)
            return kept
        like = next(f[0] for f in held if f is not None)
        a_parts, b_parts, start = [], [], 0
        for bank, f in zip(members.banks, held, strict=True):
            a, b, scaling = f if f is not None else (like[:0], like.new_zeros(bank.out_features, 0), 1.0)
            a_parts.append(a)
            b_parts.append((start, start + a.shape[0], (b * scaling).T.contiguous()))
            start += a.shape[0]
        factors = Factors(a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts), b_parts)
        if keep:
            self._factors[name] = factors
            if len(self._factors) > KEPT_FACTORS:
                self._factors.popitem(last=False)
        return factors


def link_groups(banks: Iterable[tuple[str, LoraBank]]) -> None:
    """Give the LoRA banks of sibling layers that read the same input one shared `LoraGroup`
    (``banks``: ``(module name, bank)`` in module order); every other bank is a group of one. Called
    whenever adapters are added or removed: a group whose members are unchanged is kept."""
    siblings: dict[tuple[str, frozenset[str] | None], list[LoraBank]] = {}
    for module, bank in banks:
        parent, _, leaf = module.rpartition(".")
        family = next((f for f in SHARED_INPUT_LAYERS if leaf in f), None)
        siblings.setdefault((parent, family) if family else (module, None), []).append(bank)
    for members in siblings.values():
        group = members[0].group  # kept while its members stay the same: it keeps their factors
        if len(members) == 1:
            group = members[0].own_group
        elif group is members[0].own_group or group.banks != members:
            group = LoraGroup(members)
        for bank in members:
            bank.group = group
