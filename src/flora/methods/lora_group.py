"""LoRA of sibling layers that read the same input, computed together.

Attention's q/k/v projections (and an MLP's gate/up) all read the same hidden states ``x``. For a
group of such layers ``m = 1..k`` and an adapter with factors ``A_m: [r_m, in]``, ``B_m: [out_m, r_m]``
and scaling ``s_m`` in each (``A_m = 0`` where it does not adapt layer ``m``), stack

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

Per routing the group keeps one `GroupRun`: the strategy chosen and the per-row tables gathered,
and the last input with its update, which siblings reuse. Under autograd the tables are gathered
again for each new input, inside the call of the member that meets it first, so that activation
checkpointing's recomputation repeats exactly the operations of the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flora.kernels.lowrank import lowrank_bmm, lowrank_loop, lowrank_segmented, lowrank_stacked
from flora.methods.base import Plan, pad_rank
from flora.methods.slot_tables import GroupLayout, b_tables, slot_tables
from flora.routing import Routing

if TYPE_CHECKING:
    from flora.methods.lora import LoraBank

# Leaf names of sibling layers that read the same input, per architecture family.
SHARED_INPUT_LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),  # Llama, Mistral, Qwen2, Gemma, OPT, ...
    frozenset({"gate_proj", "up_proj"}),  # Llama-style gated MLPs
    frozenset({"w1", "w3"}),  # Mixtral experts
    frozenset({"query", "key", "value"}),  # BERT-style attention
)


_NO_ROWS = Plan({}, torch.device("cpu"))


class GroupRun:
    """One routing's computation for a group: ``x -> [Δy_m for each member m]`` (each
    ``[batch, tokens, out_m]``), and which members still have to read the last one.

    ``position`` maps each member with rows in this batch to its index in that list. The last input
    and its updates are kept until every member has read them."""

    def __init__(self, kernel: Callable[[Tensor], list[Tensor]], position: dict[int, int]) -> None:
        self.kernel = kernel
        self.position = position
        self.input: Tensor | None = None
        self._deltas: list[Tensor] = []
        self._pending = 0

    def delta(self, bank: LoraBank, x: Tensor) -> Tensor:
        """``bank``'s update for ``x: [..., in]``, computed once for the members that share ``x`` and
        handed to each member once: the member owns it (and may add into it in place)."""
        slot = self.position[id(bank)]
        if self.input is not x or self._deltas[slot] is None:
            self.input, self._deltas = x, self.kernel(x.reshape(x.shape[0], -1, x.shape[-1]))  # rows lead
            self._pending = len(self.position)
        delta, self._deltas[slot] = self._deltas[slot], None
        self._pending -= 1
        if self._pending <= 0:  # every member has its update: hold nothing past this layer group
            self.input, self._deltas = None, []
        return delta


class LoraGroup:
    """The LoRA banks of sibling layers that read the same input (`AdapterModel` links them)."""

    def __init__(self, banks: list[LoraBank]) -> None:
        self.banks = banks
        self._factors: dict[str, tuple] = {}  # adapter -> (layout, parameters, their versions, factors): `_row_factors`

    def forget(self, name: str) -> None:
        """Drop adapter ``name``'s kept row factors (see `_row_factors`) and its rows of the kept tables."""
        self._factors.pop(name, None)
        for tables in slot_tables(self.banks[0].state):
            tables.forget(name)

    def computes_together(self, routing: Routing) -> bool:
        """Whether the members share one computation: not while one trains with dropout (whose mask
        is drawn per layer)."""
        return not any(bank.training and any(bank.dropout[n] for n in (bank.plan(routing) or _NO_ROWS).groups)
                       for bank in self.banks)  # fmt: skip

    def member_delta(self, bank: LoraBank, routing: Routing, x: Tensor) -> Callable[[Tensor], Tensor]:
        """``x -> [batch, tokens, bank.out_features]``: ``bank``'s update for ``routing``'s rows
        (zero on rows without one of its adapters), for inputs shaped like the sample ``x``."""
        if torch.is_grad_enabled():
            return lambda x: self._run(routing, x).delta(bank, x)
        run = self._run(routing, x)
        return lambda x: run.delta(bank, x)

    # -- per routing ---------------------------------------------------------------------------

    def _run(self, routing: Routing, x: Tensor) -> GroupRun:
        key = (id(self), "run", x.shape[:-1])  # prefill and decoding may choose different strategies
        run = routing.memo.get(key)
        if run is None or (torch.is_grad_enabled() and run.input is not x):
            run = routing.memo[key] = self._build(routing, x)
        return run

    def _build(self, routing: Routing, x: Tensor) -> GroupRun:
        members = [(bank, plan) for bank in self.banks if (plan := bank.plan(routing)) is not None]
        names = list(dict.fromkeys(n for _, plan in members for n in plan.groups))
        plan = Plan(routing.rows_by_adapter(names), routing.device)
        x3 = x.reshape(routing.batch_size, -1, x.shape[-1])
        lead = members[0][0]
        ranks = tuple(max(map(bank.ranks.__getitem__, member_plan.groups)) for bank, member_plan in members)
        layout = (tuple(id(bank) for bank, _ in members), ranks)  # each member's largest rank in the batch
        shape = (lead.in_features, tuple(zip((bank.out_features for bank, _ in members), ranks, strict=True)))

        def kernel(strategy: str) -> Callable[[Tensor], list[Tensor]]:
            return lead.prepared(
                routing, (id(self), strategy), lambda: self._kernel(strategy, members, layout, plan, routing)
            )

        strategy = lead.choose_strategy(plan, x3, lambda name: lambda: kernel(name)(x3)[0], shape)
        if strategy != "bmm" and not (strategy == "segmented" and plan.one_adapter_for_all(routing.batch_size)):
            routing.reusable = False  # the others capture row indices
        position = {id(bank): i for i, (bank, _) in enumerate(members)}
        return GroupRun(kernel(strategy), position)

    def _kernel(
        self, strategy: str, members: list[tuple[LoraBank, Plan]], layout: tuple, plan: Plan, routing: Routing
    ) -> Callable[[Tensor], list[Tensor]]:
        """``x: [batch, tokens, in] -> [Δy_m]`` for ``strategy`` (see `flora.kernels.lowrank`);
        ``layout``: the members' ids and their largest ranks in the batch."""
        ranks = layout[1]
        if strategy == "stacked":
            a_stack, row_mask, b_stacks = self._stacks(members, ranks, plan, routing)
            return lambda x: lowrank_stacked(x, a_stack, row_mask, b_stacks)
        if strategy == "bmm":
            tables = self._row_tables(members, layout, plan, routing)
            return lambda x: lowrank_bmm(x, *tables(x))
        if strategy == "segmented" and plan.one_adapter_for_all(routing.batch_size):
            return self._whole_batch_kernel(members, layout)
        factors = {name: self._row_factors(members, name, layout) for name in plan.groups}
        columns = {name: (a, b_tables(b_parts, ranks)) for name, (a, b_parts) in factors.items()}
        if strategy == "loop":
            groups = [(plan.rows[name], *columns[name]) for name in plan.groups]
            return lambda x: lowrank_loop(x, groups)
        order, segments, first = [], [], 0
        for name, rows in plan.groups.items():
            order.extend(rows)
            segments.append((first, first + len(rows), *columns[name]))
            first += len(rows)
        order_t = None if order == list(range(routing.batch_size)) else torch.tensor(order, device=routing.device)
        return lambda x: lowrank_segmented(x, order_t, segments)

    def _whole_batch_kernel(
        self, members: list[tuple[LoraBank, Plan]], layout: tuple
    ) -> Callable[[Tensor], list[Tensor]]:
        """`lowrank_segmented` when one adapter serves every row (plain matmuls), that adapter read
        from the routing in force when the kernel runs: it may serve later routings of the same
        shape (`flora.routing`)."""
        state, kept = self.banks[0].state, [None, []]  # the routing last run, its one segment

        def run(x: Tensor) -> list[Tensor]:
            routing = state.current
            if kept[0] is not routing:
                a, b_parts = self._row_factors(members, routing.names[0], layout)
                kept[:] = [routing, [(0, x.shape[0], a, b_tables(b_parts, layout[1]))]]
            return lowrank_segmented(x, None, kept[1])

        return run

    @staticmethod
    def _stacks(
        members: list[tuple[LoraBank, Plan]], ranks: tuple[int, ...], plan: Plan, routing: Routing
    ) -> tuple[Tensor, Tensor, list[tuple[int, int, Tensor]]]:
        """For `lowrank_stacked`: ``a_stack [C, in]`` with, member by member, the batch's adapters of
        that member (each padded to the member's largest rank in the batch), ``row_mask
        [batch, 1, C]`` and per member ``(start, stop, b_stack [stop - start, out_m])``."""
        a_parts, b_stacks, blocks, start = [], [], [], 0
        for (bank, _), rank in zip(members, ranks, strict=True):
            held = [n for n in plan.groups if n in bank.lora_A]
            a_parts.extend(pad_rank(bank.lora_A[n], rank, 0) for n in held)
            b_stack = torch.cat([pad_rank(bank.scaled_b(n), rank, 1).T for n in held])
            b_stacks.append((start, start + rank * len(held), b_stack))
            for n in held:
                blocks.append((n, start, start + rank))
                start += rank
        like = a_parts[0]
        row_mask = like.new_zeros(routing.batch_size, 1, start)
        for name, first, stop in blocks:
            row_mask[plan.rows[name], :, first:stop] = 1
        return torch.cat(a_parts), row_mask, b_stacks

    def _row_tables(
        self, members: list[tuple[LoraBank, Plan]], layout: tuple, plan: Plan, routing: Routing
    ) -> Callable[[Tensor], tuple[Tensor, list[tuple[int, int, Tensor]]]]:
        """For `lowrank_bmm`, a function of the input returning ``a_rows [batch, R, in]``, member ``m`` owning
        rows ``R_m`` (its largest rank in the batch), and per member ``(start, stop, b_rows [batch,
        R_m, out_m])``: each member's ``B`` is read on its own, not as a block-diagonal table that
        would triple what decoding reads from memory. Rows without one of a member's adapters read
        zeros. Each row's factors (`_row_factors`) go straight into the batch's tables: stacked under
        autograd; without it written into the model's tables kept between routings
        (`flora.methods.slot_tables`), where a row is rewritten only when its adapter differs from
        the last routing's in that row (or, unless the adapters are read-only, when its factors
        were worked out again). Those tables are for the routing in force when the kernel runs,
        read then: the kernel may serve later routings of the same shape (`flora.routing`)."""
        ranks = layout[1]
        if not torch.is_grad_enabled():
            state, held = self.banks[0].state, [bank.lora_A for bank, _ in members]
            like = self._row_factors(members, next(iter(plan.groups)), layout)[0]
            key = (*layout, like.dtype, like.device)

            def holds(name: str) -> bool:  # rows of other adapters read zeros
                return any(name in h for h in held)

            def fits(name: str) -> bool:
                return all(bank.ranks.get(name, 0) <= rank for (bank, _), rank in zip(members, ranks, strict=True))

            def factors(name: str) -> tuple[Tensor, list[Tensor]]:
                return self._row_factors(members, name, layout)

            group = GroupLayout(holds, fits, factors, ranks)
            steps, prompts = slot_tables(state)
            return lambda x: (steps if x.shape[1] == 1 else prompts).tables(
                state.current.expanded(x.shape[0]), key, group, state.adapters_read_only
            )
        names = [name if name in plan.groups else None for name in routing.names]  # None: zeros
        row_factors = [None if name is None else self._row_factors(members, name, layout) for name in names]
        if None in names:
            like = next(f for f in row_factors if f is not None)
            zeros = (like[0].new_zeros(like[0].shape), [b.new_zeros(b.shape) for b in like[1]])
            row_factors = [zeros if f is None else f for f in row_factors]
        b_rows = [torch.stack([b[m] for _, b in row_factors]) for m in range(len(ranks))]
        tables = (torch.stack([a for a, _ in row_factors]), b_tables(b_rows, ranks))
        return lambda x: tables

    def _row_factors(
        self, members: list[tuple[LoraBank, Plan]], name: str, layout: tuple[tuple[int, ...], tuple[int, ...]]
    ) -> tuple[Tensor, list[Tensor]]:
        """Adapter ``name``'s row of the per-row tables: ``A [Σ ranks, in]``, each member's ``A``
        padded to its rank in the batch (zeros for a member without ``name``), and per member
        ``s·Bᵀ [rank_m, out_m]`` (``layout``: the members' ids and their ranks in the batch). Without
        autograd they are kept until the adapter's parameters change
        (in place or moved: `_versions`; replaced or removed: `forget`) or the batch's members or
        ranks do, so that a new routing (rows joining or leaving a server's batch) only stacks them:
        the transposes, the scaling and the concatenation are paid once per adapter. A model whose
        adapters are read-only (`AdapterModel.adapters_read_only`) skips the version check."""
        cached = self._factors.get(name)
        if cached is not None and not torch.is_grad_enabled():
            kept_layout, tensors, versions, factors = cached
            read_only = self.banks[0].state.adapters_read_only
            if kept_layout == layout and (read_only or versions == _versions(tensors)):
                return factors
        held = [(bank, bank.lora_A[name], bank.lora_B[name]) if name in bank.lora_A else (bank, None, None)
                for bank, _ in members]  # fmt: skip
        factors = _factors(held, name, layout[1])
        if not torch.is_grad_enabled():
            tensors = tuple(t for _, a, b in held if a is not None for t in (a, b))
            self._factors[name] = (layout, tensors, _versions(tensors), factors)
        return factors


def _versions(tensors: tuple[Tensor, ...]) -> tuple[tuple[int, int], ...]:
    """What changes when a tensor is written: in place (its version counter) or given new storage
    (``module.to(dtype)`` swaps a parameter's data without counting a version)."""
    return tuple((t._version, t.data_ptr()) for t in tensors)


def _factors(held: list[tuple[LoraBank, Tensor | None, Tensor | None]], name: str, ranks: tuple[int, ...]):
    """See `LoraGroup._row_factors`."""
    a_parts, b_parts = [], []
    for (bank, a, b), rank in zip(held, ranks, strict=True):
        if a is None:
            a_parts.append(_zeros(bank, rank, bank.in_features))
            b_parts.append(_zeros(bank, rank, bank.out_features))
        else:
            a_parts.append(pad_rank(a, rank, 0))
            b_parts.append((pad_rank(b, rank, 1) * bank.scaling[name]).T.contiguous())
    return (a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts)), b_parts


def _zeros(bank: LoraBank, rows: int, columns: int) -> Tensor:
    like = next(iter(bank.lora_A.values()))
    return like.new_zeros(rows, columns)


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
        group = members[0].group  # kept while its members stay the same: it keeps their tables
        if len(members) == 1:
            group = members[0].own_group
        elif group is members[0].own_group or group.banks != members:
            group = LoraGroup(members)
        for bank in members:
            bank.group = group
