"""Choosing each row's next token: greedy, or sampled with its own temperature, top-k, min-p,
top-p and seed.

For logits ``z: [rows, vocab]`` (already changed by the row's penalties and biases,
`flora.serve.logits`) and a row with temperature ``T > 0``, ``top_k`` k, ``min_p`` m and nucleus mass ``p``:

    π = softmax(z / T)
    π_v = 0  unless v is among the k likeliest (ties kept; k = 0: all) and π_v >= m · max π,
    π = π / Σ π,   sorted descending: π_(1) >= π_(2) >= ...
    keep the shortest prefix whose mass reaches p  (the first token always),
    next = the token at which the kept mass's running sum first exceeds u · Σ kept,

with ``u`` uniform in [0, 1) (inverse-CDF sampling, one draw per row and step); top-k and min-p
come before top-p, as in vLLM (transformers' `TopKLogitsWarper` and `MinPLogitsWarper` keep the
same tokens). With ``p = 1``
(the OpenAI default) every token is kept and no order is needed: the running sum is taken in
vocabulary order, the same distribution without sorting the vocabulary. Rows with ``p < 1`` are
ranked apart from those, and only as far as their likeliest tokens hold the nucleus
(`_nucleus_tokens`): a row's token is the same whatever shares its batch. For 32 rows of
SmolLM2's 49152 tokens on 2 CPU cores (`benchmarks/sampling.py`), next to a decoding step's
~120 ms: 2.7 ms at ``p = 1``, 12-17 ms at 0.9-0.95, against 50 ms with the whole vocabulary
sorted. ``u`` is a hash of the request's seed and the step (splitmix64), not a draw from a shared
generator: a seeded request gives the same tokens whatever other requests share its batch or
arrive around it. ``T = 0`` is greedy (argmax). Every step is a handful of batched operations
over the sampled rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
CANDIDATES = (256, 4096)  # how many tokens are ranked for a nucleus (`top_p` < 1), widening in turn


def uniform(seed: int, step: int) -> float:
    """A number in [0, 1) determined by ``(seed, step)`` (splitmix64 of their combination)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def next_tokens(
    logits: Tensor, temperature: Tensor, top_p: Tensor, seeds: Sequence[int], steps: Sequence[int],
    top_k: Tensor | None = None, min_p: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``[rows]`` token ids for ``logits: [rows, vocab]``.

    Args:
        temperature, top_p: ``[rows]`` (temperature 0: greedy).
        seeds, steps: per row, the request's seed and how many tokens it has generated.
        top_k, min_p: ``[rows]`` (0: off); ``None``: off for every row.
    """
    is_sampled = temperature > 0
    if not bool(is_sampled.any()):
        return logits.argmax(dim=-1)
    sampled = None if bool(is_sampled.all()) else is_sampled.nonzero().flatten()  # None: every row
    scaled = _rows(logits, sampled).float() / _rows(temperature, sampled).float().unsqueeze(1)
    probs = _likeliest(torch.softmax(scaled, dim=-1), _rows(top_k, sampled), _rows(min_p, sampled))
    indices = range(logits.shape[0]) if sampled is None else sampled.tolist()
    draws = torch.tensor([uniform(seeds[i], steps[i]) for i in indices], dtype=probs.dtype).to(probs.device)
    nucleus = _rows(top_p, sampled).float()
    if bool((nucleus >= 1).all()):
        tokens = _inverse_cdf(probs, draws)
    else:
        tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        whole = (nucleus >= 1).nonzero().flatten()
        if whole.numel():
            tokens[whole] = _inverse_cdf(probs.index_select(0, whole), draws.index_select(0, whole))
        part = (nucleus < 1).nonzero().flatten()
        tokens[part] = _nucleus_tokens(
            probs.index_select(0, part), nucleus.index_select(0, part), draws.index_select(0, part)
        )
    if sampled is None:
        return tokens
    chosen = logits.argmax(dim=-1)
    chosen[sampled] = tokens
    return chosen


def _likeliest(probs: Tensor, top_k: Tensor | None, min_p: Tensor | None) -> Tensor:
    """``probs [rows, vocab]`` with each row's tokens outside its ``top_k`` likeliest (ties kept) or
    below ``min_p`` times its likeliest token's probability zeroed, renormalised (unchanged, not
    copied, when no row asks for either)."""
    keep = None
    if top_k is not None and bool((top_k > 0).any()):
        k = top_k.clamp(min=0, max=probs.shape[-1])
        kth = probs.topk(int(k.max()), dim=-1).values.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
        keep = (probs >= kth) | (k == 0).unsqueeze(1)
    if min_p is not None and bool((min_p > 0).any()):
        above = probs >= min_p.to(probs.dtype).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        keep = above if keep is None else keep & above
    if keep is None:
        return probs
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def _nucleus_tokens(probs: Tensor, nucleus: Tensor, draws: Tensor) -> Tensor:
    """``[rows]`` tokens drawn from each row's nucleus (``nucleus [rows]`` its mass ``p``). A row's
    likeliest tokens are ranked first (`torch.topk` of `CANDIDATES` of them, then more): once they
    reach the row's mass every token after them is out of its nucleus; a row whose nucleus is wider
    still is ranked whole. Either way the same token, in a fraction of a full sort's time (for 32
    rows of SmolLM2's 49152 tokens: a sort 43 ms, the 256 likeliest 2 ms, the 4096 likeliest 9 ms)."""
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    vocabulary = probs.shape[-1]
    for count in [c for c in CANDIDATES if c < vocabulary] + [vocabulary]:
        some = probs.index_select(0, rows)
        if count < vocabulary:
            ranked, order = some.topk(count, dim=-1)
        else:
            ranked, order = some.sort(dim=-1, descending=True)
        row_nucleus = nucleus.index_select(0, rows)
        tokens[rows] = _ranked_tokens(ranked, order, row_nucleus, draws.index_select(0, rows))
        rows = rows[ranked.cumsum(dim=-1)[:, -1] < row_nucleus]  # nuclei wider than ``count`` tokens
        if rows.numel() == 0:
            break
    return tokens


def _ranked_tokens(ranked: Tensor, order: Tensor, nucleus: Tensor, draws: Tensor) -> Tensor:
    """The draw among ``ranked [rows, k]`` (probabilities, descending; ``order`` their tokens) kept by
    the nucleus: the shortest prefix whose mass reaches ``nucleus`` (the first token always)."""
    before = ranked.cumsum(dim=-1) - ranked  # mass of the tokens ranked above each one
    kept = ranked * (before < nucleus.unsqueeze(1))
    return order.gather(1, _inverse_cdf(kept, draws).unsqueeze(1)).squeeze(1)


def _rows(values: Tensor | None, index: Tensor | None) -> Tensor | None:
    """``values``' rows at ``index`` (all of them for ``None``, without a copy)."""
    return values if index is None or values is None else values.index_select(0, index)


def _inverse_cdf(probs: Tensor, draws: Tensor) -> Tensor:
    """``[rows]``: per row of ``probs [rows, n]`` (not necessarily normalised), the index at which the
    running sum first exceeds ``draws [rows]`` times the row's total."""
    running = probs.cumsum(dim=-1)
    position = torch.searchsorted(running, (draws * running[:, -1]).unsqueeze(1), right=True)
    return position.clamp(max=probs.shape[-1] - 1).squeeze(1)
