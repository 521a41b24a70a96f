"""Generation throughput with a different adapter per row, on SmolLM2-135M.

16 prompts of 32 tokens, 32 new greedy tokens, LoRA rank 8 on every linear layer of every block,
with 1, 4 and 16 distinct adapters among the 16 rows. Measured in one run, interleaved round by
round so that machine noise hits every system alike:

- ``base``: the bare transformers model, no adapters;
- ``flora`` with each strategy (``loop``, ``bmm``, ``segmented``) and ``auto``;
- ``peft_mixed``: Hugging Face PEFT with the same adapters, one call with ``adapter_names=``;
- ``peft_sequential``: PEFT, one ``generate`` per distinct adapter over its rows;
- the FLoRA adapter (16 distinct) at ranks 1, 2, 4, 8 against gather+bmm LoRA at the same ranks.

Every record has ``tokens_per_s`` (median over rounds) and ``ratio_to_base``. Usage:

    python benchmarks/batch_generation.py --json out.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from harness import Case, assignment, measure, randomize, token_rows, write_json
from peft import PeftModel

from flora import AdapterModel, FloraConfig, LoraConfig, load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--distinct", default="1,4,16")
    parser.add_argument("--flora-ranks", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-peft", action="store_true", help="leave out the PEFT baselines")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    distincts = [int(d) for d in args.distinct.split(",")]
    flora_ranks = [int(r) for r in args.flora_ranks.split(",")]
    torch.manual_seed(0)

    base, tokenizer = load_base(args.model)
    ids = token_rows(tokenizer, args.rows, args.prompt_tokens)
    mask = torch.ones_like(ids)
    gen = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )

    model = AdapterModel(load_base(args.model)[0], tokenizer)
    most = max(distincts)
    for i in range(most):
        model.add_adapter(f"lora{i}", LoraConfig(r=args.rank, alpha=2 * args.rank))
        randomize(model.adapter_parameters(f"lora{i}"), seed=i)
    for r in flora_ranks:
        for i in range(args.rows):
            model.add_adapter(f"flora_r{r}_{i}", FloraConfig(r=r))
            randomize(model.adapter_parameters(f"flora_r{r}_{i}"), seed=100 * r + i)
            if r != args.rank:
                model.add_adapter(f"lora_r{r}_{i}", LoraConfig(r=r, alpha=2 * r))
                randomize(model.adapter_parameters(f"lora_r{r}_{i}"), seed=100 * r + i)

    def flora_run(names: list[str], strategy: str):
        def run():
            model.strategy = strategy
            return model.generate(ids, attention_mask=mask, adapter_names=names, **gen)

        return run

    cases = [Case({"system": "base", "method": None, "strategy": None, "distinct_adapters": 0, "rank": None},
                  lambda: base.generate(ids, attention_mask=mask, **gen))]  # fmt: skip
    for distinct in distincts:
        names = assignment(args.rows, distinct, "lora")
        for strategy in ("loop", "bmm", "segmented", "auto"):
            record = {
                "system": "flora",
                "method": "lora",
                "strategy": strategy,
                "distinct_adapters": distinct,
                "rank": args.rank,
            }
            cases.append(Case(record, flora_run(names, strategy)))
    for r in flora_ranks:
        lora_prefix = "lora" if r == args.rank and args.rows <= most else f"lora_r{r}_"
        for method, prefix, strategy in (
            ("flora", f"flora_r{r}_", "flora"),
            ("flora", f"flora_r{r}_", "auto"),
            ("lora", lora_prefix, "bmm"),
        ):
            names = assignment(args.rows, args.rows, prefix)
            record = {
                "system": "flora",
                "method": method,
                "strategy": strategy,
                "distinct_adapters": args.rows,
                "rank": r,
                "sweep": "rank",
            }
            cases.append(Case(record, flora_run(names, strategy)))

    if not args.skip_peft:
        peft_model = peft_with_adapters(model, args.model, most)
        for distinct in distincts:
            names = assignment(args.rows, distinct, "lora")
            record = {
                "system": "peft_mixed",
                "method": "lora",
                "strategy": None,
                "distinct_adapters": distinct,
                "rank": args.rank,
            }
            cases.append(
                Case(
                    record,
                    lambda names=names: peft_model.generate(
                        input_ids=ids, attention_mask=mask, adapter_names=names, **gen
                    ),
                )
            )
            record = {
                "system": "peft_sequential",
                "method": "lora",
                "strategy": None,
                "distinct_adapters": distinct,
                "rank": args.rank,
            }
            cases.append(Case(record, lambda names=names: peft_sequential(peft_model, ids, mask, names, gen)))

    measure(cases, args.rounds)

    tokens = args.rows * args.new_tokens
    base_tps = tokens / cases[0].median_s
    records = []
    for case in cases:
        tps = tokens / case.median_s
        records.append({**case.record, "tokens_per_s": round(tps, 2), "ratio_to_base": round(tps / base_tps, 4),
                        "seconds": [round(s, 4) for s in case.seconds]})  # fmt: skip
    summary = summarize(records, most)
    print_table(records, summary)
    if args.json:
        result = {
            "benchmark": "batch_generation", "model": args.model, "rows": args.rows,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "records": records, "summary": summary,
        }  # fmt: skip
        write_json(args.json, result)


def peft_with_adapters(model: AdapterModel, model_name: str, count: int) -> PeftModel:
    """A PEFT model holding the same LoRA adapters ``lora0..`` as ``model`` (saved and loaded)."""
    peft_model = None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            model.save_adapter(f"lora{i}", Path(tmp) / f"lora{i}")
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(
                    load_base(model_name)[0], Path(tmp) / "lora0", adapter_name="lora0"
                )
            else:
                peft_model.load_adapter(Path(tmp) / f"lora{i}", adapter_name=f"lora{i}")
    return peft_model.eval()


def peft_sequential(peft_model: PeftModel, ids, mask, names: list[str], gen: dict) -> None:
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        peft_model.set_adapter(name)
        peft_model.generate(input_ids=ids[rows], attention_mask=mask[rows], **gen)


def summarize(records: list[dict], most: int) -> dict:
    def find(**match):
        return next(r for r in records if all(r.get(k) == v for k, v in match.items()) and "sweep" not in r)

    auto = find(system="flora", strategy="auto", distinct_adapters=most)
    summary = {"flora_auto_ratio_to_base_16": auto["ratio_to_base"]}
    peft = [r for r in records if r["system"] == "peft_mixed" and r["distinct_adapters"] == most]
    if peft:
        summary["flora_auto_vs_peft_mixed_16"] = round(auto["tokens_per_s"] / peft[0]["tokens_per_s"], 3)
        summary["target_met"] = (
            summary["flora_auto_ratio_to_base_16"] >= 0.85 and summary["flora_auto_vs_peft_mixed_16"] >= 3
        )
    return summary


def print_table(records: list[dict], summary: dict) -> None:
    header = f"{'system':<16}{'method':<7}{'strategy':<10}{'distinct':>9}{'rank':>6}{'tokens/s':>11}{'x base':>9}"
    print(header)
    print("-" * len(header))
    for r in records:
        print(f"{r['system']:<16}{r['method'] or '-':<7}{r['strategy'] or '-':<10}{r['distinct_adapters']:>9}"
              f"{r['rank'] or '-':>6}{r['tokens_per_s']:>11.1f}{r['ratio_to_base']:>9.3f}")  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
