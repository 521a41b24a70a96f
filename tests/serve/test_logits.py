"""`flora.serve.logits.adjust_logits` and the top-k / min-p filter of `flora.serve.sampling`: each row
equals transformers' logits processor for its setting applied to that row alone, whatever shares
its batch."""

from __future__ import annotations

import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TopKLogitsWarper,
)

from flora.serve.logits import LogitsSettings, RowHistory, adjust_logits, chosen_logprobs, token_counts
from flora.serve.sampling import _likeliest

VOCAB = 50


def _histories(rows: int) -> list[RowHistory]:
    generator = torch.Generator().manual_seed(3)
    draw = lambda count: torch.randint(0, VOCAB, (count,), generator=generator).tolist()  # noqa: E731
    return [RowHistory(draw(4 + row), draw(2 * row)) for row in range(rows)]


def _reference(logits: torch.Tensor, settings: LogitsSettings, history: RowHistory, stops: frozenset[int]):
    """One row through transformers' processors (and OpenAI's formula for presence and frequency)."""
    ids = torch.tensor([[*history.prompt, *history.generated]])
    row = logits.unsqueeze(0).clone()
    if settings.logit_bias:
        row = SequenceBiasLogitsProcessor({(t,): b for t, b in settings.logit_bias})(ids, row)
    if settings.allowed_token_ids is not None:
        banned = torch.ones(VOCAB, dtype=torch.bool)
        banned[list(settings.allowed_token_ids)] = False
        row = row.masked_fill(banned, float("-inf"))
    if settings.min_tokens and stops:
        processor = MinNewTokensLengthLogitsProcessor(len(history.prompt), settings.min_tokens, list(stops))
        row = processor(ids, row)
    if settings.repetition_penalty != 1.0:
        row = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)(ids, row)
    counts = token_counts([history.generated], VOCAB, row.device).to(row.dtype)
    row = row - settings.frequency_penalty * counts - settings.presence_penalty * (counts > 0).to(row.dtype)
    return row[0]


def test_each_row_gets_what_transformers_processors_give_it_alone():
    settings = [
        LogitsSettings(),
        LogitsSettings(repetition_penalty=1.7),
        LogitsSettings(presence_penalty=0.8, frequency_penalty=-0.3),
        LogitsSettings(logit_bias=((3, -100.0), (7, 5.5))),
        LogitsSettings(min_tokens=20),
        LogitsSettings(allowed_token_ids=(1, 2, 30)),
        LogitsSettings(
            repetition_penalty=0.6, presence_penalty=-1.0, frequency_penalty=1.2, logit_bias=((0, 2.0),), min_tokens=4
        ),  # fmt: skip
        LogitsSettings(),
    ]
    rows = len(settings)
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    histories = _histories(rows)
    stops = [frozenset({5, 9})] * rows
    adjusted = adjust_logits(logits, settings, histories, stops)
    for row in range(rows):
        expected = _reference(logits[row], settings[row], histories[row], stops[row])
        assert torch.allclose(adjusted[row], expected, atol=1e-12), row
        alone = adjust_logits(logits[row : row + 1], settings[row : row + 1], histories[row : row + 1], stops[:1])
        assert torch.equal(adjusted[row], alone[0]), row
    assert adjust_logits(logits, [LogitsSettings()] * rows, histories, stops) is logits  # nothing to change


def test_top_k_and_min_p_keep_the_tokens_transformers_keeps_row_by_row():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(5))
    logits[2, :10] = 4.0  # ties at the k-th token are kept
    top_k = torch.tensor([0, 3, 5, 0, 1, 7])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.0, 0.05])
    kept = _likeliest(torch.softmax(logits, dim=-1), top_k, min_p)
    for row in range(logits.shape[0]):
        scores = logits[row : row + 1]
        if top_k[row]:
            scores = TopKLogitsWarper(int(top_k[row]))(None, scores)
        if min_p[row]:
            scores = MinPLogitsWarper(float(min_p[row]))(None, scores)
        expected = torch.softmax(scores, dim=-1)[0]
        assert torch.allclose(kept[row], expected, atol=1e-6), row


def test_chosen_logprobs_are_the_log_softmax_and_its_top_tokens():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    tokens = torch.tensor([4, 0, 49])
    values = chosen_logprobs(logits, tokens, [0, 2, 5])
    logprobs = torch.log_softmax(logits, dim=-1)
    for row, value in enumerate(values):
        assert value.logprob == logprobs[row, tokens[row]].item()
        best = logprobs[row].topk([0, 2, 5][row])
        assert value.top == tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
