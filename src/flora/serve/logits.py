"""Each request's own changes to its row of the logits before a token is chosen, and the log
probabilities reported to clients.

For a row with logits ``z: [vocab]``, prompt tokens ``P``, generated tokens ``G`` (``c_v``: how often
token ``v`` occurs in ``G``), the settings of OpenAI's and vLLM's APIs act in this order (vLLM's):

    z_v += logit_bias_v                                     (OpenAI's logit_bias)
    z_v  = -inf   for v not in allowed_token_ids            (vLLM's allowed_token_ids)
    z_v  = -inf   for v in EOS ∪ stop_token_ids while |G| < min_tokens
    z_v  = z_v / ρ if z_v > 0 else z_v · ρ,  v in P ∪ G      (repetition_penalty ρ, as transformers'
                                                            `RepetitionPenaltyLogitsProcessor`)
    z_v -= frequency_penalty · c_v + presence_penalty · [c_v > 0]

then greedy picks ``argmax z``; sampling divides by the temperature, keeps the ``top_k`` likeliest
tokens and those with ``π_v >= min_p · max π`` (`flora.serve.sampling`) and draws within ``top_p``.

Rows whose request sets none of these are not touched (a batch of plain requests pays nothing); the
others are changed with a few batched operations over just their rows, so each row's result is what
its settings give it alone, whatever shares the batch. Log probabilities are those of the model
itself (``log_softmax z`` before any change, as vLLM's default ``raw_logprobs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogitsSettings:
    """What a request changes in its logits (the neutral values change nothing)."""

    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @cached_property
    def neutral(self) -> bool:
        return self == NEUTRAL


NEUTRAL = LogitsSettings()


@dataclass(frozen=True)
class RowHistory:
    """A running row's tokens: its prompt's and those generated so far."""

    prompt: Sequence[int]
    generated: Sequence[int]


def adjust_logits(
    logits: Tensor, settings: Sequence[LogitsSettings], histories: Sequence[RowHistory],
    stop_ids: Sequence[frozenset[int]],
) -> Tensor:  # fmt: skip
    """``logits [rows, vocab]`` with each row's settings applied (see the module docstring); the
    input itself when no row changes anything.

    Args:
        settings, histories: per row.
        stop_ids: per row, the tokens that would end it (EOS unless ignored, and its stop_token_ids):
            banned while it has generated fewer than ``min_tokens``.
    """
    changing = [row for row, s in enumerate(settings) if not s.neutral]
    if not changing:
        return logits
    logits = logits.clone()
    device, vocabulary = logits.device, logits.shape[-1]
    rows, tokens, biases = [], [], []
    for row in changing:
        for token, bias in settings[row].logit_bias:
            rows.append(row), tokens.append(token), biases.append(bias)
    if rows:
        index = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
        logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)
    for row in changing:
        allowed = settings[row].allowed_token_ids
        if allowed is not None:
            keep = torch.full((vocabulary,), float("-inf"), dtype=logits.dtype, device=device)
            keep[list(allowed)] = 0.0
            logits[row] += keep
        if len(histories[row].generated) < settings[row].min_tokens and stop_ids[row]:
            logits[row, list(stop_ids[row])] = float("-inf")
    repeated = [r for r in changing if settings[r].repetition_penalty != 1.0]
    if repeated:
        ids, _ = _padded([[*histories[r].prompt, *histories[r].generated] for r in repeated], device)
        penalty = torch.tensor([settings[r].repetition_penalty for r in repeated], dtype=logits.dtype, device=device)
        index = torch.tensor(repeated, device=device)
        some = logits.index_select(0, index)
        seen = some.gather(1, ids)
        seen = torch.where(seen > 0, seen / penalty.unsqueeze(1), seen * penalty.unsqueeze(1))
        logits.index_copy_(0, index, some.scatter_(1, ids, seen))
    penalised = [r for r in changing if settings[r].presence_penalty or settings[r].frequency_penalty]
    if penalised:
        ids, real = _padded([histories[r].generated for r in penalised], device)
        # a token's first place among the (stably) sorted ids counts it once: a real place, as the
        # padding repeats a real id after it
        ordered, order = ids.sort(dim=1, stable=True)
        first = torch.ones_like(real)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        real_sorted = real.gather(1, order)
        presence = torch.tensor([settings[r].presence_penalty for r in penalised], dtype=logits.dtype, device=device)
        frequency = torch.tensor([settings[r].frequency_penalty for r in penalised], dtype=logits.dtype,
                                 device=device)  # fmt: skip
        index = torch.tensor(penalised, device=device)
        some = logits.index_select(0, index)
        some.scatter_add_(1, ids, -frequency.unsqueeze(1) * real.to(logits.dtype))
        some.scatter_add_(1, ordered, -presence.unsqueeze(1) * (first & real_sorted).to(logits.dtype))
        logits.index_copy_(0, index, some)
    return logits


def _padded(sequences: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """``[len(sequences), longest]`` token ids, each row padded with its own first id (or 0), and
    which places are real."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    real = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row] = sequence[0]
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            real[row, : len(sequence)] = True
    return ids.to(device), real.to(device)


def token_counts(sequences: Sequence[Sequence[int]], vocabulary: int, device: torch.device) -> Tensor:
    """``[len(sequences), vocabulary]``: how often each token occurs in each sequence."""
    ids, real = _padded(sequences, device)
    counts = torch.zeros(len(sequences), vocabulary, dtype=torch.int32, device=device)
    return counts.scatter_add_(1, ids, real.to(torch.int32))


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log probability and, when asked, the ``k`` likeliest tokens' (``top``: ``(id,
    logprob)`` descending)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def chosen_logprobs(logits: Tensor, tokens: Tensor, top: Sequence[int]) -> list[TokenLogprob]:
    """Per row of ``logits [rows, vocab]`` (the model's own), the log probability of ``tokens [rows]``
    and of the row's ``top[row]`` likeliest tokens."""
    logprobs = torch.log_softmax(logits if logits.element_size() >= 4 else logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    most = max(top, default=0)
    if most:
        values, ids = logprobs.topk(most, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(chosen[row], tuple(zip(ids[row][:k], values[row][:k], strict=True)) if k else ())
            for row, k in enumerate(top)]  # fmt: skip
