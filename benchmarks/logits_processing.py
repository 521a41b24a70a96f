"""What the per-row sampling fields cost a decoding step, flora's batched code against transformers'
logits processors applied row by row (each row has its own settings, so one processor call per row).

The logits are the real model's for ``--rows`` prompts (SmolLM2: 49152 tokens); every row has a
prompt of 128 tokens and 64 generated ones. Cases, each timed right after its reference in every
round (paired ratios, see ``harness``):

- plain rows (no setting): flora's `adjust_logits` hands the logits back untouched; greedy argmax
  is timed for scale;
- repetition, presence and frequency penalties on every row: `adjust_logits` against
  `RepetitionPenaltyLogitsProcessor` per row plus OpenAI's presence/frequency formula per row
  (transformers has no processor for those);
- ten ``logit_bias`` entries per row: against `SequenceBiasLogitsProcessor` per row;
- ``top_k`` 50 and ``min_p`` 0.05 on every sampled row: flora's filter against `TopKLogitsWarper`
  and `MinPLogitsWarper` per row.

Each flora case is checked equal to its reference and the check written. Usage:

    python benchmarks/logits_processing.py --json benchmarks/results/logits_processing.json
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from harness import TEXT, Case, measure, write_json
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TopKLogitsWarper,
)

from flora import load_base
from flora.serve.logits import LogitsSettings, RowHistory, adjust_logits, token_counts
from flora.serve.sampling import _likeliest


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
    rows, vocabulary = logits.shape
    generator = torch.Generator().manual_seed(0)
    draw = lambda count: torch.randint(0, vocabulary, (count,), generator=generator).tolist()  # noqa: E731
    histories = [RowHistory(draw(128), draw(64)) for _ in range(rows)]
    stops = [frozenset({tokenizer.eos_token_id})] * rows
    penalties = LogitsSettings(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5)
    bias = tuple((int(t), -5.0) for t in torch.randint(0, vocabulary, (10,), generator=generator).tolist())
    top_k, min_p = torch.full((rows,), 50), torch.full((rows,), 0.05)
    probs = torch.softmax(logits, dim=-1)

    def penalised_row_by_row() -> torch.Tensor:
        out = []
        for row, history in enumerate(histories):
            ids = torch.tensor([[*history.prompt, *history.generated]])
            scores = RepetitionPenaltyLogitsProcessor(1.2)(ids, logits[row : row + 1].clone())
            counts = token_counts([history.generated], vocabulary, scores.device).float()
            out.append(scores - 0.5 * counts - 0.5 * (counts > 0).float())
        return torch.cat(out)

    def biased_row_by_row() -> torch.Tensor:
        processor = lambda: SequenceBiasLogitsProcessor({(t,): b for t, b in bias})  # noqa: E731
        return torch.cat([processor()(torch.tensor([h.prompt]), logits[r : r + 1].clone())
                          for r, h in enumerate(histories)])  # fmt: skip

    def filtered_row_by_row() -> torch.Tensor:
        warpers = TopKLogitsWarper(50), MinPLogitsWarper(0.05)
        out = []
        for row in range(rows):
            scores = logits[row : row + 1]
            for warper in warpers:
                scores = warper(None, scores)
            out.append(torch.softmax(scores, dim=-1))
        return torch.cat(out)

    plain = [LogitsSettings()] * rows
    greedy = Case({"system": "greedy argmax"}, lambda: logits.argmax(dim=-1))
    cases = [
        greedy,
        Case({"system": "flora: plain rows"}, lambda: adjust_logits(logits, plain, histories, stops), greedy),
    ]
    pairs = [
        ("penalties", penalised_row_by_row, lambda: adjust_logits(logits, [penalties] * rows, histories, stops)),
        ("logit_bias", biased_row_by_row,
         lambda: adjust_logits(logits, [LogitsSettings(logit_bias=bias)] * rows, histories, stops)),
        ("top_k + min_p", filtered_row_by_row, lambda: _likeliest(probs, top_k, min_p)),
    ]  # fmt: skip
    for name, reference_run, flora_run in pairs:
        reference = Case({"system": f"transformers row by row: {name}"}, reference_run)
        case = Case({"system": f"flora: {name}"}, flora_run, reference)
        case.record["equal_to_reference"] = bool(torch.allclose(case.run(), reference.run(), atol=1e-5))
        cases += [reference, case]
    measure(cases, args.rounds)
    records = []
    for case in cases:
        record = case.record | {"ms": round(case.median_s * 1000, 3)}
        if case.reference is not None:
            record["speedup_over_reference"] = round(case.ratio_to_reference, 2)
        records.append(record)
        print(f"{record['system']:<48}{record['ms']:>9.3f} ms  {record.get('speedup_over_reference', '')}"
              f"  {record.get('equal_to_reference', '')}")  # fmt: skip
    if args.json:
        write_json(args.json, {
            "benchmark": "logits_processing", "model": args.model, "rows": rows, "vocabulary": vocabulary,
            "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cases": records,
        })  # fmt: skip


if __name__ == "__main__":
    main()
