"""Generation throughput with a different adapter per row, on SmolLM2-135M.

16 prompts of 32 tokens, 32 new greedy tokens, LoRA rank 8 on every linear layer of every block,
with 1, 4 and 16 distinct adapters among the 16 rows. Measured in one run, interleaved round by
round so that machine noise hits every system alike:

- ``base``: the bare transformers model, no adapters;
- ``flora`` with each strategy (``loop``, ``bmm``, ``segmented``, ``stacked``) and ``auto``;
- ``peft_mixed``: Hugging Face PEFT with the same adapters, one call with ``adapter_names=``;
- ``peft_sequential``: PEFT, one ``generate`` per distinct adapter over its rows;
- the FLoRA adapter (16 distinct) at ranks 1, 2, 4, 8 against gather+bmm LoRA at the same ranks;
- the same FLoRA and LoRA adapters, and the bare model, in each phase alone (``"sweep": "phase"``):
  ``prefill`` (one forward over the 16 prompts) and ``decode`` (``--decode-steps`` one-token steps
  over the prompts' cache, reusing one routing as `generate` does): the FLoRA paper's cost model
  is per phase (`docs/performance.md`).

Every record has ``tokens_per_s`` (median over rounds) and ``ratio_to_base``: each timed call
is paired with a call of the bare model in the same phase, and the ratio is the median of those pairs
(`harness.measure`). Whether ``auto`` picks as well as the best fixed strategy is then measured head
to head (``--head-to-head-rounds``): at each adapter count, every fixed strategy within 10 % of the
best is timed next to a call of ``auto`` (``"sweep": "head_to_head"``, ``ratio_to_auto``): two
ratios to the base model, each with its own noise, cannot resolve the 2 % this asks. ``--sweeps
none`` leaves out the rank and phase sweeps; ``--device cuda --dtype bfloat16`` runs on a GPU;
``--model random:smollm2-135m`` needs no weights. Usage:

    python benchmarks/batch_generation.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
from pathlib import Path

import torch
from harness import DTYPES, Case, add_device_options, assignment, machine, measure, randomize, token_rows, write_json
from peft import PeftModel

from flora import AdapterModel, FloraConfig, LoraConfig, load_base
from flora.base import CACHE_KEY
from flora.kernels.autotune import token_bucket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--distinct", default="1,4,16")
    parser.add_argument("--flora-ranks", default="1,2,4,8")
    parser.add_argument("--decode-steps", type=int, default=8, help="one-token steps per decode-phase measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--head-to-head-rounds", type=int, default=10,
                        help="rounds of auto against each fixed strategy near the best (0: none)")  # fmt: skip
    parser.add_argument("--skip-peft", action="store_true", help="leave out the PEFT baselines")
    parser.add_argument("--sweeps", choices=("all", "none"), default="all", help="the rank and phase sweeps")
    add_device_options(parser)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if args.rounds < 1 or args.head_to_head_rounds < 0:
        parser.error(f"--rounds {args.rounds} / --head-to-head-rounds {args.head_to_head_rounds}: expected at "
                     f"least 1 round, and 0 or more head-to-head rounds")  # fmt: skip
    distincts = [int(d) for d in args.distinct.split(",")]
    flora_ranks = [int(r) for r in args.flora_ranks.split(",")]
    torch.manual_seed(0)

    dtype = DTYPES[args.dtype]
    base, tokenizer = load_base(args.model, dtype=dtype, device=args.device)
    ids = token_rows(tokenizer, args.rows, args.prompt_tokens).to(args.device)
    mask = torch.ones_like(ids)
    gen = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )

    model = AdapterModel(load_base(args.model, dtype=dtype, device=args.device)[0], tokenizer)
    model.adapter_dtype = DTYPES[args.adapter_dtype] if args.adapter_dtype else None
    if args.sweeps == "none":
        flora_ranks = []
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
    # `auto` first, next to the bare model: the headline ratios come from calls close in time.
    for strategy in ("auto", "loop", "bmm", "segmented", "stacked"):
        for distinct in distincts:
            names = assignment(args.rows, distinct, "lora")
            record = {"system": "flora", "method": "lora", "strategy": strategy, "distinct_adapters": distinct,
                      "rank": args.rank}  # fmt: skip
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

    for phase in ("prefill", "decode") if flora_ranks else ():
        phase_run = prefill_run if phase == "prefill" else functools.partial(decode_run, steps=args.decode_steps)
        tokens = args.rows * (args.prompt_tokens if phase == "prefill" else args.decode_steps)
        record = {"system": "base", "method": None, "strategy": None, "distinct_adapters": 0, "rank": None}
        cases.append(Case({**record, "sweep": "phase", "phase": phase, "tokens": tokens},
                          phase_run(base, contextlib.nullcontext, ids, mask)))  # fmt: skip
        for r in flora_ranks:
            lora_prefix = "lora" if r == args.rank and args.rows <= most else f"lora_r{r}_"
            for method, prefix, strategy in (("flora", f"flora_r{r}_", "flora"), ("lora", lora_prefix, "bmm")):
                routed = routed_with(model, assignment(args.rows, args.rows, prefix), strategy)
                record = {"system": "flora", "method": method, "strategy": strategy, "distinct_adapters": args.rows,
                          "rank": r, "sweep": "phase", "phase": phase, "tokens": tokens}  # fmt: skip
                cases.append(Case(record, phase_run(model.base_model, routed, ids, mask)))

    if not args.skip_peft:
        peft_model = peft_with_adapters(model, args.model, most, dtype, args.device)
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

    bases = {case.record.get("phase"): case for case in cases if case.record["system"] == "base"}
    for case in cases:
        if case.record["system"] != "base":
            case.reference = bases[case.record.get("phase")]
    measure(cases, args.rounds)
    generated = args.rows * args.new_tokens
    records = [record_of(case, generated, "ratio_to_base") for case in cases]
    if args.head_to_head_rounds:
        duels = head_to_head(list(zip(records, cases, strict=True)))
        measure(duels, args.head_to_head_rounds)
        records += [record_of(case, generated, "ratio_to_auto") for case in duels if case.reference is not None]
    summary = summarize(records, most)
    summary["auto_choices"] = auto_choices(model, distincts)
    print_table(records, summary)
    if args.json:
        result = {
            "benchmark": "batch_generation", "model": args.model, "rows": args.rows,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "device": args.device, "dtype": args.dtype, "adapter_dtype": args.adapter_dtype,
            "machine": machine(args.device), "records": records, "summary": summary,
        }  # fmt: skip
        write_json(args.json, result)


def record_of(case: Case, generated: int, ratio_name: str) -> dict:
    """``case``'s JSON record: tokens/s (median over rounds) and its median paired ratio, named ``ratio_name``."""
    tokens = case.record.get("tokens", generated)
    ratio = 1.0 if case.reference is None else case.ratio_to_reference
    record = {k: v for k, v in case.record.items() if k != "tokens"}
    return {**record, "tokens_per_s": round(tokens / case.median_s, 2), ratio_name: round(ratio, 4),
            "paired_ratios": [round(r, 4) for r in case.ratios],
            "seconds": [round(s, 4) for s in case.seconds]}  # fmt: skip


def auto_choices(model: AdapterModel, distincts: list[int]) -> dict:
    """What ``auto`` chose for LoRA at each adapter count: per strategy, how many of the autotuner's keys
    (layer group shapes, prefill and decoding) it won; none where one adapter serves every row (that
    path is `segmented`'s, unmeasured). Where every key went to one strategy, ``auto`` computes exactly
    what that fixed strategy does."""
    won: dict[int, dict[str, int]] = {d: {} for d in distincts}
    for key, choice in model.runtime.tuner.choices.items():
        method, _, _, _, adapters, *_ = key
        for d in distincts:
            if method == "lora" and adapters == token_bucket(d):
                won[d][choice] = won[d].get(choice, 0) + 1
    return won


def head_to_head(measured: list[tuple[dict, Case]]) -> list[Case]:
    """New cases timing ``auto`` against each fixed strategy within 10 % of the best one (by the ratios to
    the base model of the ``measured`` records), at each adapter count: every fixed call next to an
    ``auto`` call, so their ratio is ``auto seconds / fixed seconds`` per pair."""
    duels = []
    generate = [(r, case) for r, case in measured if r["system"] == "flora" and "sweep" not in r]
    for distinct in sorted({r["distinct_adapters"] for r, _ in generate}):
        at = [(r, case) for r, case in generate if r["distinct_adapters"] == distinct]
        best = max(r["ratio_to_base"] for r, _ in at if r["strategy"] != "auto")
        auto = next(case for r, case in at if r["strategy"] == "auto")
        reference = Case({**auto.record, "sweep": "head_to_head"}, auto.run)
        duels.append(reference)
        duels += [Case({**case.record, "sweep": "head_to_head"}, case.run, reference=reference)
                  for r, case in at if r["strategy"] != "auto" and r["ratio_to_base"] >= 0.9 * best]  # fmt: skip
    return duels


def prefill_run(forward, routed, ids, mask):
    """One forward over the prompts: ``forward`` (a transformers model) inside ``routed()`` (the
    adapters' routing, or nothing for the bare model)."""

    def run():
        with torch.no_grad(), routed():
            return forward(ids, attention_mask=mask, use_cache=False)

    return run


def decode_run(forward, routed, ids, mask, steps: int):
    """``steps`` one-token forward passes over the prompts' cache (cropped back afterwards, so that
    every call decodes at the same lengths), inside ``routed()`` as in `prefill_run`."""
    with torch.no_grad(), routed():
        prefill = forward(ids, attention_mask=mask, use_cache=True)
    cache, token = getattr(prefill, CACHE_KEY), prefill.logits[:, -1:].argmax(-1)
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], steps)], dim=1)

    def run():
        with torch.no_grad(), routed():
            for step in range(steps):
                forward(input_ids=token, attention_mask=full_mask[:, : ids.shape[1] + step + 1], use_cache=True,
                        **{CACHE_KEY: cache})  # fmt: skip
        cache.crop(-steps)

    return run


def routed_with(model: AdapterModel, names: list[str], strategy: str):
    """A context factory: ``model`` routing ``names`` (one routing, reused by every call, as in
    `generate`) with ``strategy``."""
    routing = model.routing(names)

    def routed():
        model.strategy = strategy
        return model.routed(routing)

    return routed


def peft_with_adapters(model: AdapterModel, model_name: str, count: int, dtype, device) -> PeftModel:
    """A PEFT model holding the same LoRA adapters ``lora0..`` as ``model`` (saved and loaded)."""
    peft_model = None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            model.save_adapter(f"lora{i}", Path(tmp) / f"lora{i}")
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(
                    load_base(model_name, dtype=dtype, device=device)[0], Path(tmp) / "lora0", adapter_name="lora0"
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
    """The issue's targets: flora ``auto`` at ``most`` distinct adapters >= 0.93x the bare model (and
    the ratios at fewer), against PEFT's mixed batch; per phase, FLoRA and LoRA at each rank."""

    def find(**match):
        return next(r for r in records if all(r.get(k) == v for k, v in match.items()))

    auto = {r["distinct_adapters"]: r["ratio_to_base"] for r in records
            if r["system"] == "flora" and r["strategy"] == "auto" and "sweep" not in r}  # fmt: skip
    fixed = {d: max((r for r in records if r["system"] == "flora" and r["strategy"] not in ("auto", None)
                     and r["distinct_adapters"] == d and "sweep" not in r), key=lambda r: r["ratio_to_base"])
             for d in auto}  # fmt: skip
    summary = {"flora_auto_ratio_to_base": auto, "target_0.93_met": auto[most] >= 0.93,
               "best_fixed_strategy": {d: (r["strategy"], r["ratio_to_base"]) for d, r in fixed.items()},
               "auto_over_best_fixed": {d: round(auto[d] / r["ratio_to_base"], 4) for d, r in fixed.items()},
               }  # fmt: skip
    duels = [r for r in records if r.get("sweep") == "head_to_head"]
    if duels:  # auto's speed over the fastest fixed strategy's, from pairs (1 / the largest fixed / auto)
        summary["auto_over_best_fixed_head_to_head"] = {
            d: {"strategy": best["strategy"], "auto_over_best": round(1 / best["ratio_to_auto"], 4)}
            for d in auto
            if (best := max((r for r in duels if r["distinct_adapters"] == d), key=lambda r: r["ratio_to_auto"]))
        }  # fmt: skip
    peft = [r for r in records if r["system"] == "peft_mixed" and r["distinct_adapters"] == most]
    if peft:
        flora_tps = find(system="flora", strategy="auto", distinct_adapters=most)["tokens_per_s"]
        summary[f"flora_auto_vs_peft_mixed_{most}"] = round(flora_tps / peft[0]["tokens_per_s"], 3)
    summary["phase_ratio_to_base"] = {
        f"{r['phase']} {r['method']} r{r['rank']}": r["ratio_to_base"] for r in records if r.get("sweep") == "phase"
        and r["system"] == "flora"
    }  # fmt: skip
    return summary


def print_table(records: list[dict], summary: dict) -> None:
    """Every record; a head-to-head one's ratio is to ``auto`` (``x auto``), the others' to the base model."""
    header = (f"{'system':<16}{'method':<7}{'strategy':<10}{'phase':<9}{'distinct':>9}{'rank':>6}{'tokens/s':>11}"
              f"{'ratio':>15}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in records:
        ratio = f"{r['ratio_to_auto']:.3f} x auto" if "ratio_to_auto" in r else f"{r['ratio_to_base']:.3f} x base"
        print(f"{r['system']:<16}{r['method'] or '-':<7}{r['strategy'] or '-':<10}{r.get('phase', 'generate'):<9}"
              f"{r['distinct_adapters']:>9}{r['rank'] or '-':>6}{r['tokens_per_s']:>11.1f}{ratio:>15}")  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
