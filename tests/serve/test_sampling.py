"""`flora.serve.sampling.next_tokens`: greedy rows, the distribution sampled rows draw from (whole
vocabulary and nucleus), and a seeded row's token whatever shares its batch."""

from __future__ import annotations

import torch

from flora.serve.sampling import CANDIDATES, next_tokens, uniform

LOGITS = torch.tensor([1.0, 3.0, 0.5, 2.5, -1.0, 2.0])
DRAWS = 4000  # seeds per frequency check: a frequency's standard error is at most 0.008


def _frequencies(temperature: float, top_p: float) -> torch.Tensor:
    """How often each token comes out of one row with ``LOGITS`` over ``DRAWS`` seeds."""
    logits = LOGITS.expand(DRAWS, -1)
    tokens = next_tokens(
        logits, torch.full((DRAWS,), temperature), torch.full((DRAWS,), top_p), list(range(DRAWS)), [3] * DRAWS
    )
    return torch.bincount(tokens, minlength=LOGITS.numel()).float() / DRAWS


def test_temperature_zero_is_the_argmax_beside_sampled_rows():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0])
    tokens = next_tokens(logits, temperature, torch.tensor([1.0, 0.9, 1.0, 1.0, 0.5]), [1, 2, 3, 4, 5], [0] * 5)
    assert torch.equal(tokens[[0, 2, 4]], logits[[0, 2, 4]].argmax(dim=-1))


def test_sampling_the_whole_vocabulary_draws_from_the_softmax():
    for temperature in (1.0, 0.5):
        expected = torch.softmax(LOGITS / temperature, dim=-1)
        assert torch.allclose(_frequencies(temperature, 1.0), expected, atol=0.03), temperature


def test_nucleus_sampling_draws_from_the_renormalised_top_tokens():
    probs = torch.softmax(LOGITS, dim=-1)  # ranked: 1 (0.45), 3 (0.27), 5 (0.17), 0, 2, 4
    ranked = probs.argsort(descending=True)
    expected = torch.zeros_like(probs)
    expected[ranked[:3]] = probs[ranked[:3]] / probs[ranked[:3]].sum()  # 0.45 + 0.27 < 0.8 <= + 0.17
    frequencies = _frequencies(1.0, 0.8)
    assert torch.allclose(frequencies, expected, atol=0.03)
    assert frequencies[ranked[3:]].sum() == 0


def test_a_seeded_row_draws_the_same_token_whatever_shares_its_batch():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    seeds, steps = [11, 12, 13, 14], [0, 5, 9, 2]
    for top_p in (1.0, 0.9):
        alone = next_tokens(logits[2:3], torch.tensor([0.8]), torch.tensor([top_p]), seeds[2:3], steps[2:3])
        for others in ([1.0, 1.0, 1.0], [0.5, 1.0, 0.95], [0.9, 0.9, 0.9]):  # whole-vocabulary and nucleus rows
            top_ps = torch.tensor([*others[:2], top_p, others[2]])
            batch = next_tokens(logits, torch.tensor([1.0, 0.0, 0.8, 1.3]), top_ps, seeds, steps)
            assert batch[2] == alone[0], (top_p, others)


def _ranked_whole(logits: torch.Tensor, temperature: float, top_p: float, seed: int, step: int) -> int:
    """The nucleus draw of one row with its whole vocabulary sorted (the definition)."""
    ranked, order = torch.softmax(logits / temperature, dim=-1).sort(descending=True)
    kept = ranked * ((ranked.cumsum(0) - ranked) < top_p)
    running = kept.cumsum(0)
    position = int(torch.searchsorted(running, uniform(seed, step) * running[-1], right=True))
    return int(order[min(position, len(order) - 1)])


def test_a_nucleus_ranked_among_the_likeliest_tokens_draws_what_ranking_the_whole_vocabulary_draws():
    generator = torch.Generator().manual_seed(2)
    vocabulary = 2 * CANDIDATES[-1]
    # nuclei of 3-95 tokens, 333-3022 and 3728-7204 (at top_p 0.5 and 0.9): every rung of CANDIDATES and the sort
    logits = torch.cat([torch.randn(6, vocabulary, generator=generator) * scale for scale in (4.0, 1.5, 0.1)])
    rows = logits.shape[0]
    for top_p in (0.5, 0.9):
        seeds = [100 * rows + i for i in range(rows)]
        tokens = next_tokens(logits, torch.full((rows,), 0.9), torch.full((rows,), top_p), seeds, [7] * rows)
        expected = [_ranked_whole(logits[i], 0.9, top_p, seeds[i], 7) for i in range(rows)]
        assert tokens.tolist() == expected, top_p
