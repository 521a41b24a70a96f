"""Training throughput with one adapter versus many mixed in one batch, on SmolLM2-135M.

One training step = forward with labels, backward, AdamW step on the adapters used (fused, as
``transformers.Trainer`` uses by default; each adapter has its own optimizer state), for a batch of
``--rows`` sequences of ``--tokens`` tokens. For LoRA (rank 8, ``auto`` strategy) and FLoRA
(rank 1, its element-wise form) the same batch size runs with 1, 4 and 16 distinct adapters
among the rows, each adapter on every linear layer of every block. Measured in one run,
interleaved round by round. Records: ``tokens_per_s`` (median over rounds) and
``ratio_to_single`` (against the same method with one adapter). Target: 16 mixed >= 0.9x single.

    python benchmarks/train_throughput.py --json out.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import Case, assignment, measure, randomize, token_rows, write_json

from flora import AdapterModel, FloraConfig, LoraConfig

METHODS = {"lora": (LoraConfig, "auto"), "flora": (FloraConfig, "flora")}


def training_step(model: AdapterModel, optimizer: torch.optim.Optimizer, ids, names: list[str], strategy: str):
    def run():
        model.strategy = strategy
        loss = model(ids, attention_mask=torch.ones_like(ids), labels=ids, adapter_names=names).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--flora-rank", type=int, default=1)
    parser.add_argument("--distinct", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    distincts = [int(d) for d in args.distinct.split(",")]
    torch.manual_seed(0)

    model = AdapterModel.from_pretrained(args.model)
    model.train()
    ids = token_rows(model.tokenizer, args.rows, args.tokens)
    ranks = {"lora": args.lora_rank, "flora": args.flora_rank}
    cases = []
    for method, (config_class, strategy) in METHODS.items():
        rank = ranks[method]
        extra = {"alpha": 2 * rank} if method == "lora" else {}
        for i in range(max(distincts)):
            model.add_adapter(f"{method}{i}", config_class(r=rank, **extra))
            randomize(model.adapter_parameters(f"{method}{i}"), seed=i)
        for distinct in distincts:
            names = assignment(args.rows, distinct, method)
            parameters = [p for name in set(names) for p in model.adapter_parameters(name).values()]
            optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=True)
            record = {"method": method, "strategy": strategy, "distinct_adapters": distinct, "rank": rank}
            cases.append(Case(record, training_step(model, optimizer, ids, names, strategy)))
    measure(cases, args.rounds)

    tokens = args.rows * args.tokens
    records = []
    for case in cases:
        single = next(c for c in cases if c.record["method"] == case.record["method"])
        records.append({**case.record, "tokens_per_s": round(tokens / case.median_s, 2),
                        "ratio_to_single": round(single.median_s / case.median_s, 4),
                        "seconds": [round(s, 4) for s in case.seconds]})  # fmt: skip
    most = max(distincts)
    summary = {
        f"{r['method']}_{most}_mixed_ratio_to_single": r["ratio_to_single"]
        for r in records
        if r["distinct_adapters"] == most
    }
    summary["target_met"] = all(value >= 0.9 for value in summary.values())
    print(f"{'method':<8}{'strategy':<10}{'distinct':>9}{'rank':>6}{'tokens/s':>11}{'x single':>10}")
    for r in records:
        print(f"{r['method']:<8}{r['strategy']:<10}{r['distinct_adapters']:>9}{r['rank']:>6}"
              f"{r['tokens_per_s']:>11.1f}{r['ratio_to_single']:>10.3f}")  # fmt: skip
    print(summary)
    if args.json:
        result = {
            "benchmark": "train_throughput", "model": args.model, "rows": args.rows, "tokens": args.tokens,
            "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "records": records, "summary": summary,
        }  # fmt: skip
        write_json(args.json, result)


if __name__ == "__main__":
    main()
