"""What choosing the next token costs the server per decoding step, sampled rows against ranking the
whole vocabulary.

The logits are the real model's next-token logits for ``--rows`` prompts (SmolLM2: 49152 tokens).
Each case is `flora.serve.sampling.next_tokens` for every row at temperature 1 with one ``top_p``,
timed next to its reference in every round (paired ratios, see ``harness``): the same draw with
the whole vocabulary sorted for every row, which is what a nucleus is defined by (and what the
server did for every sampled row before). With ``top_p`` 1 the server takes the running sum in
vocabulary order (no ranking at all; other tokens than the reference's for the same draw, from the
same distribution); below 1 it ranks a row's likeliest tokens first (the same tokens as the
reference, checked and written). Greedy rows (``argmax``) are timed for scale. Also written: the
nucleus sizes over the rows for each ``top_p`` below 1. Usage:

    python benchmarks/sampling.py --json benchmarks/results/sampling.json
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from harness import TEXT, Case, measure, write_json

from flora import load_base
from flora.serve.sampling import next_tokens, uniform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base, tokenizer = load_base(args.model)
    words = TEXT.split()
    prompts = [" ".join(words[3 * row : 3 * row + 4 + row % 9]) for row in range(args.rows)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        logits = base(**batch).logits[:, -1].float().contiguous()
    rows = logits.shape[0]
    seeds, steps = list(range(rows)), [5] * rows
    ones = torch.ones(rows)
    ranked = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values.cumsum(dim=-1)

    cases = [Case({"system": "greedy"}, lambda: next_tokens(logits, torch.zeros(rows), ones, seeds, steps))]
    nucleus_sizes = {}
    for top_p in (1.0, 0.95, 0.9):
        p = torch.full((rows,), top_p)
        reference = Case({"system": f"whole vocabulary sorted, top_p {top_p}"},
                         lambda p=p: _sorted_whole(logits, p, seeds, steps))  # fmt: skip
        cases += [reference, Case({"system": f"flora, top_p {top_p}"},
                                  lambda p=p: next_tokens(logits, ones, p, seeds, steps), reference)]  # fmt: skip
        cases[-1].record["same_tokens_as_sorted"] = bool(torch.equal(cases[-1].run(), reference.run()))
        if top_p < 1:
            sizes = (ranked < top_p).sum(dim=-1) + 1
            nucleus_sizes[str(top_p)] = {key: int(getattr(sizes, key)()) for key in ("min", "median", "max")}
    measure(cases, args.rounds)

    records = []
    for case in cases:
        record = case.record | {"ms": round(case.median_s * 1000, 2)}
        if case.reference is not None:
            record["speedup_over_sorted"] = round(case.ratio_to_reference, 2)
        records.append(record)
        print(f"{record['system']:<40}{record['ms']:>8.2f} ms  {record.get('speedup_over_sorted', '')}"
              f"  {record.get('same_tokens_as_sorted', '')}")  # fmt: skip
    print("nucleus sizes (tokens):", nucleus_sizes)
    if args.json:
        write_json(args.json, {
            "benchmark": "sampling", "model": args.model, "rows": rows, "vocabulary": logits.shape[-1],
            "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "nucleus_sizes": nucleus_sizes, "cases": records,
        })  # fmt: skip


def _sorted_whole(logits: torch.Tensor, top_p: torch.Tensor, seeds: list[int], steps: list[int]) -> torch.Tensor:
    """Every row's nucleus draw with its whole vocabulary sorted (the definition)."""
    ranked, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    kept = ranked * ((ranked.cumsum(dim=-1) - ranked) < top_p.unsqueeze(1))
    running = kept.cumsum(dim=-1)
    draws = torch.tensor([uniform(seed, step) for seed, step in zip(seeds, steps, strict=True)])
    position = torch.searchsorted(running, (draws * running[:, -1]).unsqueeze(1), right=True)
    return order.gather(1, position.clamp(max=logits.shape[-1] - 1)).squeeze(1)


if __name__ == "__main__":
    main()
