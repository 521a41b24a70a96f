"""Choosing each row's next token: greedy, or sampled with its own temperature, top-p and seed.

For logits ``z: [rows, vocab]`` and a row with temperature ``T > 0`` and nucleus mass ``p``:

    π = softmax(z / T),   sorted descending: π_(1) >= π_(2) >= ...
    keep the shortest prefix whose mass reaches p  (the first token always),
    next = the token at which the kept mass's running sum first exceeds u · Σ kept,

with ``u`` uniform in [0, 1) (inverse-CDF sampling, one draw per row and step). ``u`` is a hash of
the request's seed and the step (splitmix64), not a draw from a shared generator: a seeded request
gives the same tokens whatever other requests share its batch or arrive around it. ``T = 0``
is greedy (argmax). Every step is a handful of batched operations over the sampled rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def uniform(seed: int, step: int) -> float:
    """A number in [0, 1) determined by ``(seed, step)`` (splitmix64 of their combination)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def next_tokens(
    logits: Tensor, temperature: Tensor, top_p: Tensor, seeds: Sequence[int], steps: Sequence[int]
) -> Tensor:
    """``[rows]`` token ids for ``logits: [rows, vocab]``.

    Args:
        temperature, top_p: ``[rows]`` (temperature 0: greedy).
        seeds, steps: per row, the request's seed and how many tokens it has generated.
    """
    chosen = logits.argmax(dim=-1)
    sampled = (temperature > 0).nonzero().flatten()
    if sampled.numel() == 0:
        return chosen
    scaled = logits.index_select(0, sampled).float() / temperature.index_select(0, sampled).float().unsqueeze(1)
    probs, order = torch.softmax(scaled, dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    probs = probs * (before < top_p.index_select(0, sampled).float().unsqueeze(1))
    running = probs.cumsum(dim=-1)
    draws = torch.tensor([uniform(seeds[i], steps[i]) for i in sampled.tolist()], dtype=running.dtype)
    position = torch.searchsorted(running, (draws.to(running.device) * running[:, -1]).unsqueeze(1), right=True)
    position = position.clamp(max=logits.shape[-1] - 1)
    chosen[sampled] = order.gather(1, position).squeeze(1)
    return chosen
