"""Where one decoding step's time goes: a `torch.profiler` table, the bare model against flora.

16 prompts of 32 tokens are prefilled, then ``--steps`` one-token steps are profiled over their
cache, with the bare model and with flora routing 16 distinct LoRA r8 adapters (every linear layer)
under one routing reused across steps, as `AdapterModel.generate` does. Prints, per system, the
operators by self CPU time per step and the totals; ``--json`` writes the same figures.

    python benchmarks/profile_decode.py --json benchmarks/results/profile_decode.json
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from harness import assignment, randomize, token_rows, write_json
from torch.profiler import ProfilerActivity, profile

from flora import AdapterModel, LoraConfig, load_base
from flora.base import CACHE_KEY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--distinct", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=12, help="operators listed per system")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_base(args.model)
    model = AdapterModel(base, tokenizer)
    for i in range(args.distinct):
        model.add_adapter(f"lora{i}", LoraConfig(r=8, alpha=16))
        randomize(model.adapter_parameters(f"lora{i}"), seed=i)
    ids = token_rows(tokenizer, args.rows, 32)
    mask = torch.ones_like(ids)
    result = {"benchmark": "profile_decode", "model": args.model, "rows": args.rows, "steps": args.steps,
              "torch_threads": torch.get_num_threads(), "systems": {}}  # fmt: skip
    for system, names in (
        ("base", None),
        (f"flora_lora_r8_{args.distinct}", assignment(args.rows, args.distinct, "lora")),
    ):
        routed = contextlib.nullcontext() if names is None else model.routed(model.routing(names))
        result["systems"][system] = profile_steps(system, model, routed, ids, mask, args.steps, args.top)
    if args.json:
        write_json(args.json, result)


def profile_steps(label: str, model: AdapterModel, routed, ids, mask, steps: int, top: int) -> dict:
    """Prefill, one warm-up step, then ``steps`` profiled steps, all inside ``routed`` (one routing
    for every step); per-step milliseconds by operator."""
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], steps + 1)], dim=1)
    with torch.no_grad(), routed:
        out = model.base_model(ids, attention_mask=mask, use_cache=True)
        cache, token = getattr(out, CACHE_KEY), out.logits[:, -1:].argmax(-1)

        def step(i: int) -> None:
            nonlocal token
            length = ids.shape[1] + i + 1
            logits = model.base_model(
                input_ids=token, attention_mask=full_mask[:, :length], **{CACHE_KEY: cache}
            ).logits
            token = logits[:, -1:].argmax(-1)

        step(0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(1, steps + 1):
                step(i)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    rows = [{"op": e.key, "calls_per_step": e.count / steps,
             "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 3)} for e in events[:top]]  # fmt: skip
    calls = sum(e.count for e in events) / steps
    print(f"\n{label}: {total_ms:.1f} ms self CPU per step, {calls:.0f} operator calls")
    print(f"{'operator':<32}{'calls/step':>11}{'ms/step':>10}")
    for row in rows:
        print(f"{row['op']:<32}{row['calls_per_step']:>11.0f}{row['self_ms_per_step']:>10.2f}")
    return {"self_ms_per_step": round(total_ms, 2), "calls_per_step": calls, "operators": rows}


if __name__ == "__main__":
    main()
