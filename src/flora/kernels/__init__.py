"""Per-example batched operators: every row of a batch with its own adapter, and the autotuner
that picks the fastest exact strategy per shape, batch composition, device and dtype."""

from flora.kernels.autotune import Autotuner
from flora.kernels.flora import flora_dense, flora_elementwise
from flora.kernels.lowrank import lowrank_bmm, lowrank_loop, lowrank_segmented, lowrank_stacked

__all__ = [
    "Autotuner",
    "flora_dense",
    "flora_elementwise",
    "lowrank_bmm",
    "lowrank_loop",
    "lowrank_segmented",
    "lowrank_stacked",
]
