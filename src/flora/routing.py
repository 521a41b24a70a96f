"""Per-row routing: which adapter each row of the current batch uses.

`AdapterModel` builds one `Routing` per forward (or per `generate` call) from ``adapter_names`` and
publishes it on the `RoutingState` that every adapted layer shares. Layers read it; nothing on
the hot path loops over rows in Python more than once per routing, because each bank memoises
what it derives from the routing (row groups, gathered weights, the chosen strategy) in
``Routing.memo`` for as long as the routing lives: the whole of a `generate` call.

A server's batch changes routing whenever a row joins or leaves, and each prefill has one of its
own, while what each layer computes usually stays the same: the same banks, ranks and strategy,
only other adapters in some rows. Each adapted layer's compiled function (``Routing.layers``) then
carries over from the last routing of the same `shape` (`AdapterModel.routing` with
``carry=True``) when every layer's function reads the rows' adapters when it runs rather than when
it was compiled (``reusable``); it serves inputs whose token count falls in the same power-of-two
bucket (the autotuner's, `flora.kernels.autotune.token_bucket`), since that is all it depends on.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from flora.kernels.autotune import token_bucket


@dataclass
class Routing:
    """The adapter of every row of a batch.

    Attributes:
        names: one entry per row, an adapter name or ``None`` for the base model.
        device: where row-index tensors live.
        memo: per-routing cache owned by the banks (keys are chosen by each bank).
        layers: each adapted layer's compiled function ``x -> out`` without autograd, by
            ``(id(layer), x.shape[1:])`` (`flora.layer.AdaptedLayer`).
        carried: compiled functions taken over from an earlier routing of the same shape, by
            `carried_key`.
        shape: what decides every layer's compiled function apart from the rows' adapters (set by
            `AdapterModel.routing`; ``None``: nothing carries over).
        reusable: whether every function in ``layers`` reads the rows' adapters when it runs, so
            that a routing of the same ``shape`` may run them (cleared by a layer or kernel that
            captures row indices or the names themselves).
    """

    names: tuple[str | None, ...]
    device: torch.device
    memo: dict[Any, Any] = field(default_factory=dict)
    layers: dict[Any, Any] = field(default_factory=dict)
    carried: dict[Any, Any] = field(default_factory=dict)
    shape: Any = None
    reusable: bool = True

    @property
    def batch_size(self) -> int:
        return len(self.names)

    def expanded(self, batch_size: int) -> Routing:
        """The routing for a batch whose rows repeat each row ``k`` times in place (beam search,
        ``num_return_sequences``): ``[a, b] -> [a, a, b, b]`` for ``k = 2``."""
        if batch_size == self.batch_size:
            return self
        key = ("expanded", batch_size)
        if key not in self.memo:
            if batch_size % self.batch_size:
                raise ValueError(
                    f"a layer saw a batch of {batch_size} rows, but adapter_names has "
                    f"{self.batch_size} entries (expected a multiple)"
                )
            k = batch_size // self.batch_size
            self.memo[key] = Routing(tuple(n for n in self.names for _ in range(k)), self.device)
        return self.memo[key]

    def rows_by_adapter(self, adapters: Iterable[str]) -> dict[str, list[int]]:
        """Row indices of each of ``adapters`` that occurs in this batch, in first-seen order (the
        lists are shared: read them, don't change them)."""
        wanted = set(adapters)
        return {name: rows for name, rows in self._rows.items() if name in wanted}

    @functools.cached_property
    def _rows(self) -> dict[str, list[int]]:
        """Row indices of every adapter in the batch, in first-seen order: one pass over the rows per
        routing, however many banks ask."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            if name is not None:
                rows.setdefault(name, []).append(row)
        return rows

    def carry_over(self, previous: Routing | None) -> None:
        """Take ``previous``'s compiled layers (its own and those it took) when they fit this routing
        (see the module docstring)."""
        if previous is not None and previous.reusable and self.shape is not None and previous.shape == self.shape:
            self.carried = previous.carried | {carried_key(key): run for key, run in previous.layers.items()}


def carried_key(key: tuple[int, tuple[int, ...]]) -> tuple:
    """``(id(layer), x.shape[1:])`` -> the same with the token count bucketed: ``[tokens, in]`` inputs
    of 5 to 8 tokens share one key."""
    layer, shape = key
    return (layer, token_bucket(shape[0]), *shape[1:]) if len(shape) > 1 else key


class RoutingState:
    """The routing in force, shared by an `AdapterModel` and all of its adapted layers.

    ``current`` is ``None`` outside a forward pass: layers then act as the bare base model.
    """

    def __init__(self) -> None:
        self.current: Routing | None = None
        self.strategy: str = "auto"
        self.tuner: Any = None  # a flora.kernels.autotune.Autotuner, set by AdapterModel
        self.adapters_read_only = False  # see AdapterModel.adapters_read_only
        self.slot_tables: Any = None  # LoRA's per-row tables kept between routings (flora.methods.slot_tables)
