"""What LoRA's per-row tables in bfloat16 change against float32 tables: logits, greedy outputs, speed.

`AdapterModel.adapter_dtype = torch.bfloat16` (``flora serve --adapter-dtype bfloat16``) keeps the
tables that `bmm` gathers for each row (``A`` and ``s·Bᵀ`` of the row's adapter) in bfloat16; the
model stays in float32, the rows' inputs are rounded to bfloat16 for the two small products and
their sum is cast back. Measured on one float32 model with ``--adapters`` random LoRA adapters of
ranks 4/8/16/32 on ``q_proj`` and ``v_proj`` (S-LoRA's mixed set: `serve_workload.mixed_adapter_set`,
random ``B`` as `harness.randomize` draws it), prompt ``i`` on adapter ``i % adapters`` (round robin),
prompts of similar length batched together (``--batch-size``, left-padded), `bmm`, inference mode:

- logits: ``|logits(float32 tables) - logits(bfloat16 tables)|`` over every real prompt position
  and the whole vocabulary (max and mean), the share of positions whose top token is the same, and
  beside them the adapters' own effect ``|logits(adapter) - logits(base)|``, of which the difference
  is a fraction;
- greedy: ``--new-tokens`` tokens per prompt (to EOS at most) with each table dtype; the fraction of
  prompts whose outputs are identical, the fraction of float32's tokens generated before the first
  that differs, and at each divergence float32's logit margin between its token and bfloat16's;
- speed: a ``--speed-rows``-row decoding step (``--speed-steps`` tokens), every row its own adapter,
  with float32 and with bfloat16 tables, each paired with the bare model's step (`harness.measure`;
  ``benchmarks/decode_memory.py --adapter-dtype bfloat16`` does the same with LoRA r8 on every layer).

Prompts: ``--data DIR`` in Super-NaturalInstructions' format (`flora.data.load_sni`; ``--split FILE``
to name its tasks), rendered with the SNI template (definition only), interleaved over the tasks;
without ``--data``, windows of the benchmarks' own English text (``harness.TEXT``), noted in the JSON.
Usage:

    python benchmarks/adapter_dtype_accuracy.py --data DIR --json benchmarks/results/adapter_dtype_accuracy.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from batch_generation import decode_run, routed_with
from harness import TEXT, Case, machine, measure, token_rows, write_json
from serve_scale import RANKS, TARGETS
from serve_workload import mixed_adapter_set

from flora import AdapterModel, load_base
from flora.data import LeftPadCollator, Template, encode_prompt, load_sni, samples_from_tasks

TABLE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # None: the adapters' own (float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, help="a directory of Super-NaturalInstructions task files")
    parser.add_argument("--split", type=Path, help="a split file naming the tasks of --data to use (default: all)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    parser.add_argument("--logit-rows", type=int, default=4, help="prompts a forward compares (its logits held)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-rows", type=int, default=16)
    parser.add_argument("--speed-steps", type=int, default=8, help="one-token steps per speed measurement")
    parser.add_argument("--rounds", type=int, default=5, help="speed rounds")
    parser.add_argument("--seed", type=int, default=0, help="of the adapters")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu; the model is float32)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.speed_rows > args.adapters:
        parser.error(f"--speed-rows {args.speed_rows} needs as many adapters (--adapters is {args.adapters})")
    started = time.perf_counter()

    paths = mixed_adapter_set(args.model, args.adapters, RANKS, TARGETS, seed=args.seed)
    models = {}
    for label, table_dtype in TABLE_DTYPES.items():
        model = AdapterModel(*load_base(args.model, device=args.device), strategy="bmm")
        model.adapters_read_only = True  # as `flora serve` sets it
        model.adapter_dtype = table_dtype
        for name, path in paths.items():
            model.load_adapter(path, name)
        models[label] = model
    names, tokenizer = list(paths), models["float32"].tokenizer
    prompts, source = prompt_ids(tokenizer, args.data, args.split, args.prompts)

    with torch.inference_mode():
        prompt_batches = batches(prompts, names, args.batch_size, LeftPadCollator(tokenizer), args.device)
        logits = logit_figures(models, prompt_batches, args.logit_rows)
        greedy = greedy_figures(models, prompt_batches, args.new_tokens, tokenizer.eos_token_id)
        speed = speed_records(models, args.model, tokenizer, names[: args.speed_rows], args)
    adapter_mb = {label: statistics.mean(
        sum(p.numel() for p in models["float32"].adapter_parameters(name).values()) for name in names
    ) * (dtype or torch.float32).itemsize / 2**20 for label, dtype in TABLE_DTYPES.items()}  # fmt: skip

    print(f"prompts: {source['prompts']} ({source['kind']}), {source['prompt_tokens']} prompt tokens")
    for key, value in {**logits, **greedy}.items():
        if not isinstance(value, list):
            print(f"{key}: {value}")
    for record in speed:
        print(f"{record['system']:22} {record['ms_per_step']:8.2f} ms/step  ratio to base {record['ratio_to_base']}")
    if args.json:
        write_json(
            args.json,
            {"benchmark": "adapter_dtype_accuracy", "model": args.model, "dtype": "float32", "strategy": "bmm",
             "adapters": {"count": args.adapters, "ranks": RANKS, "targets": TARGETS, "seed": args.seed,
                          "mean_mb": {label: round(mb, 3) for label, mb in adapter_mb.items()}},
             "prompts": source, "batch_size": args.batch_size, "logit_rows": args.logit_rows,
             "new_tokens": args.new_tokens,
             "logits": logits, "greedy": greedy,
             "speed": {"rows": args.speed_rows, "steps": args.speed_steps, "rounds": args.rounds,
                       "prompt_tokens": SPEED_PROMPT_TOKENS, "records": speed,
                       "bfloat16_over_float32": round(speed[2]["ratio_to_base"] / speed[1]["ratio_to_base"], 4)},
             "device": args.device, "machine": machine(args.device),
             "seconds": round(time.perf_counter() - started)},
        )  # fmt: skip


def prompt_ids(tokenizer, data: Path | None, split: Path | None, count: int) -> tuple[list[list[int]], dict]:
    """``count`` prompts' token ids and where they came from: SNI instances rendered with the SNI template,
    taken in turn from each task (instance 0 of every task, then 1, ...), or windows of ``harness.TEXT``."""
    if data is None:
        ids = tokenizer(TEXT * 6).input_ids
        lengths = [16 + 11 * i % 48 for i in range(count)]  # 16-63 tokens
        prompts = [ids[(7 * i) % (len(ids) - 64) :][:length] for i, length in enumerate(lengths)]
        source = {"kind": "text", "note": "no --data: windows of harness.TEXT, not SuperNI prompts"}
    else:
        tasks = load_sni(data, split)
        per_task = [samples_from_tasks([task]) for task in tasks]
        samples = [s for turn in itertools.zip_longest(*per_task) for s in turn if s is not None][:count]
        if len(samples) < count:
            raise ValueError(
                f"--data {data}: {len(samples)} instances in {len(tasks)} tasks, fewer than --prompts {count}"
            )
        template = Template("sni")
        prompts = [encode_prompt(tokenizer, template.render(sample)) for sample in samples]
        source = {"kind": "superni", "template": template.describe(), "tasks": len({s.task for s in samples})}
    return prompts, {**source, "prompts": len(prompts), "prompt_tokens": sum(map(len, prompts))}


@dataclass
class Batch:
    """Prompts ``index`` (positions in the prompt list), left-padded: ``ids``, ``mask`` ``[rows, longest]``, and
    their adapters ``names`` (prompt ``i``'s is adapter ``i % adapters``)."""

    index: list[int]
    ids: torch.Tensor
    mask: torch.Tensor
    names: list[str]

    def chunks(self, rows: int) -> list[Batch]:
        return [Batch(self.index[i : i + rows], self.ids[i : i + rows], self.mask[i : i + rows],
                      self.names[i : i + rows]) for i in range(0, len(self.index), rows)]  # fmt: skip


def batches(prompts: list[list[int]], adapters: list[str], size: int, collate, device) -> list[Batch]:
    """The prompts in batches of ``size`` of similar length (little padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = []
    for start in range(0, len(order), size):
        index = order[start : start + size]
        padded = collate([prompts[i] for i in index])
        names = [adapters[i % len(adapters)] for i in index]
        out.append(Batch(index, padded["input_ids"].to(device), padded["attention_mask"].to(device), names))
    return out


def logit_figures(models: dict[str, AdapterModel], batches: list[Batch], rows: int) -> dict:
    """``|logits|`` differences over every real prompt position, in forwards of at most ``rows`` rows."""
    diff_max, diff_sum, effect_max, effect_sum, values, positions, same_top = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
    for batch in (chunk for whole in batches for chunk in whole.chunks(rows)):
        real, position_ids = batch.mask.bool(), (batch.mask.cumsum(-1) - 1).clamp(min=0)
        runs = [(label, model, batch.names) for label, model in models.items()]
        runs.append(("base", models["float32"], [None] * len(batch.names)))
        logits = {label: model(batch.ids, attention_mask=batch.mask, position_ids=position_ids,
                               adapter_names=names).logits[real] for label, model, names in runs}  # fmt: skip
        diff = (logits["float32"] - logits["bfloat16"]).abs()
        effect = (logits["float32"] - logits["base"]).abs()
        diff_max, diff_sum = max(diff_max, diff.max().item()), diff_sum + diff.sum().item()
        effect_max, effect_sum = max(effect_max, effect.max().item()), effect_sum + effect.sum().item()
        values, positions = values + diff.numel(), positions + len(diff)
        same_top += (logits["float32"].argmax(-1) == logits["bfloat16"].argmax(-1)).sum().item()
    return {
        "positions": positions,
        "max_abs_diff": round(diff_max, 5),
        "mean_abs_diff": round(diff_sum / values, 7),
        "same_top_token": round(same_top / positions, 5),
        "adapter_effect_max_abs": round(effect_max, 4),
        "adapter_effect_mean_abs": round(effect_sum / values, 5),
        "diff_over_effect": round(diff_sum / effect_sum, 5),
    }


def greedy_figures(models: dict[str, AdapterModel], batches: list[Batch], new_tokens: int, eos: int | None) -> dict:
    """Greedy outputs with each table dtype compared (the module docstring)."""
    outputs, margins = {label: {} for label in models}, []
    for batch in batches:
        step_logits = {}
        for label, model in models.items():
            out = model.generate(batch.ids, attention_mask=batch.mask, adapter_names=batch.names,
                                 max_new_tokens=new_tokens, do_sample=False, output_logits=label == "float32",
                                 return_dict_in_generate=True)  # fmt: skip
            for i, tokens in zip(batch.index, out.sequences[:, batch.ids.shape[1] :].tolist(), strict=True):
                outputs[label][i] = to_eos(tokens, eos)
            step_logits[label] = out.logits
        for row, i in enumerate(batch.index):
            ours, theirs = outputs["float32"][i], outputs["bfloat16"][i]
            if ours != theirs:
                step = common_prefix(ours, theirs)
                chosen = step_logits["float32"][step][row]  # float32's logits where bfloat16 chose otherwise
                margins.append((chosen[ours[step]] - chosen[theirs[step]]).item())
    pairs = [(outputs["float32"][i], outputs["bfloat16"][i]) for i in sorted(outputs["float32"])]
    agreed = [common_prefix(ours, theirs) for ours, theirs in pairs]
    return {
        "prompts": len(pairs),
        "identical": round(sum(ours == theirs for ours, theirs in pairs) / len(pairs), 4),
        "tokens_before_first_difference": round(sum(agreed) / sum(len(ours) for ours, _ in pairs), 4),
        "float32_tokens": sum(len(ours) for ours, _ in pairs),
        "first_difference_at": sorted(a for a, (ours, theirs) in zip(agreed, pairs, strict=True) if ours != theirs),
        "float32_margin_at_difference": sorted(round(m, 4) for m in margins),
    }


def to_eos(tokens: list[int], eos: int | None) -> list[int]:
    """``tokens`` up to and with the first ``eos`` (what follows it is padding)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


SPEED_PROMPT_TOKENS = 32


def speed_records(models: dict[str, AdapterModel], model_name: str, tokenizer, rows: list[str], args) -> list[dict]:
    """One decoding step of ``rows`` (distinct adapters, `bmm`) with each table dtype, paired with the bare model's."""
    bare = load_base(model_name, device=args.device)[0]
    ids = token_rows(tokenizer, len(rows), SPEED_PROMPT_TOKENS).to(args.device)
    mask = torch.ones_like(ids)
    base = Case({"system": "base"}, decode_run(bare, contextlib.nullcontext, ids, mask, args.speed_steps))
    cases = [Case({"system": f"{label} tables", "strategy": "bmm"},
                  decode_run(model.base_model, routed_with(model, rows, "bmm"), ids, mask, args.speed_steps),
                  reference=base) for label, model in models.items()]  # fmt: skip
    measure([base, *cases], args.rounds)
    return [{**case.record, "ms_per_step": round(1000 * case.median_s / args.speed_steps, 2),
             "ratio_to_base": round(case.ratio_to_reference, 4) if case.reference else None,
             "paired_ratios": [round(r, 4) for r in case.ratios]} for case in [base, *cases]]  # fmt: skip


if __name__ == "__main__":
    main()
