"""What one decoding step with per-row LoRA adapters costs beyond the bare model: the adapters'
small products, and the memory their per-row tables take to read.

A bare-model decoding step reads each base weight once for all rows. With every row on its own
adapter, `bmm` reads each row's ``A`` and ``B`` (LoRA rank ``r`` on every linear layer): ``rows``
adapters' worth of bytes per step, however little arithmetic they carry. Measured, each against the
bare model's step in the same round (paired ratios, see ``harness``):

- ``one-adapter``: every row the same adapter (`segmented`: two small products per layer group);
- ``distinct``: every row its own adapter (`bmm` over the gathered per-row tables);
- ``distinct, fresh routing``: the same with a new batch (of the same rows) at every step, whose
  per-layer plans are worked out again (the kept per-row tables need no rewriting here, as no row's
  adapter changes);
- ``distinct, carried routing``: a new batch at every step made to ``carry`` (what the server does
  when rows join or leave: the layers' compiled functions of the last batch of its shape serve it).
  The model's adapters are read-only here, as in the server (`AdapterModel.adapters_read_only`);
- ``stream``: reading as many bytes as the distinct case's tables (a sum over a tensor that size).

``base / (base + stream)`` is the ratio that reading the tables allows at best. ``--device cuda
--dtype bfloat16`` runs it on a GPU, ``--adapter-dtype bfloat16`` keeps the LoRA tables in bfloat16,
``--model random:smollm2-135m`` needs no weights. Usage:

    python benchmarks/decode_memory.py --json benchmarks/results/decode_memory.json
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from batch_generation import decode_run, routed_with
from harness import DTYPES, Case, add_device_options, assignment, machine, measure, randomize, token_rows, write_json

from flora import AdapterModel, LoraConfig, load_base
from flora.base import CACHE_KEY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="one-token steps per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    add_device_options(parser)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)

    base, tokenizer = load_base(args.model, dtype=DTYPES[args.dtype], device=args.device)
    model = AdapterModel(load_base(args.model, dtype=DTYPES[args.dtype], device=args.device)[0], tokenizer)
    model.adapters_read_only = True  # as `flora serve` sets it
    model.adapter_dtype = DTYPES[args.adapter_dtype] if args.adapter_dtype else None
    for i in range(args.rows):
        model.add_adapter(f"lora{i}", LoraConfig(r=args.rank, alpha=2 * args.rank))
        randomize(model.adapter_parameters(f"lora{i}"), seed=i)
    ids = token_rows(tokenizer, args.rows, args.prompt_tokens).to(args.device)
    mask = torch.ones_like(ids)
    distinct = assignment(args.rows, args.rows, "lora")
    table_dtype = model.adapter_dtype or base.dtype
    adapter_bytes = sum(p.numel() for p in model.adapter_parameters("lora0").values()) * table_dtype.itemsize
    table_bytes = args.rows * adapter_bytes
    table = torch.ones(table_bytes // 4, device=args.device)

    def stream():
        for _ in range(args.steps):
            table.sum()

    bare = Case({"system": "base"}, decode_run(base, contextlib.nullcontext, ids, mask, args.steps))
    cases = [
        Case({"system": "one-adapter", "strategy": "auto"},
             decode_run(model.base_model, routed_with(model, ["lora0"] * args.rows, "auto"), ids, mask, args.steps)),
        Case({"system": "distinct", "strategy": "bmm"},
             decode_run(model.base_model, routed_with(model, distinct, "bmm"), ids, mask, args.steps)),
        Case({"system": "distinct, fresh routing", "strategy": "bmm"},
             fresh_routing_run(model, distinct, ids, mask, args.steps, carry=False)),
        Case({"system": "distinct, carried routing", "strategy": "bmm"},
             fresh_routing_run(model, distinct, ids, mask, args.steps, carry=True)),
        Case({"system": "stream", "bytes": table_bytes}, stream),
    ]  # fmt: skip
    for case in cases[:-1]:  # the stream is timed on its own
        case.reference = bare
    measure([bare, *cases], args.rounds)

    step_ms = {case.record["system"]: 1000 * case.median_s / args.steps for case in [bare, *cases]}
    records = [{**case.record, "ms_per_step": round(step_ms[case.record["system"]], 2),
                "ratio_to_base": round(case.ratio_to_reference, 4) if case.reference else None,
                "paired_ratios": [round(r, 4) for r in case.ratios]} for case in [bare, *cases]]  # fmt: skip
    bound = step_ms["base"] / (step_ms["base"] + step_ms["stream"])
    summary = {
        "adapter_mb": round(adapter_bytes / 2**20, 2),
        "tables_mb_per_step": round(table_bytes / 2**20, 1),
        "stream_gb_per_s": round(table_bytes / (step_ms["stream"] / 1000) / 1e9, 1),
        "ratio_allowed_by_table_traffic": round(bound, 4),
        "routing_rebuild_ms": round(step_ms["distinct, fresh routing"] - step_ms["distinct"], 2),
        "carried_routing_ms": round(step_ms["distinct, carried routing"] - step_ms["distinct"], 2),
    }
    for record in records:
        print(f"{record['system']:26} {record['ms_per_step']:8.2f} ms/step  ratio to base {record['ratio_to_base']}")
    for key, value in summary.items():
        print(f"{key}: {value}")
    if args.json:
        write_json(
            args.json,
            {"benchmark": "decode_memory", "model": args.model, "rows": args.rows, "rank": args.rank,
             "prompt_tokens": args.prompt_tokens, "steps": args.steps, "rounds": args.rounds,
             "device": args.device, "dtype": args.dtype, "adapter_dtype": args.adapter_dtype,
             "machine": machine(args.device),
             "records": records, "summary": summary},
        )  # fmt: skip


def fresh_routing_run(model: AdapterModel, names: list[str], ids, mask, steps: int, carry: bool):
    """`decode_run` with a new batch at every step, made to ``carry`` or not (`AdapterModel.routing`)."""
    model.strategy = "bmm"
    with torch.no_grad(), model.routed(model.routing(names)):
        prefill = model.base_model(ids, attention_mask=mask, use_cache=True)
    cache, token = getattr(prefill, CACHE_KEY), prefill.logits[:, -1:].argmax(-1)
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], steps)], dim=1)

    def run():
        model.strategy = "bmm"
        with torch.no_grad():
            for step in range(steps):
                with model.routed(model.routing(names, carry=carry)):
                    model.base_model(input_ids=token, attention_mask=full_mask[:, : ids.shape[1] + step + 1],
                                     use_cache=True, **{CACHE_KEY: cache})  # fmt: skip
        cache.crop(-steps)

    return run


if __name__ == "__main__":
    main()
